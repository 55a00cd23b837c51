"""The decode worker model: KV reservation, continuous batching, chunked local prefill, finishing.

As the live decode worker behaves:
- Reservation at decision time: ceil((input_len + output_len) / block_len) blocks less the prompt's leading
  blocks it holds (those are shared: pinned). No room even after evicting every evictable block: the
  request is refused at once ("OverloadedError: no room for the request's KV").
- Continuous batching: while it has work it runs back-to-back steps (a step's batch and chunk are fixed
  when it is issued, even if a shared device starts it later). A step over n decoding sequences
  holding c context tokens takes `costs.decode.step_seconds(n, c)`; when local prefills are pending it
  also computes one chunk of up to `local_chunk_tokens` of the oldest one, costing
  `costs.prefill_seconds(chunk, tokens already cached or computed)` less `prefill.fixed_s` except on the
  request's first chunk. Sequences arriving (a transfer landing, a local prefill finishing) join at the
  next step start, at most `decode_max_seqs` running at once (the rest wait, FIFO). A local prefill holds
  one of those slots from its first chunk on: as in the live engine, it waits for a free slot to start.
- A local request's cached tokens are its leading full blocks held here at its first chunk, capped so the
  last prompt token is computed. Its first token comes at the end of the step that finishes its prefill.
- Each step's end gives every decoding sequence one token; a sequence's context counts its prompt and the
  tokens generated so far. A request ends with its `output_len`-th token (the first included): its
  blocks are released, then its prompt's full blocks and its session's next prompt's blocks filled by the
  prompt and output are cached (LRU touch; the output is the next turn's prefix).
- Load it reports: queued tokens = uncomputed local-prefill tokens (a request not yet started counts its
  whole prompt); running requests = decoding, waiting to join, and prefilling locally; its batch cap; its
  step time, a moving average (as the live engine loop's, `average_step_time`) of the time from issuing a
  run of steps to its end over its steps (a shared device's other work included).

Cost per step is O(1) amortized: the batch is a count and a context sum (each sequence's context grows by
one per step, so the sum is `ctx_base + n × step index`); sequences wait in a heap keyed by the step index
at which they finish; a finished sequence's token times are read off the list of step end times. On its own
device a worker with no local prefill pending issues at once every step up to its next finisher's (nothing
changes in between: one event, not one per step); something arriving meanwhile revokes the issued steps
that would start at or after its arrival, so it joins at the next step start all the same.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections import deque
from collections.abc import Callable

from splitserve.engine.config import average_step_time
from splitserve.router.cost_model import CostModel
from splitserve.router.policy_types import blocks_to_reserve, usable_cached_tokens
from splitserve.simulator.cache import BlockCache
from splitserve.simulator.config import SimConfig
from splitserve.simulator.events import STEP_END, STEP_START, Device, EventQueue
from splitserve.simulator.workers import SimRequest

OVERLOADED = "OverloadedError: no room for the request's KV"


class DecodeWorker:
    """One decode worker. `reserve` at decision time, then `admit` (KV arrived) or `add_local` (it
    prefills the request itself); `on_finish(now, request)` is called when a request's last token lands
    (for a one-token request that came by transfer, its prefill worker calls it)."""

    role = "decode"

    def __init__(self, worker_id: str, cache: BlockCache, device: Device, events: EventQueue,
                 costs: CostModel, config: SimConfig, block_len: int,
                 on_finish: Callable[[float, SimRequest], None]) -> None:  # fmt: skip
        self.worker_id = worker_id
        self.cache = cache
        self._device = device
        self._events = events
        self._decode = costs.decode
        self._costs = costs
        self._prefill = costs.prefill
        self._max_seqs = config.decode_max_seqs
        self._ahead = not config.shared_device  # may issue steps ahead (see the module docstring)
        self._chunk_tokens = config.local_chunk_tokens
        self._block_len = block_len
        self._on_finish = on_finish
        self.step_ends: list[float] = []  # end time of step i
        self._num_seqs = 0  # decoding now
        self._ctx_base = 0  # Σ (context at join − join step) over decoding sequences
        self._finishers: list[tuple[int, int, SimRequest]] = []  # (last step index, request index, req)
        self._joining: deque[SimRequest] = deque()  # ready to decode, waiting for a step start
        self._local: deque[SimRequest] = deque()  # local prefills, oldest first
        self._local_tokens = 0  # uncomputed local-prefill tokens
        self._chunk: tuple[SimRequest, int] | None = None  # the local chunk in the current step
        self._active = False  # a step is running or about to start
        self._run_start = 0  # the first step of the steps issued together
        self._issued_s = 0.0  # when they were issued
        self.step_s = 0.0  # recent step time (see the module docstring)
        self._epoch = 0  # the live STEP_END event's; revoking steps makes the pending one stale

    def queued_tokens(self, now: float) -> int:
        return self._local_tokens

    @property
    def running_requests(self) -> int:
        return self._num_seqs + len(self._joining) + len(self._local)

    @property
    def waiting_prefills(self) -> int:
        return len(self._local)

    @property
    def max_running(self) -> int:
        return self._max_seqs

    @property
    def step_tokens(self) -> int:
        return self._chunk_tokens

    def _prefilling(self) -> int:
        """1 while the oldest local prefill has started (it holds a slot), else 0."""
        return int(bool(self._local) and self._local[0].num_computed >= 0)

    def reserve(self, req: SimRequest, matched: int) -> bool:
        """Pin the `matched` leading prompt blocks held here and reserve the rest of the request's KV.
        False (nothing changed) when it does not fit."""
        num_new = blocks_to_reserve(req.input_len, req.output_len, self._block_len, matched)
        if not self.cache.acquire(req.full_ids[:matched], num_new):
            return False
        req.decode, req.decode_matched, req.decode_new = self, matched, num_new
        return True

    def admit(self, now: float, req: SimRequest) -> None:
        """The request's KV arrived (its first token already sampled): it decodes from the next step. A
        one-token request ended at its first token (its prefill worker said so): its KV is released."""
        if req.output_len <= 1:
            self._release(req)
            return
        self._joining.append(req)
        self._arrived(now)

    def add_local(self, now: float, req: SimRequest) -> None:
        """Prefill the request here, chunk by chunk inside the decode steps, then decode it."""
        self._local.append(req)
        self._local_tokens += req.input_len
        self._arrived(now)

    def _arrived(self, now: float) -> None:
        """Work arrived: start a step, or revoke the steps issued ahead that would start at or after `now`
        (the step in progress is kept; the newcomer joins at its end)."""
        if not self._active:
            self._wake(now)
            return
        ends = self.step_ends
        keep = bisect_left(ends, now, self._run_start)  # the first issued step not ended before `now`
        if keep < len(ends) - 1:
            del ends[keep + 1 :]
            self._device.free_s = ends[keep]
            self._epoch += 1
            self._events.at(ends[keep], STEP_END, self._end_step, (self._epoch, keep))

    def _wake(self, now: float) -> None:
        """Start a step at `now` once every other event of this instant has run. Callers wake last in their
        handler, so when no other event of `now` is pending the step can start at once (one event fewer,
        same outcome)."""
        if not self._active:
            self._active = True
            if self._events.pending_at(now):
                self._events.at(now, STEP_START, self._start_step)
            else:
                self._start_step(now)

    def _start_step(self, now: float, _: object = None) -> None:
        step = len(self.step_ends)
        while self._joining and self._num_seqs + self._prefilling() < self._max_seqs:
            req = self._joining.popleft()
            req.join_step = step
            self._num_seqs += 1
            self._ctx_base += req.input_len + 1 - step
            heapq.heappush(self._finishers, (step + req.output_len - 2, req.index, req))
        n, ctx_base, ends = self._num_seqs, self._ctx_base, self.step_ends
        self._chunk = None
        if self._local and (self._prefilling() or n < self._max_seqs):
            seconds = self._decode.step_seconds(n, ctx_base + n * step) + self._local_chunk()
            last = step
            ends.append(self._device.run(now, seconds)[1])
        elif not n:
            self._active = False
            return
        else:
            last = self._finishers[0][0] if self._ahead else step
            cost, device, t = self._decode.step_seconds, self._device, now
            for s in range(step, last + 1):
                t = device.run(t, cost(n, ctx_base + n * s))[1]
                ends.append(t)
        self._run_start, self._issued_s = step, now
        self._epoch += 1
        self._events.at(ends[-1], STEP_END, self._end_step, (self._epoch, last))

    def _local_chunk(self) -> float:
        """Take the oldest local prefill's next chunk into this step; returns its cost."""
        req = self._local[0]
        fixed = 0.0
        if req.num_computed < 0:
            fixed = self._prefill.fixed_s
            matched = self.cache.match(req.full_ids)
            cached = usable_cached_tokens(matched, req.input_len, self._block_len)
            req.cached_tokens = req.num_computed = cached
            self._local_tokens -= req.num_computed
        size = min(self._chunk_tokens, req.input_len - req.num_computed)
        self._chunk = (req, size)
        return self._costs.prefill_seconds(size, req.num_computed) - self._prefill.fixed_s + fixed

    def _end_step(self, now: float, live: tuple[int, int]) -> None:
        epoch, step = live
        if epoch != self._epoch:
            return  # its steps were revoked
        assert step == len(self.step_ends) - 1
        self._active = False
        elapsed = (now - self._issued_s) / (step - self._run_start + 1)
        self.step_s = average_step_time(self.step_s, elapsed)
        finishers = self._finishers
        while finishers and finishers[0][0] == step:
            _, _, req = heapq.heappop(finishers)
            self._num_seqs -= 1
            self._ctx_base -= req.input_len + 1 - req.join_step
            self._finish(now, req, self.step_ends[req.join_step : step + 1])
        if self._chunk is not None:
            req, size = self._chunk
            req.num_computed += size
            self._local_tokens -= size
            if req.num_computed >= req.input_len:
                self._local.popleft()
                req.first_token_s = now
                if req.output_len <= 1:
                    self._finish(now, req, [])
                else:
                    self._joining.appendleft(req)  # it keeps the slot it prefilled in
        if self._num_seqs or self._joining or self._local:
            self._wake(now)

    def _finish(self, now: float, req: SimRequest, token_times: list[float]) -> None:
        prev = req.first_token_s
        assert prev is not None
        itl = []
        for t in token_times:
            itl.append(t - prev)
            prev = t
        req.itl_s = itl
        self._release(req)
        self._on_finish(now, req)

    def _release(self, req: SimRequest) -> None:
        self.cache.release(req.full_ids[: req.decode_matched], req.decode_new)
        self.cache.insert(req.finish_ids)
