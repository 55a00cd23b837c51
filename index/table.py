"""The in-memory prefix table a router queries per decision: block hash → the live workers holding it.

Pure data, no I/O and no locking (the mirror that feeds it holds the lock). Every worker in the table is a
live worker, holding zero or more blocks; a worker leaves only through `drop`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from splitserve.engine.block_hash import BlockHash


class PrefixTable:
    def __init__(self) -> None:
        self._holders: dict[BlockHash, set[str]] = {}
        self._blocks: dict[str, set[BlockHash]] = {}

    @property
    def worker_ids(self) -> list[str]:
        return list(self._blocks)

    def num_blocks(self, worker_id: str) -> int:
        return len(self._blocks.get(worker_id, ()))

    def blocks_of(self, worker_id: str) -> set[BlockHash]:
        """A copy of the worker's blocks (empty for an unknown worker)."""
        return set(self._blocks.get(worker_id, ()))

    def has_block(self, worker_id: str, block_hash: BlockHash) -> bool:
        return block_hash in self._blocks.get(worker_id, ())

    def add(self, worker_id: str, hashes: Iterable[BlockHash]) -> None:
        """Record that the worker holds `hashes` (adding the worker if new)."""
        owned = self._blocks.setdefault(worker_id, set())
        for h in hashes:
            if h not in owned:
                owned.add(h)
                self._holders.setdefault(h, set()).add(worker_id)

    def remove(self, worker_id: str, hashes: Iterable[BlockHash]) -> None:
        """Record that the worker no longer holds `hashes`; unknown ones are ignored."""
        owned = self._blocks.get(worker_id)
        if owned is None:
            return
        for h in hashes:
            if h in owned:
                owned.discard(h)
                self._forget(h, worker_id)

    def replace(self, worker_id: str, hashes: set[BlockHash]) -> None:
        """Make the worker's blocks exactly `hashes` (the set is copied), touching only the difference."""
        owned = self._blocks.get(worker_id, set())
        self.remove(worker_id, owned - hashes)
        self.add(worker_id, hashes - owned)

    def drop(self, worker_id: str) -> None:
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

    def _forget(self, h: BlockHash, worker_id: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[h]
