"""Iterate on a helper thread, a bounded number of items ahead of the consumer.

Both ends of a KV push use it so that their work overlaps the wire's: the sender prepares frames (gather,
copy from the device, checksum: they release the GIL) while gRPC sends the previous one, and the receiver
takes the next frame off the stream (grpcio's server reads a message only when asked) while it checks and
stores the current one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def read_ahead(
    items: Iterable[T], depth: int = 2, name: str = "read-ahead", wait: bool = True
) -> Iterator[T]:
    """`items`, produced on a helper thread at most `depth` ahead. An error raised by `items` is raised
    here, where the consumer would have met it; when the consumer stops early (or fails), the helper
    drops what it has and ends once `items` yields again or ends — waited for when `wait`; a gRPC request
    stream's helper is not (its next message may come only once the RPC ends, which waits for the
    consumer: its pending read then fails and the helper ends)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item) -> bool:  # False once the consumer has stopped
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(item, timeout=0.1)
                return True
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the consumer, which fails with it
            offer(exc)

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if wait:
            producer.join()
