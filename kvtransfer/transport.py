"""gRPC settings shared by the workers: message limits that fit the largest KV chunk, servers, channels."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from splitserve.kvtransfer.chunks import MAX_CHUNK_BYTES

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + 2**20),  # a chunk plus its framing
    ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 2**20),
]


def make_server(address: str, max_workers: int = 32) -> tuple[grpc.Server, int]:
    """An unstarted server bound to `address` (host:port; port 0 picks a free one). Returns it and the
    bound port. Raises RuntimeError when the address cannot be bound."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {address}")
    return server, port


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=GRPC_OPTIONS)


def serve_until_signalled(server: grpc.Server, on_stop: Callable[[], None], grace_s: float = 5.0) -> None:
    """Run a started server until SIGTERM or SIGINT, then stop it (in-flight RPCs get `grace_s`) and call
    `on_stop` to release what the worker holds."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace_s).wait()
    on_stop()
