"""What the worker processes share: gRPC message limits that fit the largest KV chunk, servers, channels,
the engine's command-line options and the serve-until-signalled loop."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from splitserve.index.config import REDIS_URL_ENV
from splitserve.kvtransfer.chunks import MAX_CHUNK_BYTES
from splitserve.protos import kvtransfer_pb2, kvtransfer_pb2_grpc

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


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=GRPC_OPTIONS)


_PUSH = "/splitserve.v1.KVTransfer/Push"


def add_kvtransfer_servicer(servicer: kvtransfer_pb2_grpc.KVTransferServicer, server: grpc.Server) -> None:
    """Register KVTransfer like the generated helper does, except that Push receives its frames as raw
    bytes (see `frames`) instead of parsed KVChunk messages."""
    handlers = {
        "Reserve": grpc.unary_unary_rpc_method_handler(
            servicer.Reserve, request_deserializer=kvtransfer_pb2.ReserveRequest.FromString,
            response_serializer=kvtransfer_pb2.ReserveReply.SerializeToString,
        ),
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=None,
            response_serializer=kvtransfer_pb2.PushReply.SerializeToString,
        ),
        "Release": grpc.unary_unary_rpc_method_handler(
            servicer.Release, request_deserializer=kvtransfer_pb2.ReleaseRequest.FromString,
            response_serializer=kvtransfer_pb2.ReleaseReply.SerializeToString,
        ),
    }  # fmt: skip
    service = grpc.method_handlers_generic_handler("splitserve.v1.KVTransfer", handlers)
    server.add_generic_rpc_handlers((service,))


def push_stub(ch: grpc.Channel) -> grpc.StreamUnaryMultiCallable:
    """Push taking frames (bytes) as they are: `push_stub(ch)(iter_of_frames) -> PushReply`."""
    reply = kvtransfer_pb2.PushReply.FromString
    return ch.stream_unary(_PUSH, request_serializer=None, response_deserializer=reply)


def serve_until_signalled(server: grpc.Server, on_stop: Callable[[], None], grace_s: float = 5.0) -> None:
    """Run a started server until SIGTERM or SIGINT, then stop it (in-flight RPCs get `grace_s`) and call
    `on_stop` to release what the worker holds."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace_s).wait()
    on_stop()


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every worker process takes: where to serve and how to build its engine."""
    parser.add_argument("--model", required=True, help="Hugging Face-format checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, required=True, help="port to serve on (0: any free port)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-queued-tokens", type=int, default=None,
                        help="refuse new requests (RESOURCE_EXHAUSTED) past this many queued prompt tokens")
    parser.add_argument("--redis-url", default=os.environ.get(REDIS_URL_ENV),
                        help=f"publish this worker and its cached blocks to the prefix index there (default: "
                             f"${REDIS_URL_ENV})")
    parser.add_argument("--worker-id", default=None, help="its name in the index (default: its address)")
    parser.add_argument("--advertise", default=None, metavar="HOST[:PORT]",
                        help="the address routers reach this worker at (default: the bound host:port; "
                             "a host alone takes the bound port)")


def build_engine(args: argparse.Namespace, shared_kv: bool = False):
    """The engine described by `add_worker_arguments`' options (imports torch). `shared_kv`: CPU caches
    in shared memory, for the same-host transfer path."""
    from splitserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from splitserve.engine.engine import Engine

    return Engine(EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks, shared_memory=shared_kv),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs),
    ))  # fmt: skip


def run_worker(
    name: str, args: argparse.Namespace, add_services: Callable, close: Callable[[], None], loop=None, role=""
):
    """Bind, start, register with the prefix index when `--redis-url` is given (the engine `loop`'s block
    events become index records; `role` is the worker's pool), announce the port on stdout ("<name>
    listening on HOST:PORT", for supervisors and tests), serve until SIGTERM/SIGINT, then stop, leave the
    index and `close`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    tune_malloc_for_transfers()
    server, port = make_server(f"{args.host}:{args.port}")
    add_services(server)
    server.start()
    address = advertised_address(args.advertise, args.host, port)
    publisher = start_publisher(args, loop, role, address) if args.redis_url else None
    print(f"{name} listening on {args.host}:{port}", flush=True)

    def stop() -> None:
        if publisher is not None:
            publisher.stop()
        close()

    serve_until_signalled(server, stop)


def advertised_address(advertise: str | None, host: str, port: int) -> str:
    """Where others reach a server bound to `host:port`: `advertise` as given when it names a port,
    `advertise:port` when it is a host alone (a supervisor knows the node's address, not the port)."""
    if not advertise:
        return f"{host}:{port}"
    if advertise.startswith("["):  # [IPv6] or [IPv6]:port
        return advertise if "]:" in advertise else f"{advertise}:{port}"
    return advertise if ":" in advertise else f"{advertise}:{port}"


def compute_device(engine) -> str:
    """What the engine computes on, as routers compare it: "cuda:<GPU UUID>" (two processes on one GPU
    share it) or "cpu:<host id>" (processes on one host share its cores)."""
    import torch

    from splitserve.kvtransfer.same_host import host_id

    device = engine.runner.device
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_properties(device).uuid}"
    return f"{device.type}:{host_id()}"


def start_publisher(args: argparse.Namespace, loop, role: str, address: str):
    """Publish the worker (`role`, `address`) and its engine's block events to the index at
    `args.redis_url`; a Redis outage never blocks the engine (see `index.publisher`)."""
    from splitserve.index.config import IndexConfig
    from splitserve.index.publisher import IndexPublisher
    from splitserve.index.schema import WorkerInfo, probe_hash

    engine = loop.engine
    block_size = engine.config.cache.block_size
    info = WorkerInfo(args.worker_id or address, role, address, engine.model_id, block_size,
                      probe_hash(engine.model_id, block_size), compute_device(engine))  # fmt: skip
    publisher = IndexPublisher(IndexConfig(args.redis_url), info,
                               lambda: loop.call(engine.block_pool.cached_hashes))  # fmt: skip
    loop.call(engine.block_pool.add_listener, publisher.on_block_event)
    publisher.start()
    return publisher
