"""A worker's block events (prefix-cache stored / evicted), fanned out to Events RPC subscribers.

The block pool calls `publish` on the engine's loop thread; it never blocks there: each subscriber
has a bounded queue, and one that falls behind is marked overflowed and cut off (it must resubscribe
and rebuild its view, as a gap in `seq` would also tell it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from splitserve.engine.block_pool import BlockEvent, BlockEventKind
from splitserve.protos import common_pb2

_KINDS = {
    BlockEventKind.STORED: common_pb2.BlockEvent.STORED,
    BlockEventKind.EVICTED: common_pb2.BlockEvent.EVICTED,
}


class Subscription:
    def __init__(self, max_queued: int) -> None:
        self.queue: queue.Queue[common_pb2.BlockEvent] = queue.Queue(max_queued)
        self.overflowed = False

    def batches(self, active, poll_s: float = 0.2, max_batch: int = 256) -> Iterator[common_pb2.BlockEvents]:
        """Batches of events while `active()`; stops (returns) after an overflow."""
        while active() and not self.overflowed:
            try:
                events = [self.queue.get(timeout=poll_s)]
            except queue.Empty:
                continue
            while len(events) < max_batch:
                try:
                    events.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            yield common_pb2.BlockEvents(events=events)


class EventHub:
    def __init__(self, max_queued: int = 10_000) -> None:
        self.max_queued = max_queued
        self._seq = 0
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()

    def publish(self, event: BlockEvent) -> None:
        """BlockPool listener: number the event and hand it to every subscriber, never blocking."""
        with self._lock:
            self._seq += 1
            message = common_pb2.BlockEvent(seq=self._seq, kind=_KINDS[event.kind],
                                            block_hashes=list(event.block_hashes))
            for sub in self._subscribers:
                try:
                    sub.queue.put_nowait(message)
                except queue.Full:
                    sub.overflowed = True

    @property
    def num_subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def subscribe(self) -> Subscription:
        sub = Subscription(self.max_queued)
        with self._lock:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)


def serve_events(hub: EventHub, context: grpc.ServicerContext) -> Iterator[common_pb2.BlockEvents]:
    """The body of a worker's Events RPC: batches until the caller leaves or falls too far behind."""
    sub = hub.subscribe()
    context.add_callback(lambda: hub.unsubscribe(sub))
    yield from sub.batches(context.is_active)
    if sub.overflowed:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "events subscriber fell behind: resubscribe")
