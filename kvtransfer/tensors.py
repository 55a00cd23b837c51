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


def read_blocks(kv_cache: torch.Tensor, block_ids: Sequence[int]) -> bytes:
    """The K and V of `block_ids` (in that order) as bytes. Synchronises with the device (a copy to host)."""
    out = bytearray(blocks_nbytes(kv_cache, len(block_ids)))
    read_blocks_into(kv_cache, block_ids, memoryview(out))
    return bytes(out)


def blocks_nbytes(kv_cache: torch.Tensor, num_blocks: int) -> int:
    return kv_cache.element_size() * 2 * num_blocks * kv_cache[0, 0].numel()


def read_blocks_into(kv_cache: torch.Tensor, block_ids: Sequence[int], out: memoryview) -> None:
    """Gather the K and V of `block_ids` straight into the writable buffer `out` (exactly their size)."""
    shape = (2, len(block_ids), *kv_cache.shape[2:])
    dst = torch.frombuffer(out, dtype=torch.uint8).view(kv_cache.dtype).view(shape)
    index = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
    if kv_cache.device.type == "cpu":
        torch.index_select(kv_cache, 1, index, out=dst)
    else:
        dst.copy_(kv_cache.index_select(1, index))  # gather on the device, one copy to the host


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
    index = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
    kv_cache.index_copy_(1, index, blocks.to(kv_cache.device))
