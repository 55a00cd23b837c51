"""KV blocks of one layer's paged cache as the transfer's raw bytes, and back.

One layer's cache is [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V, as in
`engine.attention`); the bytes of n blocks are that tensor's [2, n, ...] slice in native (little-endian)
order, the layout `chunks` documents.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch

assert sys.byteorder == "little", "the KV wire format is little-endian raw bytes"


def read_blocks(
    kv_cache: torch.Tensor, block_ids: Sequence[int], after: torch.cuda.Event | None = None
) -> memoryview:
    """The K and V of `block_ids` (in that order) as bytes on the host. On CUDA the gather and the copy
    to pinned memory run on a side stream once `after` (e.g. the end of the layer's forward) has fired,
    so they never wait behind the rest of a running step; returns once the bytes are on the host."""
    if kv_cache.device.type != "cuda":
        out = bytearray(blocks_nbytes(kv_cache, len(block_ids)))
        dst = torch.frombuffer(out, dtype=torch.uint8).view(kv_cache.dtype)
        index = torch.tensor(block_ids, dtype=torch.int64)
        torch.index_select(kv_cache, 1, index, out=dst.view(2, len(block_ids), *kv_cache.shape[2:]))
        return memoryview(out)
    side = torch.cuda.Stream(kv_cache.device)
    with torch.cuda.stream(side):
        if after is not None:
            side.wait_event(after)
        index = torch.tensor(block_ids, dtype=torch.int64).to(kv_cache.device, non_blocking=True)
        blocks = kv_cache.index_select(1, index)
        host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
        host.copy_(blocks, non_blocking=True)
    side.synchronize()
    return memoryview(host.reshape(-1).view(torch.uint8).numpy())


def blocks_nbytes(kv_cache: torch.Tensor, num_blocks: int) -> int:
    return kv_cache.element_size() * 2 * num_blocks * kv_cache[0, 0].numel()


def write_blocks(kv_cache: torch.Tensor, block_ids: Sequence[int], data: bytes | memoryview) -> None:
    """Store bytes from `read_blocks` (of a cache with the same layout) into `block_ids`."""
    shape = (2, len(block_ids), *kv_cache.shape[2:])
    expected = blocks_nbytes(kv_cache, len(block_ids))
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes for {len(block_ids)} blocks of this cache; expected {expected}")
    with warnings.catch_warnings():  # read-only bytes: torch warns, but the view is only read here
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8)
    blocks = raw.view(kv_cache.dtype).view(shape)
    first = block_ids[0] if block_ids else 0
    if list(block_ids) == list(range(first, first + len(block_ids))):  # consecutive (a fresh pool's usual
        kv_cache[:, first : first + len(block_ids)].copy_(blocks)  # case): one strided copy, no index
        return
    index = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
    kv_cache.index_copy_(1, index, blocks.to(kv_cache.device))
