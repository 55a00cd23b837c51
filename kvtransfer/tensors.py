"""KV blocks of one layer's paged cache as the transfer's raw bytes, and back.

One layer's cache is [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V, as in
`engine.attention`); the bytes of n blocks are that tensor's [2, n, ...] slice in native (little-endian)
order, the layout `chunks` documents. With the "fp8_e4m3" wire encoding they are instead 2 × n float32
scales (each K or V block's absolute maximum / 448, e4m3's largest value) and then the [2, n, ...] values
divided by their block's scale as FP8 e4m3: a byte per value, quantized on the sending device.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from splitserve.kvtransfer.errors import CorruptChunk

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
    """The K and V of `block_ids` (in that order) as bytes on the host, in the wire `encoding` (a buffer
    of its own; `wire_payload` is the senders' form, without the copy on CUDA)."""
    with wire_payload(kv_cache, block_ids, after, encoding) as (payload, _):
        return memoryview(bytes(payload)) if kv_cache.device.type == "cuda" else payload


@contextlib.contextmanager
def wire_payload(
    kv_cache: torch.Tensor, block_ids: Sequence[int], after: torch.cuda.Event | None = None,
    encoding: str = "",
) -> Iterator[tuple[memoryview, int | None]]:
    """The bytes of `read_blocks` and, on CUDA, their `fletcher` checksum computed on the device beside
    the gather (None on CPU: the sender takes the payload's CRC-32 on the host instead). On CUDA the
    gather (and the encoding), the checksum and the copy to pinned memory run on a side stream once
    `after` (e.g. the end of the layer's forward) has fired, so they never wait behind the rest of a
    running step; the bytes are on the host on entry, in a pinned staging buffer that is reused after
    the block (frame them inside it)."""
    index = torch.tensor(block_ids, dtype=torch.int64)
    if kv_cache.device.type != "cuda":
        if encoding:
            yield memoryview(fp8_encode(kv_cache.index_select(1, index)).numpy()), None
            return
        out = bytearray(blocks_nbytes(kv_cache, len(block_ids)))
        dst = torch.frombuffer(out, dtype=torch.uint8).view(kv_cache.dtype)
        torch.index_select(kv_cache, 1, index, out=dst.view(2, len(block_ids), *kv_cache.shape[2:]))
        yield memoryview(out), None
        return
    side = _side_stream(kv_cache.device)
    with _staging.buffer(blocks_nbytes(kv_cache, len(block_ids), encoding) + 16) as host:
        with torch.cuda.stream(side):
            if after is not None:
                side.wait_event(after)
            blocks = kv_cache.index_select(1, index.to(kv_cache.device, non_blocking=True))
            payload = fp8_encode(blocks) if encoding else blocks.reshape(-1).view(torch.uint8)
            sums = fletcher_sums(payload)
            host[: payload.numel()].copy_(payload, non_blocking=True)
            host[payload.numel() :].view(torch.int64).copy_(sums, non_blocking=True)
        side.synchronize()
        s1, s2 = host[payload.numel() :].view(torch.int64).tolist()
        yield memoryview(host[: payload.numel()].numpy()), s1 << 32 | s2


class _PinnedBuffers:
    """Pinned host buffers, reused (pinning memory costs far more than copying a chunk into it): at most
    `keep` kept free, each grown to the largest chunk staged."""

    def __init__(self, keep: int = 8) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._keep = keep

    @contextlib.contextmanager
    def buffer(self, nbytes: int) -> Iterator[torch.Tensor]:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 2**20), dtype=torch.uint8, pin_memory=True)
        try:
            yield buf[:nbytes]
        finally:
            with self._lock:
                if len(self._free) < self._keep:
                    self._free.append(buf)


_staging = _PinnedBuffers()
_side_streams = threading.local()  # per thread, per device: the stream its reads run on


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    streams = _side_streams.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


FLETCHER_PRIME = 2**31 - 1
_ROW = 2**15  # words per row of the blocked sums: a row's sum of (j + 1) * w_j stays below 2^63
_positions: dict[torch.device, torch.Tensor] = {}  # per device: 1 .. _ROW (int64)


