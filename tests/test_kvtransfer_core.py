"""The KV transfer's wire format and leases, without a network: chunk planning, encode → validate →
write round trips between caches with different block ids, every rejection, and lease endings."""

from __future__ import annotations

import re

import pytest
import torch

from splitserve.kvtransfer.chunks import (
    ChunkValidator,
    block_bytes,
    check_layout,
    chunk_header,
    encode_chunk,
    plan_chunks,
)
from splitserve.kvtransfer.errors import CorruptChunk, LayoutMismatch, LeaseNotFound, MalformedChunk
from splitserve.kvtransfer.leases import LeaseTable, TransferState
from splitserve.kvtransfer.tensors import (
    FLETCHER_PRIME,
    fletcher,
    host_bytes,
    read_blocks,
    wire_payload,
    write_blocks,
)
from splitserve.protos.common_pb2 import KVLayout

LAYOUT = KVLayout(model_id="m", num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="bfloat16")
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def caches(layout: KVLayout, num_blocks: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    dtype = TORCH_DTYPES[layout.dtype]
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(layout.num_layers)]


def transfer_chunks(layout, src, src_blocks, first_block, max_bytes):
    """Sender side: chunks for the request's blocks [first_block, len(src_blocks))."""
    spans = plan_chunks(layout, first_block, len(src_blocks) - first_block, max_bytes)
    chunks = []
    for seq, span in enumerate(spans):
        ids = src_blocks[span.first_block : span.first_block + span.num_blocks]
        data = bytes(read_blocks(src[span.layer], ids))
        chunks.append(encode_chunk("lease", seq, span, data, last=seq == len(spans) - 1))
    return chunks


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("max_blocks_per_chunk", [1, 3, 100])
@pytest.mark.parametrize("dst_blocks", [[11, 2, 14, 5, 8], [3, 4, 10, 11, 12]])  # scattered; runs
def test_round_trip_moves_exactly_the_missing_blocks(dtype, max_blocks_per_chunk, dst_blocks):
    layout = KVLayout()
    layout.CopyFrom(LAYOUT)
    layout.dtype = dtype
    src, dst = caches(layout, 12, seed=1), caches(layout, 16, seed=2)
    before = [c.clone() for c in dst]
    src_blocks = [3, 7, 1, 9, 4]  # the request's blocks on each side: these and `dst_blocks`
    first = 2  # the receiver already holds the first two blocks
    chunks = transfer_chunks(layout, src, src_blocks, first, max_blocks_per_chunk * block_bytes(layout))
    assert all(len(c.data) <= max_blocks_per_chunk * block_bytes(layout) for c in chunks)
    assert [c.layer for c in chunks] == sorted(c.layer for c in chunks), "layer by layer"
    validator = ChunkValidator(layout, first, len(src_blocks) - first)
    for chunk in chunks:
        span = validator.accept(chunk)
        blocks = dst_blocks[span.first_block : span.first_block + span.num_blocks]
        write_blocks(dst[span.layer], blocks, chunk.data)
    assert validator.complete and validator.bytes_received == 3 * 3 * block_bytes(layout)
    for layer in range(layout.num_layers):
        for s, d in zip(src_blocks[first:], dst_blocks[first:], strict=True):
            assert torch.equal(dst[layer][:, d], src[layer][:, s])
        untouched = [b for b in range(16) if b not in dst_blocks[first:]]
        assert torch.equal(dst[layer][:, untouched], before[layer][:, untouched])


def chunks_for_rejections():
    src = caches(LAYOUT, 8, seed=3)
    return transfer_chunks(LAYOUT, src, [1, 2, 3, 4], 0, 2 * block_bytes(LAYOUT))  # 2 chunks per layer


def test_a_flipped_byte_is_caught():
    chunks = chunks_for_rejections()
    validator = ChunkValidator(LAYOUT, 0, 4)
    validator.accept(chunks[0])
    bad = bytearray(chunks[1].data)
    bad[17] ^= 0x01
    chunks[1].data = bytes(bad)
    with pytest.raises(CorruptChunk):
        validator.accept(chunks[1])
    assert validator.next_seq == 1 and validator.bytes_received == len(chunks[0].data)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: setattr(c, "seq", 5), "arrived where"),
        (lambda c: setattr(c, "layer", 3), "layer 3 of a 3-layer"),
        (lambda c: setattr(c, "first_block", 1), "blocks [1, 3)"),
        (lambda c: setattr(c, "num_blocks", 3), "512 bytes for 3 blocks"),
        (lambda c: setattr(c, "num_blocks", 5), "blocks [0, 5)"),
        (lambda c: setattr(c, "num_blocks", 0), "blocks [0, 0)"),
        (lambda c: setattr(c, "data", c.data[:-2]), "bytes for 2 blocks"),
        (lambda c: setattr(c, "last", True), "last chunk arrived before"),
    ],
)
def test_malformed_chunks_are_rejected(mutate, message):
    chunk = chunks_for_rejections()[0]
    mutate(chunk)
    validator = ChunkValidator(LAYOUT, 0, 4)
    with pytest.raises(MalformedChunk, match=re.escape(message)):
        validator.accept(chunk)
    assert validator.next_seq == 0 and not validator.complete


