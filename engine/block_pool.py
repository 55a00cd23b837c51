"""The pool of KV-cache block ids: reference counts, the prefix-cache map, LRU eviction, events.

Owns which block ids are free, which are cached under which hash, and the order in which unreferenced
cached blocks are evicted. It does not own the KV tensors (the model runner does) nor which sequence uses
which block (the KV cache manager does).

Block 0 is the null block: never handed out, it is where padded slots of a fixed-shape batch write.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, Protocol

from splitserve.engine.block_hash import BlockHash

NULL_BLOCK_ID = 0


class OutOfKVBlocks(RuntimeError):
    """Raised by `allocate` when fewer blocks are free than asked for; callers check first."""


class BlockEventKind(Enum):
    STORED = "stored"  # in KV memory now (computed, received, or loaded back from the host tier)
    SPILLED = "spilled"  # evicted from KV memory, still held: in the host tier only
    EVICTED = "evicted"  # held nowhere here any more


@dataclass(frozen=True)
class BlockEvent:
    """Blocks entering, changing tier in, or leaving this pool's prefix cache, in chain order for STORED."""

    kind: BlockEventKind
    block_hashes: tuple[BlockHash, ...]


BlockListener = Callable[[BlockEvent], None]


class Holdings(NamedTuple):
    """Every hash a pool holds (an index snapshot): `hashes` in either tier, `host` those of them held in
    the host tier only."""

    hashes: list[BlockHash]
    host: list[BlockHash]


class Spill(Protocol):
    """Where evicted cached blocks go instead of being lost (`host_tier.HostKVTier`)."""

    capacity: int

    def save(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> list[BlockHash]: ...

    def hashes(self) -> list[BlockHash]: ...

    def clear(self) -> list[BlockHash]: ...


class BlockPool:
    """Block ids 1..num_blocks-1 with reference counts and a hash → block map.

    A free block (ref count 0) may still hold a cached hash: it stays reusable by `lookup` until
    `allocate` evicts it, least recently freed first. Listeners are called synchronously, on the caller's
    thread, with STORED/SPILLED/EVICTED events; they must not call back into the pool.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}
        # Free blocks in eviction order: the first is evicted first. Values unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._listeners: list[BlockListener] = []
        # Where evicted cached blocks go instead of being lost (the host-memory tier), or None.
        self.spill: Spill | None = None

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` can hand out now, cached-but-unreferenced ones included."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def add_listener(self, listener: BlockListener) -> None:
        self._listeners.append(listener)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hash_of[block_id]

    def free_block_ids(self) -> list[int]:
        """Free block ids in eviction order (for tests and diagnostics)."""
        return list(self._free)

    def cached_hashes(self) -> list[BlockHash]:
        """Every hash held now, in KV memory or spilled to the host tier (call on the pool's owning
        thread)."""
        return self.holdings().hashes

    def holdings(self) -> Holdings:
        """Every hash held now, those in the host tier only named: the index snapshot of this pool (call
        on the pool's owning thread)."""
        host = [] if self.spill is None else [h for h in self.spill.hashes() if h not in self._cached]
        return Holdings(list(self._cached) + host, host)

    def lookup(self, block_hashes: Iterable[BlockHash]) -> list[int]:
        """Block ids of the longest cached prefix of the chain `block_hashes`. Changes nothing."""
        found: list[int] = []
        for block_hash in block_hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def allocate(self, num: int) -> list[int]:
        """Take `num` blocks (ref count 1), evicting cached ones least recently freed first."""
        if num > len(self._free):
            raise OutOfKVBlocks(f"asked for {num} KV blocks, {len(self._free)} free")
        block_ids: list[int] = []
        evicted: list[BlockHash] = []
        evicted_ids: list[int] = []
        for _ in range(num):
            block_id, _ = self._free.popitem(last=False)
            old_hash = self._hash_of[block_id]
            if old_hash is not None:
                del self._cached[old_hash]
                self._hash_of[block_id] = None
                evicted.append(old_hash)
                evicted_ids.append(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        if evicted and self.spill is not None:
            # Kept in the host tier (SPILLED), but for what it dropped to make room, some of them perhaps
            # (gone, unless back in KV memory since).
            dropped = self.spill.save(evicted_ids, evicted)
            gone = set(dropped)
            spilled = tuple(h for h in evicted if h not in gone)
            evicted = [h for h in dropped if h not in self._cached]
            if spilled:
                self._emit(BlockEvent(BlockEventKind.SPILLED, spilled))
        if evicted:
            self._emit(BlockEvent(BlockEventKind.EVICTED, tuple(evicted)))
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on blocks (prefix-cache hits), pulling free ones out of the LRU."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block. Blocks reaching 0 become evictable in the order given,
        so callers pass a sequence's blocks tail first: shared heads outlive private tails."""
        for block_id in block_ids:
            assert self._ref_counts[block_id] > 0, f"double free of KV block {block_id}"
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    def cache(self, block_ids: list[int], block_hashes: list[BlockHash]) -> None:
        """Register computed full blocks under their hashes (a chain, in order).

        A hash already cached under another block keeps its first block: the duplicate stays private
        to its sequence and is recycled uncached when freed.
        """
        if not self.enable_caching:
            return
        stored: list[BlockHash] = []
        for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
            if block_hash in self._cached or self._hash_of[block_id] is not None:
                continue
            self._cached[block_hash] = block_id
            self._hash_of[block_id] = block_hash
            stored.append(block_hash)
        if stored:
            self._emit(BlockEvent(BlockEventKind.STORED, tuple(stored)))

    def reset_cache(self) -> int:
        """Forget every cached hash of a free block (blocks in use keep theirs) and empty the host tier:
        the prefix cache starts over, as between the arms of an experiment. Emits one EVICTED event.
        Returns the blocks forgotten."""
        evicted = []
        for block_id in self._free:
            old_hash = self._hash_of[block_id]
            if old_hash is not None:
                del self._cached[old_hash]
                self._hash_of[block_id] = None
                evicted.append(old_hash)
        if self.spill is not None:
            forgotten = set(evicted)
            evicted += [h for h in self.spill.clear() if h not in self._cached and h not in forgotten]
        if evicted:
            self._emit(BlockEvent(BlockEventKind.EVICTED, tuple(evicted)))
        return len(evicted)

    def _emit(self, event: BlockEvent) -> None:
        for listener in self._listeners:
            listener(event)