def fletcher_sums(data: torch.Tensor) -> torch.Tensor:
    """The two sums of `KVChunk.fletcher` over `data` (uint8, 1-D, on any device), computed there: an
    int64 tensor [s1, s2]. The words are summed in rows of `_ROW`, unreduced (row sums stay far below
    2^63), and reduced once per row: s2 = sum over rows r of (r * _ROW * rowsum_r + inner_r) mod p."""
    words = _words(data).view(-1, _ROW)
    positions = _positions.get(data.device)
    if positions is None:
        positions = _positions[data.device] = torch.arange(1, _ROW + 1, dtype=torch.int64, device=data.device)
    rows, inner = words.sum(1), (words * positions).sum(1)
    offsets = torch.arange(rows.numel(), dtype=torch.int64, device=data.device) * _ROW % FLETCHER_PRIME
    s1 = rows.sum() % FLETCHER_PRIME
    s2 = (offsets * (rows % FLETCHER_PRIME) % FLETCHER_PRIME + inner % FLETCHER_PRIME).sum() % FLETCHER_PRIME
    return torch.stack((s1, s2))


def _words(data: torch.Tensor) -> torch.Tensor:
    """`data`'s little-endian 32-bit words as int64, zero-padded to whole rows of `_ROW`."""
    if data.numel() % (4 * _ROW) == 0 and data.storage_offset() % 4 == 0 and data.data_ptr() % 4 == 0:
        return data.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # whole rows already (4 MiB chunks)
    padded = data.new_zeros(data.numel() + -data.numel() % (4 * _ROW))  # aligned for the 32-bit view
    padded[: data.numel()] = data
    return padded.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def fletcher(data: torch.Tensor) -> int:
    """`KVChunk.fletcher` of `data` (uint8, 1-D): s1 << 32 | s2. On the host, by numpy's integer matmul
    (the same blocked sums, several times faster than torch's on a CPU)."""
    if data.device.type != "cpu":
        s1, s2 = fletcher_sums(data).tolist()
        return s1 << 32 | s2
    raw = data.numpy()
    whole = raw.size // (4 * _ROW) * 4 * _ROW
    tail = np.zeros(_ROW if whole < raw.size else 0, dtype=np.uint32)  # the last row, zero-padded
    tail.view(np.uint8)[: raw.size - whole] = raw[whole:]
    rows = np.concatenate((raw[:whole].view(np.uint32), tail)).reshape(-1, _ROW).astype(np.uint64)
    sums, inner = rows.sum(1), rows @ np.arange(1, _ROW + 1, dtype=np.uint64)
    s1 = int(sums.sum()) % FLETCHER_PRIME
    s2 = sum(r * _ROW * int(t) + int(i) for r, (t, i) in enumerate(zip(sums, inner, strict=True)))
    return s1 << 32 | s2 % FLETCHER_PRIME


def blocks_nbytes(kv_cache: torch.Tensor, num_blocks: int, encoding: str = "") -> int:
    """Bytes of `num_blocks` blocks of this cache as `read_blocks` returns them in `encoding`."""
    values = 2 * num_blocks * kv_cache[0, 0].numel()
    return values + 2 * 4 * num_blocks if encoding else values * kv_cache.element_size()


def host_bytes(data: bytes | memoryview) -> torch.Tensor:
    """A uint8 tensor over `data`'s memory (no copy); it must only be read."""
    if not len(data):
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only bytes: torch warns, but the view is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def write_blocks(
    kv_cache: torch.Tensor, block_ids: Sequence[int], data: bytes | memoryview, encoding: str = "",
    fletcher_sum: int | None = None,
) -> None:
    """Store bytes from `read_blocks` (of a cache with the same layout, in `encoding`) into `block_ids`.
    With `fletcher_sum` (the chunk's `fletcher`), the bytes are checked where they land first — on the
    cache's device — and `CorruptChunk` is raised before any block is written."""
    shape = (2, len(block_ids), *kv_cache.shape[2:])
    expected = blocks_nbytes(kv_cache, len(block_ids), encoding)
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes for {len(block_ids)} blocks of this cache; expected {expected}")
    raw = host_bytes(data)
    if fletcher_sum is not None:
        raw = raw.to(kv_cache.device)
        if fletcher(raw) != fletcher_sum:
            raise CorruptChunk("a KV chunk fails its checksum")
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
