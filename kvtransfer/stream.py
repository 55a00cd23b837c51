"""A request's KV between two engines' caches, as chunks: the sending iterator and the receiving sink.

The sender reads blocks [first_block, num_blocks) of a request from its per-layer caches, layer by
layer, into bounded chunks sent as frames (`frames`: protobuf-compatible, payload never copied by
protobuf); the receiver validates each (`ChunkValidator`) and writes it into the blocks reserved for the
request, or copies them from the sender's cache on the same host (`same_host`). Transport-free: the
services move the chunks; both ends are engines' `kv_caches` and block ids.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from splitserve.kvtransfer.chunks import (
    ChunkSpan,
    ChunkValidator,
    chunk_header,
)
from splitserve.kvtransfer.errors import MalformedChunk, SinkClosed
from splitserve.kvtransfer.frames import encode_frame
from splitserve.kvtransfer.same_host import SourceMaps, copy_blocks
from splitserve.kvtransfer.tensors import wire_payload, write_blocks
from splitserve.protos import common_pb2, kvtransfer_pb2

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def kv_layout(kv_caches: list[torch.Tensor], model_id: str) -> common_pb2.KVLayout:
    """The layout of an engine's per-layer caches [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    _, _, block_size, num_kv_heads, head_dim = kv_caches[0].shape
    return common_pb2.KVLayout(
        model_id=model_id, num_layers=len(kv_caches), num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=_DTYPE_NAMES[kv_caches[0].dtype],
    )  # fmt: skip


def wire_frame(
    cache: torch.Tensor,
    ids: Sequence[int],
    lease_id: str,
    seq: int,
    span: ChunkSpan,
    last: bool,
    after: torch.cuda.Event | None = None,
    num_lanes: int = 1,
    encoding: str = "",
) -> bytes:
    """The frame of one chunk: blocks `ids` of one layer's cache (once `after` has fired) on the host in
    the wire `encoding`, checksummed (on the device on CUDA), on its layer's lane of `num_lanes`."""
    with wire_payload(cache, ids, after, encoding) as (payload, fletcher):
        header = chunk_header(lease_id, seq, span, payload, last, num_lanes, encoding, fletcher)
        return encode_frame(header, payload)


class ChunkSink:
    """Writes a request's validated chunks into its reserved blocks: a wire chunk's bytes, or a
    same-host chunk's blocks copied from the sender's cache (mapped through `sources`). `accept` raises
    `MalformedChunk` or `CorruptChunk` before writing anything of a bad chunk, and `SinkClosed` once
    `close` was called. Thread-safe: the lanes of a striped transfer are stored side by side (checksum
    and copy outside the lock); `close` waits for the chunks being written, after which none is."""

    def __init__(
        self,
        kv_caches: list[torch.Tensor],
        layout: common_pb2.KVLayout,
        block_ids: Sequence[int],
        first_block: int,
        sources: SourceMaps | None = None,
    ) -> None:
        self.kv_caches = kv_caches
        self.block_ids = list(block_ids)
        self.validator = ChunkValidator(layout, first_block, len(block_ids) - first_block)
        self.sources = sources
        self._source_caches: list[torch.Tensor] | None = None
        self._lock = threading.Condition()
        self._writing = 0  # chunks being stored now
        self.closed = False  # the lease ended: its blocks may belong to another request now

    @property
    def complete(self) -> bool:
        """Every block of every layer stored (admitted, and none still being written)."""
        with self._lock:
            return self.validator.complete and self._writing == 0

    def accept(self, header: kvtransfer_pb2.KVChunk, payload: bytes | memoryview) -> None:
        """Validate and store one chunk (a frame decoded by `frames.decode_frame`)."""
        if header.src_block_ids:  # cheap, and first: a corrupted id must read as corruption, not range
            self.validator.verify(header, payload)
        with self._lock:
            if self.closed:
                raise SinkClosed("the transfer's lease ended")
            if header.HasField("source") and header.seq == 0:
                if self.sources is None:
                    raise MalformedChunk("this receiver takes no same-host transfers")
                self._source_caches = self.sources.caches(header.source)
            if header.src_block_ids and self._source_caches is not None:
                limit = self._source_caches[0].shape[1]
                if max(header.src_block_ids) >= limit:
                    raise MalformedChunk(f"source block {max(header.src_block_ids)} of a {limit}-block cache")
            span = self.validator.admit(header, payload)
            self._writing += 1
        try:  # a bad checksum fails the whole transfer
            ids = self.block_ids[span.first_block : span.first_block + span.num_blocks]
            cache = self.kv_caches[span.layer]
            if header.src_block_ids:
                self.validator.verify(header, payload)
                copy_blocks(cache, ids, self._source_caches[span.layer], list(header.src_block_ids))
            elif header.HasField("fletcher") and cache.is_cuda:  # checked on the device, before storing
                write_blocks(cache, ids, payload, header.encoding, header.fletcher)
            else:
                self.validator.verify(header, payload)
                write_blocks(cache, ids, payload, header.encoding)
        finally:
            with self._lock:
                self._writing -= 1
                self._lock.notify_all()

    def close(self) -> None:
        """No chunk is stored from now on: waits for those being stored."""
        with self._lock:
            self.closed = True
            self._lock.wait_for(lambda: self._writing == 0)
