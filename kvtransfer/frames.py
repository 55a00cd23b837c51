"""KV chunks on the wire without copying their payload through protobuf.

A frame is a valid protobuf encoding of a `KVChunk`: its header fields, then the `data` field (number 6,
length-delimited) holding the raw KV bytes. The sender writes it with one join (`encode_frame`); the
receiver finds the `data` field by scanning the small header's tags and takes the payload as a
zero-copy view (`decode_frame`), so the bytes are never copied by a protobuf (de)serializer. Any other
valid encoding of a KVChunk (e.g. from a generated stub) decodes too. The Push RPC is registered with
identity (de)serializers for its request stream (`transport.add_kvtransfer_servicer`, `push_stub`).
"""

from __future__ import annotations

from splitserve.kvtransfer.errors import MalformedChunk
from splitserve.protos import kvtransfer_pb2

_DATA_FIELD = 6
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MalformedChunk("truncated or overlong varint in a KV frame")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def encode_frame(header: kvtransfer_pb2.KVChunk, payload: bytes | bytearray | memoryview) -> bytes:
    """`header` (its `data` empty) and the payload as one frame; copies the payload once. Returns `bytes`
    on purpose: grpcio (1.84) sends only `bytes` through an identity serializer (a bytearray or memoryview
    frame fails the RPC), so this one copy cannot be saved by handing gRPC the gathered buffer."""
    return b"".join((header.SerializeToString(), _varint_bytes(_DATA_FIELD << 3 | _LEN),
                     _varint_bytes(len(payload)), payload))  # fmt: skip


def decode_frame(frame: bytes) -> tuple[kvtransfer_pb2.KVChunk, memoryview]:
    """(header without data, payload view). Raises `MalformedChunk` on anything but a KVChunk encoding."""
    pos = 0
    while pos < len(frame):
        field_start = pos
        tag, pos = _read_varint(frame, pos)
        field, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, pos = _read_varint(frame, pos)
        elif wire == _LEN:
            size, pos = _read_varint(frame, pos)
            if pos + size > len(frame):
                raise MalformedChunk("a KV frame's field runs past its end")
            if field == _DATA_FIELD:
                header_bytes = frame[:field_start] + frame[pos + size :]
                return _parse_header(header_bytes), memoryview(frame)[pos : pos + size]
            pos += size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise MalformedChunk(f"unknown wire type {wire} in a KV frame")
    return _parse_header(frame), memoryview(b"")


def _parse_header(header_bytes: bytes) -> kvtransfer_pb2.KVChunk:
    try:
        header = kvtransfer_pb2.KVChunk.FromString(header_bytes)
    except Exception as exc:  # protobuf's DecodeError; any failure means the same to the receiver
        raise MalformedChunk(f"undecodable KV frame header: {exc}") from exc
    if header.data:
        raise MalformedChunk("a KV frame carries its data field twice")
    return header
