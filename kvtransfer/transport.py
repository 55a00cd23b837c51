"""What the worker processes share: gRPC message limits that fit the largest KV chunk, servers, channels,
the engine's command-line options and the serve-until-signalled loop."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from splitserve.kvtransfer.chunks import MAX_CHUNK_BYTES
from splitserve.protos import kvtransfer_pb2, kvtransfer_pb2_grpc

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + 2**20),  # a chunk plus its framing
    ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 2**20),
]


def make_server(address: str, max_workers: int = 256) -> tuple[grpc.Server, int]:
    """An unstarted server bound to `address` (host:port; port 0 picks a free one). Returns it and the
    bound port. Raises RuntimeError when the address cannot be bound. The synchronous server holds one
    thread per running RPC (a Generate stream holds its thread until the request ends), so
    `max_workers` must exceed the streams a worker serves at once plus its transfers."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
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


def run_worker(name: str, args: argparse.Namespace, add_services: Callable, close: Callable[[], None]):
    """Bind, start, announce the port on stdout ("<name> listening on HOST:PORT", for supervisors and
    tests), serve until SIGTERM/SIGINT, then stop and `close`."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    server, port = make_server(f"{args.host}:{args.port}")
    add_services(server)
    server.start()
    print(f"{name} listening on {args.host}:{port}", flush=True)
    serve_until_signalled(server, close)
