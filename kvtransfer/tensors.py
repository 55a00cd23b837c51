"""KV blocks of one layer's paged cache as the transfer's raw bytes, and back.

One layer's cache is [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V, as in
`engine.attention`); the bytes of n blocks are that tensor's [2, n, ...] slice in native (little-endian)
order, the layout `chunks` documents. With the "fp8_e4m3" wire encoding they are instead 2 × n float32
scales (each K or V block's absolute maximum / 448, e4m3's largest value) and then the [2, n, ...] values
divided by their block's scale as FP8 e4m3: a byte per value, quantized on the sending device.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch

assert sys.byteorder == "little", "the KV wire format is little-endian raw bytes"


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_encode(blocks: torch.Tensor) -> torch.Tensor:
    """[2, n, ...] blocks → their "fp8_e4m3" wire bytes (uint8, on the same device)."""
    amax = blocks.float().abs().amax(dim=tuple(range(2, blocks.dim())), keepdim=True)
    scales = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    values = (blocks.float() / scales).to(torch.float8_e4m3fn)
    return torch.cat((scales.reshape(-1).view(torch.uint8), values.reshape(-1).view(torch.uint8)))


def fp8_decode(data: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`fp8_encode`'s bytes (uint8) → [2, n, ...] blocks of `dtype`."""
    num_scales = shape[0] * shape[1]
    scales = data[: 4 * num_scales].view(torch.float32).view(shape[0], shape[1], *[1] * (len(shape) - 2))
    values = data[4 * num_scales :].view(torch.float8_e4m3fn).view(shape)
    return (values.float() * scales).to(dtype)


def read_blocks(
    kv_cache: torch.Tensor, block_ids: Sequence[int], after: torch.cuda.Event | None = None,
    encoding: str = "",
) -> memoryview:
    """The K and V of `block_ids` (in that order) as bytes on the host, in the wire `encoding`. On CUDA
    the gather (and the encoding) and the copy to pinned memory run on a side stream once `after` (e.g.
    the end of the layer's forward) has fired, so they never wait behind the rest of a running step;
    returns once the bytes are on the host."""
    if encoding:
        return _read_encoded(kv_cache, block_ids, after)
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


def _read_encoded(
    kv_cache: torch.Tensor, block_ids: Sequence[int], after: torch.cuda.Event | None
) -> memoryview:
    if kv_cache.device.type != "cuda":
        index = torch.tensor(block_ids, dtype=torch.int64)
        return memoryview(fp8_encode(kv_cache.index_select(1, index)).numpy())
    side = torch.cuda.Stream(kv_cache.device)
    with torch.cuda.stream(side):
        if after is not None:
            side.wait_event(after)
        index = torch.tensor(block_ids, dtype=torch.int64).to(kv_cache.device, non_blocking=True)
        encoded = fp8_encode(kv_cache.index_select(1, index))
        host = torch.empty(encoded.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(encoded, non_blocking=True)
    side.synchronize()
    return memoryview(host.numpy())


def blocks_nbytes(kv_cache: torch.Tensor, num_blocks: int, encoding: str = "") -> int:
    """Bytes of `num_blocks` blocks of this cache as `read_blocks` returns them in `encoding`."""
    values = 2 * num_blocks * kv_cache[0, 0].numel()
    return values + 2 * 4 * num_blocks if encoding else values * kv_cache.element_size()


def write_blocks(
    kv_cache: torch.Tensor, block_ids: Sequence[int], data: bytes | memoryview, encoding: str = ""
) -> None:
    """Store bytes from `read_blocks` (of a cache with the same layout, in `encoding`) into `block_ids`."""
    shape = (2, len(block_ids), *kv_cache.shape[2:])
    expected = blocks_nbytes(kv_cache, len(block_ids), encoding)
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes for {len(block_ids)} blocks of this cache; expected {expected}")
    with warnings.catch_warnings():  # read-only bytes: torch warns, but the view is only read here
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(data, dtype=torch.uint8)
    if encoding:
        blocks = fp8_decode(raw.to(kv_cache.device), shape, kv_cache.dtype)
    else:
        blocks = raw.view(kv_cache.dtype).view(shape)
    first = block_ids[0] if block_ids else 0
    if list(block_ids) == list(range(first, first + len(block_ids))):  # consecutive (a fresh pool's usual
        kv_cache[:, first : first + len(block_ids)].copy_(blocks)  # case): one strided copy, no index
        return
    index = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
    kv_cache.index_copy_(1, index, blocks.to(kv_cache.device))
