"""`simulate`: replay a trace through a simulated cluster, routing every request with a live policy object.

The run owns arrivals, the routing decision and the results; the workers (`workers.py`, `decode.py`) own
what happens after it. Rules, as the live cluster behaves:
- Arrivals: `sessions.schedule(trace, rate, seed)` gives each request's send time. Turn k of a session is sent
  at max(its scheduled time, the moment turn k-1 ended); a turn whose predecessor failed is sent all the
  same, at its scheduled time (at once, if that has passed).
- At its send time the router decides at once (no router latency), on a view of every worker: its matched
  blocks (leading full-block ids of the prompt that its cache holds: the first input_len // block_len),
  queued tokens, running requests, KV usage and free blocks. The policy's `Decision` is used as is, with
  its target's fetch planned as the live router plans it (`fetch_plan.with_fetch`, unless
  `SimConfig.fetch` is off); the shadow policies are asked on the same views for the decision log.
  `NoWorker` fails the request ("UnavailableError: ..."), recorded without a decision.
- Then the decode worker reserves the request's KV (see `decode.py`) and refuses it when it has no room
  ("OverloadedError: ..."); a prefill worker whose whole cache cannot hold the prompt refuses it too. A
  refused request keeps its decision record. Else it queues on its prefill worker, or prefills locally —
  after its fetch, if planned: the blocks its holder holds then beyond the target's own reach the
  target's cache after the transfer time (`costs.transfer(config.transport)`), as a live worker fetches
  before it queues the request.
- Per request a `RequestResult`: TTFT from its send to its first token, ITL the gaps between consecutive
  token times, e2e to its last token, cached tokens as reused at its service start, predicted cached
  tokens as `decision_log.predicted_cached_tokens` at decision time.
Deterministic: the same inputs give identical results (no randomness beyond `schedule`'s seed; ties in
time are broken as `events.py` states).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from splitserve.experiments.results import RequestResult
from splitserve.experiments.sessions import next_turns, schedule
from splitserve.experiments.trace import Trace, TraceError
from splitserve.router.cost_model import CostModel
from splitserve.router.decision_log import Choice, DecisionRecord, predicted_cached_tokens
from splitserve.router.fetch_plan import with_fetch
from splitserve.router.policies import LOCAL, NoWorker, Policy, RequestShape
from splitserve.simulator.cache import BlockCache
from splitserve.simulator.cluster import SimCluster
from splitserve.simulator.config import SimConfig
from splitserve.simulator.decode import OVERLOADED
from splitserve.simulator.events import FETCH_END, SEND, EventQueue
from splitserve.simulator.workers import SimRequest


@dataclass(frozen=True)
class SimRun:
    """One simulated run. `results` by trace index; `decisions` in decision order; `duration_s`:
    simulated seconds from the first send to the last request's end; `wall_s`: real seconds it took."""

    results: list[RequestResult]
    decisions: list[DecisionRecord]
    duration_s: float
    wall_s: float
    num_events: int


def simulate(
    trace: Trace,
    policy: Policy,
    config: SimConfig,
    costs: CostModel,
    *,
    rate: float | None = None,
    seed: int = 0,
    shadows: Mapping[str, Policy] | None = None,
    arm: str | None = None,
) -> SimRun:
    """Run `trace` through a fresh cluster of `config`, routed by `policy` (its results labelled `arm`,
    default the policy's name), costs from `costs`. `rate` None replays the trace's timestamps, else
    re-times it as `schedule` does with `seed`. The policies are called, never inspected; `policy` and the
    `shadows` may keep state (a cursor) across the run. Raises ValueError for a transport the cost model
    lacks, a bad rate, or a policy choosing a worker the cluster lacks; TraceError for a broken session or
    a prompt repeating a hash id."""
    started = time.perf_counter()
    _check_chained(trace)
    send_times = schedule(trace, rate, seed)
    run = _Run(trace, policy, config, costs, dict(shadows or {}), arm or policy.name, send_times)
    run.events.run()
    results = run.results()
    ends = [r.done_s if r.done_s is not None else r.sent_s for r in results]
    duration = max(ends) - min(r.sent_s for r in results) if results else 0.0
    return SimRun(results, run.decisions, duration, time.perf_counter() - started, run.events.num_events)


def _check_chained(trace: Trace) -> None:
    """Hash ids are chained (an id stands for its whole prefix), so one prompt never repeats an id."""
    for i, r in enumerate(trace.requests):
        if len(set(r.hash_ids)) != len(r.hash_ids):
            raise TraceError(f"request {i}: field 'hash_ids': an id repeats within one prompt (ids are "
                             f"chained: equal ids mean equal prefixes)")  # fmt: skip


