"""The gRPC side of moving KV: message limits that fit the largest KV chunk, servers, channels, the KVTransfer
service registration with frame-level (de)serializers, and glibc tuning for KV-frame-sized buffers. The
worker processes' setup is `worker.process`."""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import grpc

from splitserve.kvtransfer.chunks import MAX_CHUNK_BYTES
from splitserve.protos import kvtransfer_pb2

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + 2**20),  # a chunk plus its framing
    ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 2**20),
    # Bulk KV frames (1-16 MiB): a 16 MiB stream lookahead (the flow-control window starts at a frame's size
    # instead of growing to it via BDP probes), HTTP/2 DATA frames up to the protocol maximum (fewer frame
    # headers and wake-ups per message), larger TCP reads (4 MiB target, 1-16 MiB) and a 16 MiB write
    # buffer. Measured as one set, 2-core loopback, 4 MiB frames with crc32 and a copy at each end: +5-20%
    # throughput in each of 4 interleaved runs (0.91 -> 0.99 GB/s on a quiet box), CPU per GB -3..-7%; no
    # single option of the set stood out of the noise. Fixing the windows instead (bdp_probe off, 64 MiB
    # initial windows) measured 10% slower.
    ("grpc.http2.lookahead_bytes", 16 * 2**20),
    ("grpc.http2.max_frame_size", 16 * 2**20 - 1),
    ("grpc.experimental.tcp_read_chunk_size", 4 * 2**20),
    ("grpc.experimental.tcp_min_read_chunk_size", 2**20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 * 2**20),
    ("grpc.http2.write_buffer_size", 16 * 2**20),
]


# gRPC servers set SO_REUSEPORT by default: a second server on a taken port would bind it too and the kernel
# would share the connections between the two (another cluster's router answering half the clients). Off:
# a taken port is an error at start.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


# glibc malloc in the worker processes. A Push moves 1-16 MiB frames through fresh buffers: gRPC's read
# slices, the `bytes` grpcio hands the servicer, the sender's `encode_frame` join. With glibc's defaults that
# memory goes back to the kernel when freed, so every frame page-faults in and is zeroed again (page faults,
# clear_page and unmapping: ~25% of the receiver's CPU in `perf`). Serving such buffers from the heap and
# not trimming it eagerly, 2-core loopback microbenchmark (4 MiB frames, crc32 + one copy at each end):
# throughput +8-30% (0.66 -> 0.87 GB/s), CPU per GB (sender + receiver) -6..-19% over three interleaved
# runs; pure transport (no checksum or copy) 0.97 -> 1.48 GB/s.
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum; above the largest chunk the senders are configured with
_TRIM_THRESHOLD = 256 * 2**20  # freed memory an arena may keep resident (1 GiB measured no better)


def tune_malloc_for_transfers() -> bool:
    """Make glibc serve KV-frame-sized buffers from its heap (see above). Both thresholds must be set:
    either alone fixes the other at its small default and measured slower than neither. A no-op (False)
    when they are set in the environment already or the C library is not glibc."""
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and mmap_set


def make_server(address: str, max_workers: int = 1024) -> tuple[grpc.Server, int]:
    """An unstarted server bound to `address` (host:port; port 0 picks a free one). Returns it and the
    bound port. Raises RuntimeError when the address cannot be bound. The synchronous server holds one
    thread per running RPC (a Generate stream holds its thread until the request ends), so
    `max_workers` must exceed the streams a worker serves at once plus its transfers."""
    options = [*GRPC_OPTIONS, *SERVER_OPTIONS]
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers), options=options)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {address}")
    return server, port


def channel(address: str, lane: int = 0) -> grpc.Channel:
    """A channel to `address`; channels of different `lane`s never share a connection (grpcio shares
    one between channels of equal options), so a striped transfer's lanes travel side by side."""
    return grpc.insecure_channel(address, options=[*GRPC_OPTIONS, ("splitserve.kv_lane", lane)])


_PUSH = "/splitserve.v1.KVTransfer/Push"


def add_kvtransfer_servicer(servicer, server: grpc.Server) -> None:
    """Register the KVTransfer methods `servicer` has (a receiver of pushes has Reserve, Push and Release;
    every worker has Fetch) like the generated helper does, except that Push's request stream and Fetch's
    reply stream carry frames as raw bytes (see `frames`) instead of parsed KVChunk messages."""
    kinds = {
        "Reserve": grpc.unary_unary_rpc_method_handler(
            getattr(servicer, "Reserve", None), request_deserializer=kvtransfer_pb2.ReserveRequest.FromString,
            response_serializer=kvtransfer_pb2.ReserveReply.SerializeToString,
        ),
        "Push": grpc.stream_unary_rpc_method_handler(
            getattr(servicer, "Push", None), request_deserializer=None,
            response_serializer=kvtransfer_pb2.PushReply.SerializeToString,
        ),
        "Release": grpc.unary_unary_rpc_method_handler(
            getattr(servicer, "Release", None), request_deserializer=kvtransfer_pb2.ReleaseRequest.FromString,
            response_serializer=kvtransfer_pb2.ReleaseReply.SerializeToString,
        ),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            getattr(servicer, "Fetch", None), request_deserializer=kvtransfer_pb2.FetchRequest.FromString,
            response_serializer=None,
        ),
    }  # fmt: skip
    handlers = {name: handler for name, handler in kinds.items() if hasattr(servicer, name)}
    service = grpc.method_handlers_generic_handler("splitserve.v1.KVTransfer", handlers)
    server.add_generic_rpc_handlers((service,))


def push_stub(ch: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """Push taking frames (bytes) as they are: `push_stub(ch)(iter_of_frames) -> PushReply`."""
    reply = kvtransfer_pb2.PushReply.FromString
    return ch.stream_unary(_PUSH, request_serializer=None, response_deserializer=reply)
