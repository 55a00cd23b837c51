"""The wire format of a KV transfer: planning bounded chunks, encoding them, and validating them on receipt.

A transfer moves `num_blocks` consecutive blocks of a request (counted from its `first_block`: the
receiver's prefix hits are skipped) for every layer; the sender sends each layer's blocks as soon as it
has computed them, so layer L travels while layer L+1 is computed. A chunk holds whole blocks of one
layer, K then V, raw little-endian bytes laid out [2, num_blocks, block_size, num_kv_heads, head_dim],
with a CRC-32 of the bytes (integrity against corruption in transit, not authentication) — or, on the
same host, the sender's block ids to copy from (`same_host`), with a CRC-32 of those ids. A GPU sender
checksums the bytes on the device instead (`KVChunk.fletcher`, see `tensors`). Torch-free but for checking
that checksum on the host: tensors are turned into bytes by the workers.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from dataclasses import dataclass

from splitserve.kvtransfer.errors import CorruptChunk, LayoutMismatch, MalformedChunk
from splitserve.protos import common_pb2, kvtransfer_pb2

DEFAULT_CHUNK_BYTES = 4 * 2**20
MAX_CHUNK_BYTES = 64 * 2**20  # the receiver's hard limit, whatever the sender was configured with
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LAYOUT_FIELDS = ("model_id", "num_layers", "num_kv_heads", "head_dim", "block_size", "dtype")


WIRE_ENCODINGS = ("", "fp8_e4m3")  # see KVChunk.encoding


def block_bytes(layout: common_pb2.KVLayout, encoding: str = "") -> int:
    """Bytes of one block of one layer, K and V, as the cache holds them (or on the wire in `encoding`)."""
    values = 2 * layout.block_size * layout.num_kv_heads * layout.head_dim
    if encoding == "fp8_e4m3":
        return values + 2 * 4  # a byte per value, a float32 scale for each of K and V
    return values * DTYPE_BYTES[layout.dtype]


def check_layout(ours: common_pb2.KVLayout, theirs: common_pb2.KVLayout) -> None:
    """Raise `LayoutMismatch` naming every field that differs."""
    if theirs.dtype not in DTYPE_BYTES:
        raise LayoutMismatch(f"unsupported KV dtype {theirs.dtype!r}")
    diffs = [
        f"{f}: ours {getattr(ours, f)!r}, theirs {getattr(theirs, f)!r}"
        for f in _LAYOUT_FIELDS
        if getattr(ours, f) != getattr(theirs, f)
    ]
    if diffs:
        raise LayoutMismatch("KV layouts differ: " + "; ".join(diffs))


@dataclass(frozen=True)
class ChunkSpan:
    layer: int
    first_block: int
    num_blocks: int


def plan_chunks(
    layout: common_pb2.KVLayout,
    first_block: int,
    num_blocks: int,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    layers: range | None = None,
) -> list[ChunkSpan]:
    """Blocks [first_block, first_block + num_blocks) of `layers` (default: all) as chunks in sending
    order: layer by layer, each at most `max_chunk_bytes` (and at least one block). Raises ValueError
    when one block does not fit."""
    per_block = block_bytes(layout)
    if per_block > max_chunk_bytes:
        raise ValueError(f"one block ({per_block} bytes) exceeds the chunk limit of {max_chunk_bytes} bytes")
    step = max_chunk_bytes // per_block
    end = first_block + num_blocks
    return [
        ChunkSpan(layer, start, min(step, end - start))
        for layer in (range(layout.num_layers) if layers is None else layers)
        for start in range(first_block, end, step)
    ]


def chunk_header(
    lease_id: str, seq: int, span: ChunkSpan, payload: bytes | bytearray | memoryview, last: bool,
    num_lanes: int = 1, encoding: str = "", fletcher: int | None = None,
) -> kvtransfer_pb2.KVChunk:
    """A chunk's fields without its data (as `frames` sends it), with its checksum: `fletcher` when the
    sender computed it on the device, else the payload's CRC-32; its lane is its layer's (`lane_of`)."""
    header = kvtransfer_pb2.KVChunk(
        lease_id=lease_id, seq=seq, layer=span.layer, first_block=span.first_block,
        num_blocks=span.num_blocks, last=last,
        lane=lane_of(span.layer, num_lanes), num_lanes=num_lanes, encoding=encoding,
    )  # fmt: skip
    if fletcher is None:
        header.crc32 = zlib.crc32(payload)
    else:
        header.fletcher = fletcher
    return header


def same_host_header(
    lease_id: str, seq: int, span: ChunkSpan, src_block_ids, last: bool,
    source: kvtransfer_pb2.KVSource | None = None,
) -> kvtransfer_pb2.KVChunk:
    """A same-host chunk: the sender's blocks holding `span`, their ids checksummed; `source` (the
    sender's exported cache) on chunk 0."""
    header = kvtransfer_pb2.KVChunk(
        lease_id=lease_id, seq=seq, layer=span.layer, first_block=span.first_block,
        num_blocks=span.num_blocks, last=last, src_block_ids=src_block_ids, crc32=ids_crc32(src_block_ids),
    )  # fmt: skip
    if source is not None:
        header.source.CopyFrom(source)
    return header


