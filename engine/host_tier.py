"""The host-memory tier of the prefix cache: blocks evicted from the engine's KV memory are copied to a
bounded host pool (pinned memory on CUDA) instead of being lost, and copied back on a prefix hit instead
of being recomputed.

Owns the host copies and their LRU order; the block pool decides what is evicted (`BlockPool.spill`)
and the KV cache manager what is loaded back (`KVCacheManager.lookup`). Every copy is issued on the
engine's thread and, on CUDA, on its current stream without waiting: a copy out is ordered before the
step that overwrites the evicted block, a copy back before the step that reads it, and copies into and
out of one host slot are ordered with each other, so the host never waits for them. Loads are timed
(`load_bytes_per_s`, a load figure the worker publishes): on CUDA by events read once they have fired.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from splitserve.engine.block_hash import BlockHash
from splitserve.engine.rates import DeviceTimer, RateMeter


class HostKVTier:
    """`capacity` blocks of every layer of `kv_caches` ([2, num_blocks, block_size, kv_heads, head_dim]
    each), least recently used dropped first. Not thread-safe: the engine's thread only."""

    def __init__(self, kv_caches: list[torch.Tensor], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a host KV tier holds at least one block, got {capacity}")
        self.capacity = capacity
        cache = kv_caches[0]
        # Block-major, every layer of a block together: a run of slots is one contiguous span of host
        # memory, moved by one DMA (pinned memory on CUDA) whatever the number of layers.
        self._block_shape = (len(kv_caches), 2, *cache.shape[2:])
        pin = cache.device.type == "cuda"
        self._caches = kv_caches
        self._host = torch.empty((capacity, *self._block_shape), dtype=cache.dtype, pin_memory=pin)
        self._slot_of: OrderedDict[BlockHash, int] = OrderedDict()  # LRU first
        self._free = list(range(capacity - 1, -1, -1))  # popped from the end: slots 0, 1, 2, ...
        self._block_bytes = self._host[0].numel() * self._host.element_size()
        self._loads = RateMeter()
        self._timing: list[tuple[DeviceTimer, int]] = []  # loads whose time is not known yet, and bytes

    @staticmethod
    def blocks_for(kv_caches: list[torch.Tensor], nbytes: float) -> int:
        """How many blocks of these caches `nbytes` of host memory hold."""
        per_block = sum(c[:, 0].numel() * c.element_size() for c in kv_caches)
        return int(nbytes // per_block)

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def load_bytes_per_s(self) -> float:
        """KV bytes/s its loads back into KV memory moved, as measured (0 before the first)."""
        self._fold_timings()
        return self._loads.per_s

    def hashes(self) -> list[BlockHash]:
        return list(self._slot_of)

    def save(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash]) -> list[BlockHash]:
        """Copy evicted blocks out (a hash held already is only marked used). Returns the hashes dropped
        to make room: no longer held here."""
        dropped, slots, sources = [], [], []
        for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
            if block_hash in self._slot_of:
                self._slot_of.move_to_end(block_hash)
                continue
            if not self._free:
                old, slot = self._slot_of.popitem(last=False)
                dropped.append(old)
                self._free.append(slot)
            slot = self._free.pop()
            self._slot_of[block_hash] = slot
            slots.append(slot)
            sources.append(block_id)
        if slots:
            self._copy(sources, slots, out=True)
        return dropped

    def match(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many leading hashes of `block_hashes` are held here."""
        n = 0
        for block_hash in block_hashes:
            if block_hash not in self._slot_of:
                break
            n += 1
        return n

    def keep(self, block_hashes: Sequence[BlockHash]) -> None:
        """Mark held blocks used now (dropped last)."""
        for block_hash in block_hashes:
            self._slot_of.move_to_end(block_hash)

    def load(self, block_hashes: Sequence[BlockHash], block_ids: Sequence[int]) -> None:
        """Copy held blocks back into KV memory blocks `block_ids` (they keep their host copies)."""
        self.keep(block_hashes)
        slots = [self._slot_of[h] for h in block_hashes]
        timer = DeviceTimer(self._caches[0].device)
        self._copy(list(block_ids), slots, out=False)
        timer.stop()
        self._timing.append((timer, len(slots) * self._block_bytes))
        self._fold_timings()

    def clear(self) -> list[BlockHash]:
        """Drop every block (the prefix cache starts over); returns their hashes."""
        dropped = list(self._slot_of)
        self._free.extend(self._slot_of.values())
        self._slot_of.clear()
        return dropped

    def _fold_timings(self) -> None:
        """Count the timed loads that have finished, oldest first."""
        while self._timing and self._timing[0][0].done():
            timer, nbytes = self._timing.pop(0)
            self._loads.observe(nbytes, timer.seconds())

    def _copy(self, block_ids: list[int], slots: list[int], out: bool) -> None:
        """Blocks ↔ host slots through one contiguous staging tensor on the device ([blocks, layers, 2,
        ...], gathered from or scattered to the per-layer caches there), moved in runs of consecutive
        slots (handed out in order, so runs are long): never a host-side op on data still in flight."""
        device = self._caches[0].device
        ids = torch.tensor(block_ids, dtype=torch.int64).to(device, non_blocking=True)
        runs = _runs(slots)
        if out:
            layers = torch.stack([c.index_select(1, ids) for c in self._caches])  # [layers, 2, blocks, ...]
            staged = layers.permute(2, 0, 1, 3, 4, 5).contiguous()
            for at, slot, n in runs:
                self._host[slot : slot + n].copy_(staged[at : at + n], non_blocking=True)
            return
        staged = torch.empty((len(slots), *self._block_shape), dtype=self._host.dtype, device=device)
        for at, slot, n in runs:
            staged[at : at + n].copy_(self._host[slot : slot + n], non_blocking=True)
        for layer, cache in enumerate(self._caches):
            cache.index_copy_(1, ids, staged[:, layer].transpose(0, 1))


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(position in `slots`, first slot, length) of each run of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            at, first, n = runs[-1]
            runs[-1] = (at, first, n + 1)
        else:
            runs.append((i, slot, 1))
    return runs