def test_oversized_chunk_is_rejected_before_its_checksum_is_computed(monkeypatch):
    import splitserve.kvtransfer.chunks as chunks_module

    monkeypatch.setattr(chunks_module, "MAX_CHUNK_BYTES", 100)
    with pytest.raises(MalformedChunk, match="exceeds"):
        ChunkValidator(LAYOUT, 0, 4).accept(chunks_for_rejections()[0])


def test_a_repeated_span_is_rejected():
    chunks = chunks_for_rejections()
    validator = ChunkValidator(LAYOUT, 0, 4)
    validator.accept(chunks[0])
    first_span = plan_chunks(LAYOUT, 0, 4, 2 * block_bytes(LAYOUT))[0]
    again = encode_chunk("lease", 1, first_span, chunks[0].data, last=False)  # next seq, same blocks
    with pytest.raises(MalformedChunk, match=re.escape("blocks [0, 2) where [2, 4) remain")):
        validator.accept(again)


def test_layout_mismatch_names_every_differing_field():
    other = KVLayout()
    other.CopyFrom(LAYOUT)
    other.head_dim, other.dtype = 16, "float16"
    with pytest.raises(LayoutMismatch, match="head_dim: ours 8, theirs 16; dtype: ours 'bfloat16'"):
        check_layout(LAYOUT, other)
    other.CopyFrom(LAYOUT)
    other.dtype = "int8"
    with pytest.raises(LayoutMismatch, match="unsupported KV dtype"):
        check_layout(LAYOUT, other)
    check_layout(LAYOUT, LAYOUT)


def test_a_block_larger_than_the_chunk_limit_cannot_be_planned():
    with pytest.raises(ValueError, match="exceeds the chunk limit"):
        plan_chunks(LAYOUT, 0, 4, block_bytes(LAYOUT) - 1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leases_end_exactly_once():
    released = []
    clock = Clock()
    table = LeaseTable(released.append, clock)
    acked = table.grant("a", [1, 2], 1, ttl_s=5)
    aborted = table.grant("b", [3], 0, ttl_s=5)
    expiring = table.grant("c", [4, 5, 6], 0, ttl_s=5)
    clock.now += 4
    table.renew(table.get(acked.lease_id))
    assert table.acknowledge(acked.lease_id).state is TransferState.COMPLETE
    table.release(aborted.lease_id, "sender failed")
    clock.now += 1  # c's deadline passes; a was acknowledged before
    assert table.expire_overdue() == [expiring]
    assert [(x.request_id, x.state) for x in released] == [
        ("b", TransferState.ABORTED), ("c", TransferState.EXPIRED),
    ]
    assert len(table) == 0
    for lease in (acked, aborted, expiring):
        with pytest.raises(LeaseNotFound):
            table.release(lease.lease_id, "again")
    assert len(released) == 2


def test_progress_renews_and_shutdown_releases_everything():
    released = []
    clock = Clock()
    table = LeaseTable(released.append, clock)
    lease = table.grant("a", [1], 0, ttl_s=2)
    for _ in range(5):
        clock.now += 1.5
        table.renew(table.get(lease.lease_id))
    assert lease.state is TransferState.RECEIVING and not released
    table.grant("b", [2], 0, ttl_s=2)
    table.release_all("worker stopping")
    assert {x.request_id for x in released} == {"a", "b"} and len(table) == 0
    with pytest.raises(ValueError):
        table.grant("c", [3], 0, ttl_s=0)


def test_frames_round_trip_and_accept_any_kvchunk_encoding():
    from splitserve.kvtransfer.frames import decode_frame, encode_frame
    from splitserve.protos.kvtransfer_pb2 import KVChunk

    payload = bytes(range(256)) * 40
    header = KVChunk(lease_id="l/7", seq=3, layer=1, first_block=2, num_blocks=5, crc32=99, last=True)
    frame = encode_frame(header, payload)
    parsed = KVChunk.FromString(frame)  # a frame is a valid KVChunk for any protobuf parser
    assert parsed.data == payload and parsed.lease_id == "l/7" and parsed.last
    for encoded in (frame, parsed.SerializeToString()):  # ours, and the standard field order
        got_header, got_payload = decode_frame(encoded)
        assert got_header == header and bytes(got_payload) == payload
    empty_header, empty_payload = decode_frame(header.SerializeToString())
    assert empty_header == header and len(empty_payload) == 0


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\x32\x10abc", "runs past its end"),
        (b"\x08\xff\xff", "truncated"),
        (b"\x0b", "unknown wire type 3"),
        (b"\x32\x01a\x32\x01b", "data field twice"),
        (b"\x0a\x05ab", "runs past its end"),
    ],
)
def test_malformed_frames_are_rejected(frame, message):
    from splitserve.kvtransfer.frames import decode_frame

    with pytest.raises(MalformedChunk, match=message):
        decode_frame(frame)