class _Run:
    """One run's mutable state: the cluster, the event queue, results as they come."""

    def __init__(self, trace: Trace, policy: Policy, config: SimConfig, costs: CostModel,
                 shadows: dict[str, Policy], arm: str, send_times: list[float]) -> None:  # fmt: skip
        self.trace = trace
        self.policy = policy
        self.shadows = shadows
        self.arm = arm
        self.block_len = trace.meta.block_len
        self.send_times = send_times
        self.path = costs.path
        self.costs = costs
        self.config = config
        self.events = EventQueue()
        self.cluster = SimCluster(config, costs, self.block_len, self.events, self._finished)
        self._fetch_transfer = costs.transfer(config.transport)  # a transport SimCluster checked
        self.decisions: list[DecisionRecord] = []
        self._results: dict[int, RequestResult] = {}
        self._follow = next_turns(trace)
        followers = set(self._follow.values())
        for i, t in enumerate(send_times):
            if i not in followers:
                self.events.at(t, SEND, self._send, i)

    def results(self) -> list[RequestResult]:
        assert len(self._results) == len(self.trace.requests), "every request ends, ok or failed"
        return [self._results[i] for i in range(len(self.trace.requests))]

    def _request(self, now: float, index: int) -> SimRequest:
        r, bl = self.trace.requests[index], self.block_len
        full = r.hash_ids[: r.input_len // bl]
        finish = full
        if index in self._follow:
            nxt = self.trace.requests[self._follow[index]]
            filled = nxt.hash_ids[: min((r.input_len + r.output_len) // bl, nxt.input_len // bl)]
            finish = filled if filled[: len(full)] == full else full + filled
        return SimRequest(index, r.input_len, r.output_len, full, finish, now)

    def _send(self, now: float, index: int) -> None:
        req = self._request(now, index)
        r, bl = self.trace.requests[index], self.block_len
        matched = self.cluster.index.matches(req.full_ids)
        views = self.cluster.views(now, matched)
        shape = RequestShape(r.input_len, bl, r.session_id or None, r.output_len)
        try:
            decision = self.policy.route(shape, views)
            if self.config.fetch:
                decision = with_fetch(decision, shape, views, self.costs, self.policy)
        except NoWorker as exc:
            self._fail(now, req, f"UnavailableError: {exc}")
            return
        req.decision = decision
        shadow = {}
        for name, other in self.shadows.items():
            try:
                shadow[name] = Choice.of(other.route(shape, views))
            except NoWorker:
                continue  # it would have failed the request: no choice to compare
        predicted = predicted_cached_tokens(decision, matched, bl, r.input_len)
        req.predicted_cached_tokens = predicted
        record = DecisionRecord(now, str(index), self.arm, Choice.of(decision), dict(decision.terms),
                                r.input_len, predicted, shadow)  # fmt: skip
        self.decisions.append(record)
        path_s = self.path.seconds(decision.pool == LOCAL)
        if path_s:
            self.events.at(now + path_s, SEND, self._dispatch, req)
        else:
            self._dispatch(now, req)

    def _dispatch(self, now: float, req: SimRequest) -> None:
        """The request reaches its workers: after the decision, its route's path cost later (`costs.path`,
        standing for the whole trip, the first token's way back too). Its decode worker pins what it holds
        of the prompt then."""
        decision = req.decision
        assert decision is not None
        decode = self.cluster.decode.get(decision.decode)
        prefill = None if decision.pool == LOCAL else self.cluster.prefill.get(decision.prefill or "")
        if decode is None or (prefill is None and decision.pool != LOCAL):
            raise ValueError(f"policy {decision.policy!r} chose a worker the cluster lacks: "
                             f"prefill {decision.prefill!r}, decode {decision.decode!r}")  # fmt: skip
        if prefill is not None and not prefill.fits(req.input_len):
            blocks = -(-req.input_len // self.block_len)
            self._fail(now, req, f"OverloadedError: the prompt needs {blocks} KV blocks, prefill worker "
                                 f"{prefill.worker_id} has {prefill.cache.capacity}")  # fmt: skip
        elif not decode.reserve(req, decode.cache.match(req.full_ids)):
            self._fail(now, req, OVERLOADED)
        else:
            self._fetch(now, req, decode.add_local if prefill is None else prefill.enqueue,
                        (decode if prefill is None else prefill).cache)  # fmt: skip

    def _fetch(self, now: float, req: SimRequest, then, target: BlockCache) -> None:
        """The decision's fetch, as a live target does it before queueing the request: the leading blocks
        the holder holds *now* beyond the target's own arrive after their transfer time and join its cache;
        then `then(time, req)`. A holder that holds no more (evicted meanwhile): nothing to fetch."""
        decision = req.decision
        holder = self.cluster.worker(decision.fetch_from) if decision.fetch_from else None
        usable = (req.input_len - 1) // self.block_len
        own = target.match(req.full_ids)
        theirs = 0 if holder is None else min(holder.cache.match(req.full_ids), usable)
        if theirs <= own:
            then(now, req)
            return
        seconds = self._fetch_transfer.seconds(self.costs.kv_bytes((theirs - own) * self.block_len))

        def arrived(t: float, r: SimRequest) -> None:
            target.insert(r.full_ids[:theirs])
            then(t, r)

        self.events.at(now + seconds, FETCH_END, arrived, req)

    def _fail(self, now: float, req: SimRequest, error: str) -> None:
        req.error = error
        self._record(now, req)

    def _finished(self, now: float, req: SimRequest) -> None:
        self._record(now, req)

    def _record(self, now: float, req: SimRequest) -> None:
        r, d = self.trace.requests[req.index], req.decision
        ok = req.error is None
        assert not ok or req.first_token_s is not None
        self._results[req.index] = RequestResult(
            index=req.index, arm=self.arm, session_id=r.session_id, turn=r.turn, input_len=r.input_len,
            sent_s=req.sent_s, ttft_s=req.first_token_s - req.sent_s if ok else None, itl_s=req.itl_s,
            e2e_s=now - req.sent_s if ok else None, output_len=r.output_len if ok else 0,
            pool=d.pool if d else "", prefill_worker=(d.prefill or "") if d else "",
            decode_worker=d.decode if d else "",
            predicted_cached_tokens=req.predicted_cached_tokens,
            cached_tokens=req.cached_tokens if ok else 0, error=req.error,
        )  # fmt: skip
        nxt = self._follow.get(req.index)
        if nxt is not None:
            self.events.at(max(self.send_times[nxt], now), SEND, self._send, nxt)
