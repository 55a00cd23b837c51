"""A simulated request's state, and the prefill worker model.

Prefill worker (fresh or warm pool), as the live one behaves:
- FIFO, one request at a time. At a request's service start its cached tokens are its leading full blocks
  that the worker's cache holds *then* (the cache may have changed while it queued), capped so the last
  prompt token is computed: min(matched, (input_len - 1) // block_len) × block_len. It pins those blocks
  and reserves the prompt's other blocks; service takes `costs.prefill_seconds(new, cached)` on its device.
- At the end the first token is sampled (TTFT = end − sent), the blocks are released (the transfer's tail
  holds none) and the prompt's full blocks cached (LRU touch). The KV the decode worker lacks — input_len
  − (the decode worker's matched blocks at decision time) × block_len tokens — is pushed layer by layer,
  overlapped with the prefill: it arrives at max(end + latency, start + transfer(bytes)); nothing to push
  arrives at the end. Then the decode worker admits the sequence at its next step boundary.
- Load it reports: queued tokens = the whole prompts of the waiting requests (a cache hit is applied when
  a request starts, as in the engine's scheduler) plus the running one's uncomputed remainder (linear in
  its service time); running requests = waiting + running; KV usage and free blocks from its cache; its
  step time, `average_step_time` of the time from a request's start (its device may be busy) to its end.
The router's decision, the decode side and the results are not here (`run.py`, `decode.py`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from splitserve.engine.config import average_step_time
from splitserve.router.cost_model import CostModel
from splitserve.router.policies import Decision
from splitserve.router.policy_types import usable_cached_tokens
from splitserve.simulator.cache import BlockCache
from splitserve.simulator.events import KV_ARRIVAL, PREFILL_END, Device, EventQueue

if TYPE_CHECKING:
    from splitserve.simulator.decode import DecodeWorker


class SimRequest:
    """One request's progress through the simulated cluster. Created by the run at send time; mutated by
    the workers that serve it. `full_ids`: the prompt's full-block ids; `finish_ids`: what its decode
    worker caches when it ends (the prompt's full blocks, then its session's next prompt's blocks that this
    prompt and its output fill)."""

    __slots__ = ("cached_tokens", "decision", "decode", "decode_matched", "decode_new", "error", "finish_ids",
                 "first_token_s", "full_ids", "index", "input_len", "itl_s", "join_step", "num_computed",
                 "output_len", "predicted_cached_tokens", "sent_s")  # fmt: skip

    def __init__(self, index: int, input_len: int, output_len: int, full_ids: tuple[int, ...],
                 finish_ids: tuple[int, ...], sent_s: float) -> None:  # fmt: skip
        self.index = index
        self.input_len = input_len
        self.output_len = output_len
        self.full_ids = full_ids
        self.finish_ids = finish_ids
        self.sent_s = sent_s
        self.decision: Decision | None = None
        self.decode: DecodeWorker | None = None
        self.decode_matched = 0  # leading blocks the decode worker held (and pinned) at decision time
        self.decode_new = 0  # private blocks reserved on the decode worker
        self.predicted_cached_tokens = 0  # what the index said its prefill target held, at decision time
        self.cached_tokens = 0  # prompt tokens reused at service start
        self.first_token_s: float | None = None
        self.itl_s: list[float] = []
        self.join_step = -1  # the first decode step it took part in
        self.num_computed = -1  # local prefill: prompt tokens cached or computed so far (-1: not started)
        self.error: str | None = None


class PrefillWorker:
    """A fresh- or warm-pool prefill worker (see the module docstring). `enqueue` takes a routed request;
    the worker schedules its own events and hands the request to its decode worker; `on_finish(now, req)`
    is called for a one-token request, which ends at its first token."""

    def __init__(self, worker_id: str, role: str, cache: BlockCache, device: Device, events: EventQueue,
                 costs: CostModel, transport: str, block_len: int,
                 on_finish: Callable[[float, SimRequest], None]) -> None:  # fmt: skip
        self.worker_id = worker_id
        self.role = role
        self.cache = cache
        self._device = device
        self._events = events
        self._costs = costs
        self._transfer = costs.push(transport=transport)  # as the policy prices a push
        self._block_len = block_len
        self._on_finish = on_finish
        self._queue: deque[SimRequest] = deque()
        self._queued_prompt_tokens = 0
        self._running: SimRequest | None = None
        self._run = (0.0, 0.0, 0, 0, 0)  # start, end, new tokens, pinned blocks, reserved blocks
        self._started_s = 0.0  # when the running request was started (its device may start it later)
        self.step_s = 0.0  # see the module docstring
        # As the WorkerView fields say for a prefill worker: no local prefills, no reported cap or budget.
        self.waiting_prefills = 0
        self.max_running: int | None = None
        self.step_tokens: int | None = None

    def fits(self, input_len: int) -> bool:
        """Whether a prompt's KV fits this worker at all (the live worker refuses one that does not)."""
        return -(-input_len // self._block_len) <= self.cache.capacity

    def queued_tokens(self, now: float) -> int:
        queued = self._queued_prompt_tokens
        if self._running is not None:
            start, end, num_new = self._run[:3]
            if now <= start or end <= start:
                queued += num_new
            elif now < end:
                queued += math.ceil(num_new * (end - now) / (end - start))
        return queued

    @property
    def running_requests(self) -> int:
        return len(self._queue) + (self._running is not None)

    def enqueue(self, now: float, req: SimRequest) -> None:
        self._queue.append(req)
        self._queued_prompt_tokens += req.input_len
        if self._running is None:
            self._start(now)

    def _start(self, now: float) -> None:
        req = self._queue.popleft()
        self._queued_prompt_tokens -= req.input_len
        bl = self._block_len
        matched = self.cache.match(req.full_ids)
        num_new_blocks = -(-req.input_len // bl) - matched
        acquired = self.cache.acquire(req.full_ids[:matched], num_new_blocks)
        assert acquired, "one request at a time, and `fits` was checked at decision time"
        req.cached_tokens = cached = usable_cached_tokens(matched, req.input_len, bl)
        num_new = req.input_len - cached
        start, end = self._device.run(now, self._costs.prefill_seconds(num_new, cached))
        self._running, self._started_s = req, now
        self._run = (start, end, num_new, matched, num_new_blocks)
        self._events.at(end, PREFILL_END, self._end, req)

    def _end(self, now: float, req: SimRequest) -> None:
        start, _, _, matched, num_new_blocks = self._run
        self.cache.release(req.full_ids[:matched], num_new_blocks)
        self.cache.insert(req.full_ids)
        self.step_s = average_step_time(self.step_s, now - self._started_s)
        req.first_token_s = now
        num_bytes = self._costs.kv_bytes(req.input_len - req.decode_matched * self._block_len)
        arrival = now
        if num_bytes > 0:
            arrival = max(now + self._transfer.latency_s, start + self._transfer.seconds(num_bytes))
        assert req.decode is not None
        self._events.at(arrival, KV_ARRIVAL, req.decode.admit, req)
        self._running = None
        if self._queue:
            self._start(now)
        if req.output_len <= 1:
            self._on_finish(now, req)  # its only token: the request ends (its KV is released on arrival)
