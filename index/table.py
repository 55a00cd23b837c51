"""The in-memory prefix table a router queries per decision: block hash → the live workers holding it,
and which of a worker's blocks it holds in its host-memory tier only.

Pure data, no I/O and no locking (the mirror that feeds it holds the lock). Every worker in the table is a
live worker, holding zero or more blocks; a worker leaves only through `drop`. A worker's host-tier blocks
are always among its blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from splitserve.engine.block_hash import BlockHash


class PrefixMatch(NamedTuple):
    """A worker's leading blocks of a chain (in either tier), and how many of them are in its host tier
    only (to be loaded back before use)."""

    num_blocks: int
    num_host_blocks: int = 0


class PrefixTable:
    def __init__(self) -> None:
        self._holders: dict[BlockHash, set[str]] = {}
        self._blocks: dict[str, set[BlockHash]] = {}
        self._host: dict[str, set[BlockHash]] = {}  # worker → its blocks held in its host tier only

    @property
    def worker_ids(self) -> list[str]:
        return list(self._blocks)

    def num_blocks(self, worker_id: str) -> int:
        return len(self._blocks.get(worker_id, ()))

    def blocks_of(self, worker_id: str) -> set[BlockHash]:
        """A copy of the worker's blocks (empty for an unknown worker)."""
        return set(self._blocks.get(worker_id, ()))

    def host_blocks_of(self, worker_id: str) -> set[BlockHash]:
        """A copy of the worker's blocks held in its host tier only."""
        return set(self._host.get(worker_id, ()))

    def has_block(self, worker_id: str, block_hash: BlockHash) -> bool:
        return block_hash in self._blocks.get(worker_id, ())

    def add(self, worker_id: str, hashes: Iterable[BlockHash]) -> None:
        """Record that the worker holds `hashes` in its KV memory (adding the worker if new)."""
        hashes = list(hashes)
        self._hold(worker_id, hashes)
        host = self._host.get(worker_id)
        if host:
            host.difference_update(hashes)

    def add_host(self, worker_id: str, hashes: Iterable[BlockHash]) -> None:
        """Record that the worker holds `hashes` in its host tier only (adding the worker if new)."""
        hashes = list(hashes)
        self._hold(worker_id, hashes)
        self._host.setdefault(worker_id, set()).update(hashes)

    def remove(self, worker_id: str, hashes: Iterable[BlockHash]) -> None:
        """Record that the worker no longer holds `hashes`; unknown ones are ignored."""
        owned = self._blocks.get(worker_id)
        if owned is None:
            return
        host = self._host.get(worker_id, set())
        for h in hashes:
            if h in owned:
                owned.discard(h)
                host.discard(h)
                self._forget(h, worker_id)

    def replace(self, worker_id: str, hashes: set[BlockHash], host: set[BlockHash] | None = None) -> None:
        """Make the worker's blocks exactly `hashes` and those in its host tier only `host` (the sets are
        copied; host hashes not among `hashes` are ignored), touching only the difference."""
        owned = self._blocks.get(worker_id, set())
        self.remove(worker_id, owned - hashes)
        self._hold(worker_id, hashes - owned)
        self._host[worker_id] = (host or set()) & hashes

    def drop(self, worker_id: str) -> None:
        self._host.pop(worker_id, None)
        for h in self._blocks.pop(worker_id, ()):
            self._forget(h, worker_id)

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """For every worker, how many leading blocks of the chain it holds (it stops at its first miss).

        Walks the chain once with a shrinking set of workers that hold every block so far; a worker's
        count is fixed when it drops out. Cost: one dict lookup per block while any worker still holds the
        whole prefix, plus a set intersection only where the holders change.
        """
        counts = dict.fromkeys(self._blocks, 0)
        alive: set[str] | None = None  # workers holding blocks 0..depth-1; None before the first block
        depth = 0
        for h in block_hashes:
            holders = self._holders.get(h)
            if holders is None:
                break
            if alive is None:
                alive = holders  # read only: never mutated below
            elif not alive <= holders:
                kept = alive & holders
                for worker_id in alive - kept:
                    counts[worker_id] = depth
                alive = kept
                if not alive:
                    break
            depth += 1
        for worker_id in alive or ():
            counts[worker_id] = depth
        return counts

    def match_tiers(self, block_hashes: Sequence[BlockHash]) -> dict[str, PrefixMatch]:
        """`match`, with how many of each worker's leading blocks it holds in its host tier only."""
        matches = {}
        for worker_id, n in self.match(block_hashes).items():
            host = self._host.get(worker_id)
            num_host = sum(1 for h in block_hashes[:n] if h in host) if host and n else 0
            matches[worker_id] = PrefixMatch(n, num_host)
        return matches

    def _hold(self, worker_id: str, hashes: Iterable[BlockHash]) -> None:
        owned = self._blocks.setdefault(worker_id, set())
        for h in hashes:
            if h not in owned:
                owned.add(h)
                self._holders.setdefault(h, set()).add(worker_id)

    def _forget(self, h: BlockHash, worker_id: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[h]
