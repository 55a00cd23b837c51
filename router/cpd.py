"""`cpd`: the cache-aware prefill/decode split, by predicted cost.

For every decode worker with room for the request's KV and every place its prompt could be prefilled —
each admissible prefill worker, or that decode worker itself (LOCAL) — the policy predicts, in seconds,
what the placement costs the cluster's users, and takes the cheapest:

    cost = queue wait + prefill compute            (this request's time to first token; a LOCAL prefill
                                                    also waits for a free slot in the decode batch; the
                                                    compute loads a host-tier hit back first)
         + transfer tail                           (KV the decode worker lacks, not hidden by the prefill)
         + stall                                   (`stall_weight` × the wait for a decode slot left after
                                                    the first token, when prefilled elsewhere)
         + interference                            (decode batches stalled while the prefill computes)
         + decode time                             (its own steps on that decode worker, and what it adds
                                                    to every other sequence's steps there)
         + miss penalty                            (`miss_weight` × the compute of the tokens it recomputes)

The miss penalty prices what a recomputation costs beyond this request: a conversation moved off the
worker holding its context leaves that copy unused and splits its next turns' hits over two caches. In
the simulator (H200 calibration, 4 fresh + 4 warm + 8 decode, multi-turn, 2026-12-02) weights 0 / 4 / 16
/ 48 / 128 gave hit rates 0.74 / 0.80 / 0.86 / 0.88 / 0.90 and TTFT p90 at 1,000 req/s offered of 237 /
210 / 182 / 170 / 209 ms: 32 is the default.

A decode worker runs at most `max_running` sequences (it reports its cap); past it, requests wait for
one to finish, about one per (output length × step time / cap). A LOCAL prefill waits before it starts, so
the wait is in its time to first token; a prefill elsewhere overlaps it and the user waits only for what is
left, after the first token, a stall between tokens that weighs `stall_weight` of a second of TTFT.

A queue's wait is predicted from the cost model, or from what the worker measures when that is longer (on
a shared device it often is): the steps the queue and this prompt take (at most `step_tokens` a step, else
one prefill a step) at its measured step time. The model's wait counts its requests' fixed costs as well
as their tokens (on a GPU a prefill's fixed cost is often larger than its tokens'), a decode worker's
local prefills too, each of which waits for a step of its own. Interference is the prefill's compute time
times the sequences running on decode workers that share the device it computes on: always the chosen
decode worker's own batch for a LOCAL prefill; for a prefill worker, only the decode workers on its device
(workers register their device; on one GPU shared by every worker disaggregation isolates nothing, and
the policy knows it).

Prefill compute counts only the tokens the target lacks (its prefix match), and what it holds in its host
tier only costs a load at host→device bandwidth (far less than recomputing, not free). A worker's own
measurements (`WorkerView.measured`: prefill tokens/s by cached context, host-tier load and push bytes/s)
stand in for the calibration's figures where it has them (`CostModel.prefill_seconds`,
`host_load_seconds`, `push`). So a warm turn goes where its
context is — to the decode worker that holds the whole conversation when the batch there can absorb the
suffix, else to whichever prefill worker holds most of it, net of its queue. Queues are in the inputs (and
the router adds its own assignments between load polls), so a burst spreads instead of piling onto one
worker. Pools keep one rule: a request that is mostly new everywhere (best hit ratio below
`warm_min_hit_ratio`) goes to the fresh pool when there is one, so cold prefills do not queue in front of
warm turns. The costs come from a `CostModel` (a calibration file, or the defaults).

Pure: no I/O, no clock; the live router, the A/B framework and the simulator call the same object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from splitserve.router.cost_model import DEFAULT_COST_MODEL, CostModel
from splitserve.router.fetch_plan import FetchPlan, plan_fetches
from splitserve.router.policy_types import (
    FRESH,
    LOCAL,
    Decision,
    RequestShape,
    WorkerView,
    blocks_to_reserve,
    split_roles,
    usable_cached_tokens,
    usable_host_tokens,
)


@dataclass(frozen=True)
class _Option:
    cost_s: float
    prefill: WorkerView | None  # None: LOCAL on `decode`
    decode: WorkerView
    terms: dict[str, float]

    def key(self) -> tuple:
        target = self.decode if self.prefill is None else self.prefill
        return (self.cost_s, target.queued_tokens, self.decode.running_requests, target.worker_id,
                self.decode.worker_id)  # fmt: skip


@dataclass
class CPD:
    """Options: `warm_min_hit_ratio` — below it (best prefix match anywhere / prompt length) a request is
    fresh and stays in the fresh pool; `local_prefill_max_tokens` — the most uncached tokens a decode
    worker may prefill itself; `interference_weight` — how much a second of a decode batch's stall (per
    running sequence) weighs against a second of this request's TTFT; `transfer_weight` — the same for the
    transfer tail; `stall_weight` — the same for a wait for a decode slot after the first token;
    `miss_weight` — see above; `fetch` — whether targets fetch leading blocks another worker holds (as the
    router does unless told not to), so that a prefill counts them as cached, after the fetch's time.
    The transfer cost is the cost model's default transport's (`CostModel.transfer()`), at the prefill
    worker's measured push rate over it once it has one (`CostModel.push`): give the policy a model
    holding only the transport the workers use when it is not the same-host one.
    """

    warm_min_hit_ratio: float = 0.5
    local_prefill_max_tokens: int = 4096
    interference_weight: float = 1.0
    transfer_weight: float = 1.0
    stall_weight: float = 0.5
    miss_weight: float = 32.0
    fetch: bool = True
    costs: CostModel = field(default=DEFAULT_COST_MODEL, repr=False)
    name: str = "cpd"

    def __post_init__(self) -> None:
        if not 0.0 <= self.warm_min_hit_ratio <= 1.0:
            raise ValueError(f"warm_min_hit_ratio must be in [0, 1], got {self.warm_min_hit_ratio}")
        weights = (self.interference_weight, self.transfer_weight, self.stall_weight)
        if min(*weights, self.local_prefill_max_tokens) < 0:
            raise ValueError("cpd weights and local_prefill_max_tokens must be non-negative")

    def route(self, request: RequestShape, workers: Sequence[WorkerView]) -> Decision:
        prefills, decodes = split_roles(workers)
        n, bs = request.num_prompt_tokens, request.block_size
        hit_ratio = max(w.matched_blocks for w in workers) * bs / n
        fresh = [w for w in prefills if w.role == FRESH]
        admissible = fresh if hit_ratio < self.warm_min_hit_ratio and fresh else prefills
        cap = self.local_prefill_max_tokens if prefills else math.inf  # no prefill worker: local it is
        stalled: dict[str, int] = {}  # device → sequences decoding on it
        for w in decodes:
            stalled[w.device] = stalled.get(w.device, 0) + _decoding(w)
        targets = (*admissible, *decodes)
        fetches = plan_fetches(request, targets, workers, self.costs) if self.fetch else dict.fromkeys(
            w.worker_id for w in targets)
        best = min((opt for d in _with_room(decodes, request)
                    for opt in self._options(request, admissible, d, cap, stalled, fetches)),
                   key=_Option.key)  # fmt: skip
        terms = {"hit_ratio": hit_ratio, **best.terms}
        prefill = best.prefill
        fetch = fetches[(best.decode if prefill is None else prefill).worker_id]
        where = {"fetch_from": fetch.holder, "fetch_blocks": fetch.num_blocks} if fetch else {}
        if fetch:
            terms["fetch_blocks"] = float(fetch.num_blocks)
        if prefill is None:
            return Decision(self.name, LOCAL, None, best.decode.worker_id, terms, **where)
        return Decision(self.name, prefill.role, prefill.worker_id, best.decode.worker_id, terms, **where)

    def _options(self, request: RequestShape, prefills: list[WorkerView], d: WorkerView, cap: float,
                 stalled: dict[str, int], fetches: dict[str, FetchPlan | None]):  # fmt: skip
        n = request.num_prompt_tokens
        prefill, per_token = self.costs.prefill, self.costs.prefill.per_token_s
        decode_s = self._decode_seconds(request, d)
        slot_s = self._slot_wait(request, d)
        d_cached = _cached(d, request)
        d_have, d_fetch_s = _with_fetch(d_cached, fetches[d.worker_id])
        local_new = n - d_have
        if local_new <= cap:
            compute, load_s = self._compute(d, request, local_new, d_have)
            # Each local prefill waiting there pays its own step's fixed cost first (one per decode step).
            queued = d.queued_tokens * per_token + d.waiting_prefills * prefill.fixed_s + compute
            ttft = slot_s + d_fetch_s + _measured(d, local_new, d.waiting_prefills, queued)
            interference = self.interference_weight * stalled.get(d.device, 0) * compute if d.device else (
                self.interference_weight * _decoding(d) * compute)
            miss = self.miss_weight * local_new * per_token
            cost = ttft + interference + decode_s + miss
            yield _Option(cost, None, d, {
                "cost_s": cost, "ttft_s": ttft, "interference_s": interference, "decode_s": decode_s,
                "miss_s": miss, "slot_wait_s": slot_s, "fetch_s": d_fetch_s, "host_load_s": load_s,
                "cached_tokens": float(d_have), "decode_cached_tokens": float(d_cached),
            })  # fmt: skip
        num_bytes = self.costs.kv_bytes(n - d_cached)
        for p in prefills:
            cached, fetch_s = _with_fetch(_cached(p, request), fetches[p.worker_id])
            compute, load_s = self._compute(p, request, n - cached, cached)
            queued = p.queued_tokens * per_token + p.running_requests * prefill.fixed_s + compute
            ttft = fetch_s + _measured(p, n - cached, p.running_requests, queued)
            miss = self.miss_weight * (n - cached) * per_token
            push = self.costs.push(p.measured)
            tail = self.transfer_weight * max(push.latency_s, push.seconds(num_bytes) - compute)
            interference = self.interference_weight * stalled.get(p.device, 0) * compute if p.device else 0.0
            stall = self.stall_weight * max(0.0, slot_s - ttft - tail)
            cost = ttft + tail + stall + interference + decode_s + miss
            yield _Option(cost, p, d, {
                "cost_s": cost, "ttft_s": ttft, "transfer_tail_s": tail, "stall_s": stall,
                "interference_s": interference, "decode_s": decode_s, "miss_s": miss, "slot_wait_s": slot_s,
                "fetch_s": fetch_s, "host_load_s": load_s, "cached_tokens": float(cached),
                "decode_cached_tokens": float(d_cached),
            })  # fmt: skip

    def _compute(self, w: WorkerView, request: RequestShape, num_new: int, num_cached: int):
        """(`w`'s compute for the request, its host-tier load's share): loading what it holds in its host
        tier only back, then prefilling `num_new` tokens after `num_cached` — at its measured rates where
        it has them."""
        host = usable_host_tokens(w, request.num_prompt_tokens, request.block_size)
        load_s = self.costs.host_load_seconds(host, w.measured)
        return load_s + self.costs.prefill_seconds(num_new, num_cached, w.measured), load_s

    def _decode_seconds(self, request: RequestShape, d: WorkerView) -> float:
        """The request's own decode steps on `d`, plus what its sequence adds to the others' steps there,
        plus the wait for the prefills queued on `d` (they stall its batch)."""
        step = self.costs.decode
        num_out = max(1, request.max_tokens)
        context = request.num_prompt_tokens + num_out / 2
        own = num_out * step.step_seconds(d.running_requests + 1, _context_tokens(d, request) + context)
        added = d.running_requests * num_out * (step.per_seq_s + context * step.per_ctx_token_s)
        return own + added + d.queued_tokens * self.costs.prefill.per_token_s

    def _slot_wait(self, request: RequestShape, d: WorkerView) -> float:
        """Predicted wait for a free slot in `d`'s batch: the requests past its cap (this one included)
        each wait for a finisher, and with `cap` sequences a `max_tokens` long one finishes about every
        max_tokens / cap steps (this request's length stands in for the others'); a step takes what `d`
        measures (on a shared device, often well above the cost model's step), at least the model's."""
        cap = d.max_running
        excess = 0 if cap is None else d.running_requests + 1 - cap
        if excess <= 0:
            return 0.0
        step = max(d.step_s, self.costs.decode.step_seconds(cap, _context_tokens(d, request)))
        return excess * max(1, request.max_tokens) * step / cap


def _with_fetch(cached: int, fetch: FetchPlan | None) -> tuple[int, float]:
    """A target's prompt tokens in hand after its planned fetch, and the fetch's time."""
    return (cached, 0.0) if fetch is None else (cached + fetch.num_tokens, fetch.seconds)


def _decoding(d: WorkerView) -> int:
    """The sequences a decode worker's steps compute: its running ones less those waiting (for their
    prefill or a slot), at most its cap; a prefill stalls these, not the waiting."""
    decoding = d.running_requests - d.waiting_prefills
    return decoding if d.max_running is None else min(decoding, d.max_running)


def _measured(w: WorkerView, num_new_tokens: int, num_queued: int, predicted_s: float) -> float:
    """A worker's time to compute its queue (`num_queued` prefills) and `num_new_tokens` more: the cost
    model's `predicted_s`, or the steps that takes at the step time the worker measures, if longer (at
    most `step_tokens` a step, else a prefill a step)."""
    steps = math.ceil((w.queued_tokens + num_new_tokens) / w.step_tokens) if w.step_tokens else num_queued + 1
    return max(predicted_s, steps * w.step_s)


def _cached(w: WorkerView, request: RequestShape) -> int:
    return usable_cached_tokens(w.matched_blocks, request.num_prompt_tokens, request.block_size)


def _context_tokens(w: WorkerView, request: RequestShape) -> float:
    """KV tokens `w`'s running sequences hold, from its free blocks and usage (0 when not reported)."""
    if w.free_blocks is None or w.kv_usage >= 1.0:
        return 0.0
    used_blocks = w.free_blocks * w.kv_usage / (1.0 - w.kv_usage)
    return used_blocks * request.block_size


def _with_room(decodes: list[WorkerView], request: RequestShape) -> list[WorkerView]:
    """Decode workers with room for the request's KV (its prefix match reused); all of them when none has
    (the chosen one then refuses with a clear error rather than the router guessing)."""
    n, bs = request.num_prompt_tokens, request.block_size
    fits = [d for d in decodes if d.free_blocks is None
            or d.free_blocks >= blocks_to_reserve(n, request.max_tokens, bs, d.matched_blocks)]  # fmt: skip
    return fits or decodes
