"""The simulated clock: the event queue and the devices that compute items run on.

`EventQueue` runs callbacks in time order. Events at the same instant run in priority order (below), then
in the order they were scheduled, so a run is deterministic and every rule about "the same moment" is one
of these priorities:
- a prefill's end (its worker takes the next queued request at once),
- a KV transfer's arrival at a decode worker,
- a decode step's end (its finished requests leave; a session's next turn may be sent),
- a request's send (the router decides on the state after everything above),
- a decode step's start (last: a sequence arriving at a step boundary joins that step).

`Device` is a compute timeline: an item ready at t starts at max(t, the device's free time). Every worker
has its own, or (shared device) all of them share one, serving items in the order they became ready.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

PREFILL_END, KV_ARRIVAL, STEP_END, SEND, STEP_START, FETCH_END = range(6)

Callback = Callable[[float, Any], None]  # (the event's time, its argument)


class EventQueue:
    """A min-heap of (time, priority, sequence number, callback, argument). `run()` pops until empty,
    calling `callback(time, argument)`; callbacks may schedule more events, never in the past."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Callback, Any]] = []
        self._count = 0
        self.now = 0.0
        self.num_events = 0

    def at(self, time_s: float, priority: int, callback: Callback, arg: Any = None) -> None:
        """Run `callback(time_s, arg)` at `time_s` (never before the current time), after the events of
        that instant with a lower priority and those of equal priority scheduled earlier."""
        assert time_s >= self.now, "an event in the past"
        self._count += 1
        heapq.heappush(self._heap, (time_s, priority, self._count, callback, arg))

    def pending_at(self, time_s: float) -> bool:
        """Whether an event at `time_s` (or earlier) is still to run."""
        return bool(self._heap) and self._heap[0][0] <= time_s

    def run(self) -> None:
        heap, pop = self._heap, heapq.heappop
        while heap:
            time_s, _, _, callback, arg = pop(heap)
            self.now = time_s
            self.num_events += 1
            callback(time_s, arg)


class Device:
    """One accelerator's timeline. `run(ready_s, seconds)` books the device for an item and returns its
    (start, end); items are booked in the order their workers issue them."""

    __slots__ = ("free_s",)

    def __init__(self) -> None:
        self.free_s = 0.0

    def run(self, ready_s: float, seconds: float) -> tuple[float, float]:
        start = ready_s if ready_s > self.free_s else self.free_s
        self.free_s = start + seconds
        return start, self.free_s
