"""Whether a request's prefill target should fetch its leading blocks from another worker, and from whom.

The index says which workers hold how many of a prompt's leading blocks. When another worker holds more
than the target (the worker that prefills: a prefill worker, or the decode worker itself for a local
prefill), the target may fetch the difference (`kvtransfer.fetch`) instead of recomputing it. It is worth
it when moving those blocks' KV is predicted to take less than computing their tokens, with the cost
model's transfer and prefill formulas — the same ones the `cpd` policy prices placements with and the
simulator runs. The fetch runs before the target's prefill, so its time is in the request's TTFT. A target
that has fetched before reports what its fetches took (mean time and bytes): what that time holds beyond
the model's bandwidth term is its measured per-fetch overhead (RPCs, the engines' loop turns on both
sides), and a fetch is predicted at the larger of the model's time and that overhead plus the bytes at
the model's bandwidth. A holder that holds some of the blocks in its host tier only loads them back
first (`CostModel.host_load_seconds`); the compute a fetch saves is priced at the target's measured
prefill rate where it has one (`CostModel.prefill_seconds`).

Pure and torch-free: the live router, the cpd policy and the simulator call the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.router.cost_model import CostModel
from splitserve.router.policy_types import Decision, RequestShape, WorkerView, host_blocks_between


@dataclass(frozen=True)
class FetchPlan:
    holder: str  # the worker to fetch from
    num_blocks: int  # leading blocks of the prompt it holds (usable ones: the last token is computed)
    num_tokens: int  # prompt tokens the fetch brings beyond the target's own prefix hit
    seconds: float  # predicted time of the fetch
    saved_s: float  # predicted prefill compute it saves


def plan_fetch(
    request: RequestShape, target: WorkerView, workers: Sequence[WorkerView], costs: CostModel
) -> FetchPlan | None:
    """The cheapest way for `target` to get the leading blocks another of `workers` holds beyond its own:
    a plan naming the worker holding most of them when fetching is predicted faster than recomputing,
    else None."""
    return plan_fetches(request, [target], workers, costs)[target.worker_id]


def plan_fetches(
    request: RequestShape, targets: Sequence[WorkerView], workers: Sequence[WorkerView], costs: CostModel
) -> dict[str, FetchPlan | None]:
    """`plan_fetch` for each of `targets`, the holders ranked once (a policy weighing every target asks
    for all of them on each decision)."""
    n, bs = request.num_prompt_tokens, request.block_size
    usable = (n - 1) // bs  # a hit never covers the last prompt token

    def held(w: WorkerView) -> int:
        return min(w.matched_blocks, usable)

    # The best two holders: a target's holder is the best one that is not itself.
    ranked = sorted(workers, key=lambda w: (held(w), -w.queued_tokens, w.worker_id), reverse=True)[:2]
    transfer, compute = costs.transfer(), costs.prefill_seconds
    plans: dict[str, FetchPlan | None] = {}
    for target in targets:
        own = held(target)
        holder = next((w for w in ranked if w.worker_id != target.worker_id), None)
        plans[target.worker_id] = None
        if holder is None or held(holder) <= own:
            continue
        cached, tokens = own * bs, (held(holder) - own) * bs
        num_bytes = costs.kv_bytes(tokens)
        seconds = transfer.seconds(num_bytes)
        if target.fetch_s > 0:  # what this target's fetches measured
            overhead = max(0.0, target.fetch_s - target.fetch_bytes / transfer.bytes_per_s)
            seconds = max(seconds, overhead + num_bytes / transfer.bytes_per_s)
        loaded = host_blocks_between(holder, own, held(holder)) * bs  # the holder loads them back first
        seconds += costs.host_load_seconds(loaded, holder.measured)
        m = target.measured
        saved = compute(n - cached, cached, m) - compute(n - cached - tokens, cached + tokens, m)
        if seconds < saved:
            plans[target.worker_id] = FetchPlan(holder.worker_id, held(holder), tokens, seconds, saved)
    return plans


def with_fetch(decision: Decision, request: RequestShape, workers: Sequence[WorkerView], costs: CostModel,
               policy: object) -> Decision:  # fmt: skip
    """`decision` with its target's fetch planned — unless the `policy` that made it plans fetches itself
    (it has a `fetch` option: its decision stands as it is)."""
    if hasattr(policy, "fetch"):
        return decision
    target = next((w for w in workers if w.worker_id == decision.target), None)
    plan = None if target is None else plan_fetch(request, target, workers, costs)
    if plan is None:
        return decision
    terms = {**decision.terms, "fetch_blocks": float(plan.num_blocks), "fetch_s": plan.seconds}
    return dataclasses.replace(decision, terms=terms, fetch_from=plan.holder, fetch_blocks=plan.num_blocks)