def test_read_ahead_yields_everything_in_order_raises_where_the_source_failed_and_stops_early():
    import threading

    from splitserve.kvtransfer.ahead import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("the source broke")

    got = []
    with pytest.raises(ValueError, match="the source broke"):
        for item in read_ahead(failing()):
            got.append(item)
    assert got == [1]
    produced, released = [], threading.Event()

    def endless():
        try:
            for i in range(10**9):
                produced.append(i)
                yield i
        finally:
            released.set()

    for item in read_ahead(endless(), depth=2):
        if item == 3:
            break  # the consumer stops: the helper ends (waited for) having run at most depth + 2 ahead
    assert released.wait(5) and len(produced) <= 3 + 1 + 2 + 1


def striped_chunks(num_lanes):
    """Per lane, the chunks of a 4-block transfer of LAYOUT (3 layers, 2 chunks each): lane i carries the
    layers l with l % num_lanes == i, with its own sequence numbers and its own last chunk."""
    src = caches(LAYOUT, 8, seed=4)
    lanes = {}
    for span in plan_chunks(LAYOUT, 0, 4, 2 * block_bytes(LAYOUT)):
        lane = span.layer % num_lanes
        ids = [1 + b for b in range(span.first_block, span.first_block + span.num_blocks)]
        data = bytes(read_blocks(src[span.layer], ids))
        chunk = encode_chunk("lease", len(lanes.setdefault(lane, [])), span, data, last=False)
        chunk.lane, chunk.num_lanes = lane, num_lanes
        lanes[lane].append(chunk)
    for chunks in lanes.values():
        chunks[-1].last = True
    return lanes


def test_striped_lanes_are_accepted_interleaved_and_checked_per_lane():
    lanes = striped_chunks(2)  # lane 0: layers 0 and 2 (4 chunks); lane 1: layer 1 (2 chunks)
    validator = ChunkValidator(LAYOUT, 0, 4)
    order = [lanes[1][0], lanes[0][0], lanes[1][1], lanes[0][1], lanes[0][2], lanes[0][3]]
    for chunk in order:
        validator.accept(chunk)
        if chunk is lanes[1][1]:
            assert validator.lane_done(1) and not validator.lane_done(0) and not validator.complete
    assert validator.complete and validator.next_seq == 6
    rejections = [
        (lambda c: (setattr(c, "lane", 1), setattr(c, "seq", 1)), "on lane 1"),  # layer 0 is lane 0's
        (lambda c: setattr(c, "num_lanes", 3), "of 3 lanes in a transfer of 2"),
        (lambda c: setattr(c, "seq", 1), "of lane 0 arrived where 0 was due"),
        (lambda c: setattr(c, "last", True), "before every block of every layer of its lane"),
    ]
    for spoil, message in rejections:
        validator = ChunkValidator(LAYOUT, 0, 4)
        validator.accept(lanes[1][0])  # fixes the number of lanes at 2
        bad = type(lanes[0][0])()
        bad.CopyFrom(lanes[0][0])
        spoil(bad)
        with pytest.raises(MalformedChunk, match=re.escape(message)):
            validator.accept(bad)
        assert validator.next_seq == 1  # nothing changed


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_fp8_wire_encoding_round_trips_within_e4m3_precision_in_half_the_bytes(dtype):
    layout = KVLayout()
    layout.CopyFrom(LAYOUT)
    layout.dtype = dtype
    src, dst = caches(layout, 8, seed=5), caches(layout, 8, seed=6)
    src[0][:, 2] *= 1000.0  # blocks of very different magnitudes keep their own scales
    ids, into = [2, 5, 1], [4, 5, 6]
    data = read_blocks(src[0], ids, encoding="fp8_e4m3")
    values = block_bytes(layout) // TORCH_DTYPES[dtype].itemsize  # a byte each, and two float32 scales
    assert len(data) == 3 * block_bytes(layout, "fp8_e4m3") == 3 * (values + 8)
    write_blocks(dst[0], into, data, encoding="fp8_e4m3")
    for s, d in zip(ids, into, strict=True):
        for kv in (0, 1):
            want, got = src[0][kv, s].float(), dst[0][kv, d].float()
            # e4m3 keeps 3 mantissa bits: each value within 2^-4 of its magnitude, at most of the amax
            assert (got - want).abs().max() <= want.abs().max() * 2**-4 + 1e-30
    span = plan_chunks(layout, 0, 3, 10**6, layers=range(0, 1))[0]
    chunk = encode_chunk("lease", 0, span, bytes(data), False)
    chunk.encoding = "fp8_e4m3"
    ChunkValidator(layout, 0, 3).accept(chunk)  # its size is the encoding's
    chunk.encoding = "int4"
    with pytest.raises(MalformedChunk, match="unknown KV encoding 'int4'"):
        ChunkValidator(layout, 0, 3).accept(chunk)


