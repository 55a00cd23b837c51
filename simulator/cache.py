"""Simulated KV block caches: one `BlockCache` per worker and the cluster-wide `HolderIndex` over them.

A block is a trace hash id (one per `block_len` tokens, equal ids meaning equal content with equal
prefix). A cache owns `capacity` blocks, each one of:
- pinned: a cached id that a running request uses (shared; never evicted while pinned);
- reserved: a running request's private block (its uncached prompt and output tokens; no id yet);
- evictable: a cached id no running request uses, kept in LRU order;
- free.
Eviction takes the least recently used evictable id. Ids are touched tail first, so a prompt's shared
head outlives its private tail, as in `engine/block_pool.py`. The caches keep the `HolderIndex` (id →
the workers holding it) exact; it is what the router's prefix-index mirror is in the live cluster, without
delay. This module knows nothing about time or requests.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence


class HolderIndex:
    """Which workers hold each block id. Mutated only by the `BlockCache`s attached to it."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}

    def holders(self, block_id: int) -> frozenset[str]:
        return frozenset(self._holders.get(block_id, ()))

    def add(self, block_id: int, worker_id: str) -> None:
        holders = self._holders.get(block_id)
        if holders is None:
            self._holders[block_id] = {worker_id}
        else:
            holders.add(worker_id)

    def add_all(self, block_ids: Iterable[int], worker_id: str) -> None:
        table = self._holders
        for block_id in block_ids:
            holders = table.get(block_id)
            if holders is None:
                table[block_id] = {worker_id}
            else:
                holders.add(worker_id)

    def remove(self, block_id: int, worker_id: str) -> None:
        holders = self._holders[block_id]
        holders.discard(worker_id)
        if not holders:
            del self._holders[block_id]

    def matches(self, block_ids: Sequence[int]) -> dict[str, int]:
        """Worker id → how many leading ids of `block_ids` it holds (workers holding none are absent).
        One walk over the ids, narrowing the set of workers that held every id so far."""
        table = self._holders
        if not block_ids or block_ids[0] not in table:
            return {}
        alive = table[block_ids[0]]
        out: dict[str, int] = {}
        for k in range(1, len(block_ids)):
            holders = table.get(block_ids[k])
            if holders is None:
                return dict.fromkeys(alive, k) | out
            if holders is not alive and not alive <= holders:
                kept = alive & holders
                for worker_id in alive - kept:
                    out[worker_id] = k
                if not kept:
                    return out
                alive = kept
        n = len(block_ids)
        for worker_id in alive:
            out[worker_id] = n
        return out


class BlockCache:
    """A worker's KV blocks (see the module docstring). `acquire`/`release` bracket a running request;
    `insert` caches ids once their KV exists. Every id entering or leaving updates `index`."""

    def __init__(self, worker_id: str, capacity: int, index: HolderIndex) -> None:
        if capacity < 1:
            raise ValueError(f"a cache needs at least one block, got {capacity}")
        self.worker_id = worker_id
        self.capacity = capacity
        self._index = index
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable ids, least recently used first
        self._pins: dict[int, int] = {}  # pinned id → number of running requests using it
        self._reserved = 0

    @property
    def num_free(self) -> int:
        """Blocks free or evictable: what a new request could get."""
        return self.capacity - len(self._pins) - self._reserved

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.capacity

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._lru or block_id in self._pins

    def evictable_ids(self) -> list[int]:
        """Evictable ids, the next one evicted first."""
        return list(self._lru)

    def match(self, block_ids: Sequence[int]) -> int:
        """How many leading ids of `block_ids` this cache holds."""
        for k, block_id in enumerate(block_ids):
            if block_id not in self._lru and block_id not in self._pins:
                return k
        return len(block_ids)

    def acquire(self, shared_ids: Sequence[int], num_new: int) -> bool:
        """Pin `shared_ids` (held here) and reserve `num_new` private blocks, evicting LRU ids to make
        room. Returns False, changing nothing, when they do not fit even with every evictable id gone.
        Raises KeyError for an id the cache does not hold (callers pin only what `match` counted)."""
        pins, lru = self._pins, self._lru
        newly = [b for b in shared_ids if b not in pins]
        if len(pins) + len(newly) + self._reserved + num_new > self.capacity:
            return False
        if len(newly) < len(shared_ids):
            for block_id in shared_ids:
                if block_id in pins:
                    pins[block_id] += 1
        _drain(map(lru.pop, newly))  # in C: this runs once per request over its whole prompt
        pins.update(dict.fromkeys(newly, 1))
        self._reserved += num_new
        self._evict_to_fit()
        return True

    def release(self, shared_ids: Sequence[int], num_new: int) -> None:
        """Undo an `acquire`: private blocks become free, pins drop; an id no request pins any more
        becomes evictable as the most recently used (tail first)."""
        self._reserved -= num_new
        assert self._reserved >= 0
        pins = self._pins
        unpinned = [b for b in reversed(shared_ids) if pins[b] == 1]
        if len(unpinned) < len(shared_ids):
            for block_id in shared_ids:
                if pins[block_id] > 1:
                    pins[block_id] -= 1
        lru = self._lru
        for block_id in unpinned:
            del pins[block_id]
            lru[block_id] = None

    def insert(self, block_ids: Sequence[int]) -> None:
        """Cache `block_ids` (a prefix chain, head first) as the most recently used, tail first, evicting
        LRU ids to fit; ids already cached are touched. More ids than fit: the leading ones are kept."""
        lru, pins, touch = self._lru, self._pins, self._lru.move_to_end
        added = []
        for block_id in reversed(block_ids):
            if block_id in lru:
                touch(block_id)
            elif block_id not in pins:
                lru[block_id] = None
                added.append(block_id)
        self._index.add_all(added, self.worker_id)
        self._evict_to_fit()

    def _evict_to_fit(self) -> None:
        lru = self._lru
        while lru and len(lru) + len(self._pins) + self._reserved > self.capacity:
            block_id, _ = lru.popitem(last=False)
            self._index.remove(block_id, self.worker_id)


def _drain(iterator: Iterable[object]) -> None:
    """Run an iterator of side effects to its end, in C."""
    deque(iterator, maxlen=0)
