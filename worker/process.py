"""A worker process's setup, shared by `python -m splitserve.prefill_worker` and `...decode_worker`: its
command line, its engine, its gRPC server, its registration in the prefix index, and serving until
SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable

import grpc

from splitserve.index.config import REDIS_URL_ENV
from splitserve.kvtransfer.transport import make_server, tune_malloc_for_transfers
from splitserve.worker.options import EngineOptions


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
    """Options every worker process takes: its checkpoint, where to serve, its engine (`EngineOptions`),
    its queue bound and its place in the prefix index."""
    parser.add_argument("--model", required=True, help="Hugging Face-format checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, required=True, help="port to serve on (0: any free port)")
    EngineOptions.add_arguments(parser)
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

    opts = EngineOptions.from_args(args)
    return Engine(EngineConfig(
        model=args.model, dtype=opts.dtype, device=opts.device, max_model_len=opts.max_model_len,
        cache=CacheConfig(block_size=opts.block_size, num_blocks=opts.num_blocks, shared_memory=shared_kv,
                          host_kv_gib=opts.cpu_kv_gb),
        scheduler=SchedulerConfig(max_num_seqs=opts.max_num_seqs),
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

    device = engine.device
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
                               lambda: loop.call(engine.block_pool.holdings))  # fmt: skip
    loop.call(engine.block_pool.add_listener, publisher.on_block_event)
    publisher.start()
    return publisher