def ids_crc32(block_ids) -> int:
    """A same-host chunk's checksum: CRC-32 of its source block ids (uint32, little-endian), so that a
    corrupted id cannot make the receiver copy another request's block."""
    return zlib.crc32(array("I", block_ids).tobytes() if sys.byteorder == "little" else
                      struct.pack(f"<{len(block_ids)}I", *block_ids))  # fmt: skip


def lane_of(layer: int, num_lanes: int) -> int:
    """The lane (Push stream) a layer's chunks travel on when a transfer is striped over `num_lanes`."""
    return layer % max(1, num_lanes)


def encode_chunk(lease_id: str, seq: int, span: ChunkSpan, data: bytes, last: bool) -> kvtransfer_pb2.KVChunk:
    """A whole KVChunk message, data included (what a generated stub would send)."""
    chunk = chunk_header(lease_id, seq, span, data, last)
    chunk.data = data
    return chunk


class ChunkValidator:
    """The receiver's checks, chunk by chunk, for one lease: sequence numbers without gaps (per lane),
    spans inside the reserved range, each (layer, block) sent once, each layer on its lane, one number of
    lanes and one kind of chunk throughout (bytes over the wire, or block ids of a same-host source named
    on chunk 0), sizes exact, checksums right, and a lane's `last` chunk completing that lane's layers.
    Raises `MalformedChunk` or `CorruptChunk`; changes nothing on error. `accept` checks a chunk whole;
    `admit` then `verify` split it for receivers that store lanes side by side: the bookkeeping (under
    the receiver's lock) apart from the checksum (outside it)."""

    def __init__(self, layout: common_pb2.KVLayout, first_block: int, num_blocks: int) -> None:
        self.layout = layout
        self.first_block = first_block
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes(layout)
        self.next_seq = 0  # chunks accepted, over every lane
        self.bytes_received = 0
        self.same_host: bool | None = None  # fixed by chunk 0
        self.num_lanes: int | None = None  # fixed by the first chunk
        self._lane_seq: dict[int, int] = {}  # lane → its next sequence number
        self._lane_done: set[int] = set()  # lanes whose last chunk arrived
        self._next_block = [first_block] * layout.num_layers  # per layer: chunks arrive in block order

    @property
    def complete(self) -> bool:
        return all(b == self.first_block + self.num_blocks for b in self._next_block)

    def lane_done(self, lane: int) -> bool:
        return lane in self._lane_done

    def accept(self, chunk: kvtransfer_pb2.KVChunk, payload: bytes | memoryview | None = None) -> ChunkSpan:
        """Check one chunk; `payload` is its KV bytes when they travel outside the message (a frame),
        else `chunk.data`."""
        data = chunk.data if payload is None else payload
        self._check(chunk, data)
        self.verify(chunk, data)
        return self._advance(chunk)

    def admit(self, chunk: kvtransfer_pb2.KVChunk, payload: bytes | memoryview) -> ChunkSpan:
        """`accept` without the checksum: call `verify` before the bytes are used."""
        self._check(chunk, payload)
        return self._advance(chunk)

    def verify(self, chunk: kvtransfer_pb2.KVChunk, data: bytes | memoryview) -> None:
        """The checksum of a wire chunk's bytes, or of a same-host chunk's source block ids. A chunk's
        `fletcher` is computed here on the host (with torch); a GPU receiver checks it on the device
        instead, where the bytes land (`tensors.write_blocks`)."""
        if chunk.HasField("fletcher") and not chunk.src_block_ids:
            from splitserve.kvtransfer.tensors import fletcher, host_bytes  # torch, only for these

            good = fletcher(host_bytes(data)) == chunk.fletcher
        else:
            crc = ids_crc32(chunk.src_block_ids) if chunk.src_block_ids else zlib.crc32(data)
            good = crc == chunk.crc32
        if not good:
            raise CorruptChunk(f"chunk {chunk.seq} (layer {chunk.layer}) fails its checksum")

    def _check(self, chunk: kvtransfer_pb2.KVChunk, data: bytes | memoryview) -> None:
        lanes, lane = max(1, chunk.num_lanes), chunk.lane
        if self.num_lanes is not None and lanes != self.num_lanes:
            raise MalformedChunk(f"a chunk of {lanes} lanes in a transfer of {self.num_lanes}")
        due = self._lane_seq.get(lane, 0)
        if chunk.seq != due:
            where = f" of lane {lane}" if lanes > 1 else ""
            raise MalformedChunk(f"chunk {chunk.seq}{where} arrived where {due} was due")
        if len(data) > MAX_CHUNK_BYTES:
            raise MalformedChunk(f"chunk of {len(data)} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
        if chunk.layer >= self.layout.num_layers:
            raise MalformedChunk(f"layer {chunk.layer} of a {self.layout.num_layers}-layer model")
        expected_start = self._next_block[chunk.layer]
        end, done = chunk.first_block + chunk.num_blocks, self.first_block + self.num_blocks
        if chunk.num_blocks == 0 or chunk.first_block != expected_start or end > done:
            raise MalformedChunk(
                f"layer {chunk.layer}: blocks [{chunk.first_block}, {end}) "
                f"where [{expected_start}, {done}) remain"
            )
        if lane != lane_of(chunk.layer, lanes) or lane in self._lane_done:
            raise MalformedChunk(f"layer {chunk.layer} on lane {lane} of {lanes}")
        self._check_kind(chunk, data)
        lane_layers = range(lane, self.layout.num_layers, lanes)
        others_done = all(self._next_block[i] == done for i in lane_layers if i != chunk.layer)
        if chunk.last and not (others_done and end == done):
            raise MalformedChunk("the last chunk arrived before every block of every layer of its lane")

    def _advance(self, chunk: kvtransfer_pb2.KVChunk) -> ChunkSpan:
        self.same_host = bool(chunk.src_block_ids)
        self.num_lanes = max(1, chunk.num_lanes)
        self._next_block[chunk.layer] = chunk.first_block + chunk.num_blocks
        self._lane_seq[chunk.lane] = chunk.seq + 1
        if chunk.last:
            self._lane_done.add(chunk.lane)
        self.next_seq += 1
        self.bytes_received += chunk.num_blocks * self.block_bytes
        return ChunkSpan(chunk.layer, chunk.first_block, chunk.num_blocks)

    def _check_kind(self, chunk: kvtransfer_pb2.KVChunk, data: bytes | memoryview) -> None:
        same_host = bool(chunk.src_block_ids)
        first = self.same_host is None  # the transfer's first chunk, on whichever lane
        if first and same_host != chunk.HasField("source"):
            raise MalformedChunk("a same-host transfer names its source on chunk 0, and only then")
        if not first and (same_host != self.same_host or chunk.HasField("source")):
            raise MalformedChunk("a transfer mixes same-host and wire chunks")
        if same_host:
            if len(data) or len(chunk.src_block_ids) != chunk.num_blocks:
                raise MalformedChunk(
                    f"a same-host chunk of {chunk.num_blocks} blocks names {len(chunk.src_block_ids)} "
                    f"source blocks and carries {len(data)} bytes"
                )
            return
        if chunk.encoding not in WIRE_ENCODINGS:
            raise MalformedChunk(f"unknown KV encoding {chunk.encoding!r}")
        per_block = block_bytes(self.layout, chunk.encoding)
        if len(data) != chunk.num_blocks * per_block:
            raise MalformedChunk(f"{len(data)} bytes for {chunk.num_blocks} blocks of {per_block} bytes")