def reference_fletcher(data: bytes) -> int:
    """`KVChunk.fletcher` as the proto defines it, in plain Python."""
    data += bytes(-len(data) % 4)
    s1 = s2 = 0
    for i in range(0, len(data), 4):
        word = int.from_bytes(data[i : i + 4], "little") % FLETCHER_PRIME
        s1, s2 = (s1 + word) % FLETCHER_PRIME, (s2 + (i // 4 + 1) * word) % FLETCHER_PRIME
    return s1 << 32 | s2


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 1000, 4099])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_the_device_checksum_matches_its_definition_at_any_length_and_alignment(size, offset):
    gen = torch.Generator().manual_seed(size)
    raw = torch.randint(0, 256, (size + offset,), dtype=torch.uint8, generator=gen)
    raw[offset : offset + 4] = 0xFF  # words at and above the prime reduce before they are summed
    data = raw[offset:]  # a view that does not start on a 4-byte boundary when offset is odd
    assert fletcher(data) == reference_fletcher(bytes(data.numpy()))


def test_the_device_checksum_sees_swapped_words_and_a_flipped_bit():
    data = bytes(range(64))
    swapped = data[4:8] + data[:4] + data[8:]  # same words, other order: s2 differs
    flipped = bytearray(data)
    flipped[33] ^= 0x10
    values = {fletcher(host_bytes(d)) for d in (data, swapped, bytes(flipped))}
    assert len(values) == 3


def fletcher_chunk(src, ids):
    span = plan_chunks(LAYOUT, 0, len(ids), 10**6, layers=range(0, 1))[0]
    data = bytes(read_blocks(src[0], ids))
    chunk = chunk_header("lease", 0, span, data, False, fletcher=fletcher(host_bytes(data)))
    chunk.data = data
    return chunk


def test_a_fletcher_chunk_is_checked_on_the_host_and_a_flipped_byte_is_caught():
    chunk = fletcher_chunk(caches(LAYOUT, 8, seed=7), [3, 1])
    assert chunk.crc32 == 0  # the device checksum replaces the host's CRC-32
    ChunkValidator(LAYOUT, 0, 2).accept(chunk)
    bad = bytearray(chunk.data)
    bad[100] ^= 0x01
    chunk.data = bytes(bad)
    with pytest.raises(CorruptChunk):
        ChunkValidator(LAYOUT, 0, 2).accept(chunk)


def test_a_store_checked_where_it_lands_refuses_corrupt_bytes_and_writes_nothing():
    src, dst = caches(LAYOUT, 8, seed=8), caches(LAYOUT, 8, seed=9)
    data = bytearray(read_blocks(src[0], [2, 6]))
    good = fletcher(host_bytes(bytes(data)))
    data[5] ^= 0x80
    before = dst[0].clone()
    with pytest.raises(CorruptChunk):
        write_blocks(dst[0], [0, 1], bytes(data), fletcher_sum=good)
    assert torch.equal(dst[0], before)
    data[5] ^= 0x80
    write_blocks(dst[0], [0, 1], bytes(data), fletcher_sum=good)
    assert torch.equal(dst[0][:, [0, 1]], src[0][:, [2, 6]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device checksum of a GPU sender needs CUDA")
@pytest.mark.parametrize("encoding", ["", "fp8_e4m3"])
def test_a_gpu_payload_carries_its_device_checksum_and_round_trips_checked_on_the_device(encoding):
    src = [c.cuda() for c in caches(LAYOUT, 8, seed=10)]
    dst = [c.cuda() for c in caches(LAYOUT, 8, seed=11)]
    with wire_payload(src[1], [5, 0, 7], encoding=encoding) as (staged, checksum):
        payload = bytes(staged)
    assert checksum == reference_fletcher(bytes(payload))
    write_blocks(dst[1], [1, 2, 3], payload, encoding, fletcher_sum=checksum)
    if not encoding:
        assert torch.equal(dst[1][:, [1, 2, 3]], src[1][:, [5, 0, 7]])
    with pytest.raises(CorruptChunk):
        write_blocks(dst[1], [1, 2, 3], payload, encoding, fletcher_sum=checksum ^ 1)
