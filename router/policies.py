"""Routing policies: pure objects that pick a prefill target and a decode worker for one request.

A policy sees the request's shape and, for every live worker, how many of the request's leading blocks
it holds (from the router's prefix-index mirror) and its own reported load; it returns a `Decision` with
the score terms that led to it. No I/O and no clock: the live router, the A/B framework and the simulator
share these objects. `round_robin` keeps a cursor; the others are functions of their inputs.

Policies (`make_policy(name, **config)`):
- `round_robin`: prefill workers (both pools) and decode workers in turn.
- `least_loaded`: the prefill and the decode worker with the least queued work.
- `prefix_affinity`: the prefill worker holding most of the prompt, net of load, with a guard against hot
  spots; the decode worker by load.
- `cpd`: cache-aware prefill/decode split by predicted cost — see `cpd.CPD`.
- `cpd_threshold`: the earlier, threshold-driven cpd — see `CPDThreshold`.
- `colocated`: no disaggregation — every request prefilled on a decode worker (the baseline).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from splitserve.router.cost_model import CostModel
from splitserve.router.cpd import CPD
from splitserve.router.policy_types import (
    DECODE,
    FRESH,
    LOCAL,
    WARM,
    Decision,
    NoWorker,
    Policy,
    RequestShape,
    WorkerView,
    load_key,
    require,
    split_roles,
)

__all__ = ["DECODE", "FRESH", "LOCAL", "POLICIES", "WARM", "Decision", "NoWorker", "Policy", "RequestShape",
           "WorkerView", "check_policy_options", "make_policy", "parse_policy_options",
           "policy_options"]  # fmt: skip

class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def route(self, request: RequestShape, workers: Sequence[WorkerView]) -> Decision:
        prefills, decodes = split_roles(workers)
        prefills = sorted(require(prefills), key=lambda w: w.worker_id)
        decodes = sorted(decodes, key=lambda w: w.worker_id)
        turn = next(self._turn)
        p, d = prefills[turn % len(prefills)], decodes[turn % len(decodes)]
        return Decision(self.name, p.role, p.worker_id, d.worker_id, {"turn": float(turn)})


class LeastLoaded:
    name = "least_loaded"

    def route(self, request: RequestShape, workers: Sequence[WorkerView]) -> Decision:
        prefills, decodes = split_roles(workers)
        p = min(require(prefills), key=load_key)
        d = min(decodes, key=load_key)
        terms = {"prefill_queued_tokens": float(p.queued_tokens),
                 "decode_queued_tokens": float(d.queued_tokens)}  # fmt: skip
        return Decision(self.name, p.role, p.worker_id, d.worker_id, terms)


@dataclass
class PrefixAffinity:
    """Score = cached tokens the worker saves − `load_weight` × its queued tokens; the best scorer wins
    unless its queue exceeds the least loaded worker's by more than `max_queue_gap_tokens` (hot-spot
    guard: then the least loaded one takes the request)."""

    load_weight: float = 1.0
    max_queue_gap_tokens: int = 8192
    name: str = "prefix_affinity"

    def route(self, request: RequestShape, workers: Sequence[WorkerView]) -> Decision:
        prefills, decodes = split_roles(workers)
        prefills = require(prefills)

        def score(w: WorkerView) -> float:
            return w.matched_blocks * request.block_size - self.load_weight * w.queued_tokens

        best = max(prefills, key=lambda w: (score(w), -w.queued_tokens, w.worker_id))
        idle = min(prefills, key=load_key)
        guarded = best.queued_tokens - idle.queued_tokens > self.max_queue_gap_tokens
        p = idle if guarded else best
        d = min(decodes, key=load_key)
        terms = {"cached_tokens": float(p.matched_blocks * request.block_size), "score": score(p),
                 "queued_tokens": float(p.queued_tokens), "hot_spot_guard": float(guarded)}  # fmt: skip
        return Decision(self.name, p.role, p.worker_id, d.worker_id, terms)


@dataclass
class CPDThreshold:
    """Cache-aware prefill/decode split by fixed thresholds — `cpd` before the A/B experiment showed its
    faults (kept so an A/B can show the difference): the warm pool takes every mostly-cached prompt even
    when another worker holds more of it, and its decode choice ignores running requests.

    1. Decode worker: the most cached tokens of this prompt net of `decode_load_weight` × queued tokens
       (a decode worker holding the context saves a transfer of those blocks) — every decode worker that
       holds a conversation's earlier turns has its KV.
    2. If that worker's uncached suffix is at most `local_prefill_max_tokens`, it prefills the request
       itself (LOCAL): a short suffix costs less to compute than a round trip plus a transfer, and
       interferes little with its decode batch.
    3. Else the predicted hit ratio (the best match anywhere / prompt length) picks the pool: at least
       `warm_min_hit_ratio` → the warm pool worker with the best match net of `load_weight` × queued
       tokens (with `PrefixAffinity`'s hot-spot guard); below it → the least loaded fresh worker (fresh
       prompts gain nothing from affinity, and keeping them off the warm pool protects its cache).
       An empty pool falls back to the other.

    Defaults: a suffix of ≤ 256 tokens is one chunked-prefill slice that a decode step absorbs; a hit
    ratio of 0.5 splits "mostly cached" from "mostly new"; one queued token costs one cached token.
    """

    local_prefill_max_tokens: int = 256
    warm_min_hit_ratio: float = 0.5
    load_weight: float = 1.0
    decode_load_weight: float = 1.0
    max_queue_gap_tokens: int = 8192
    name: str = "cpd_threshold"

    def route(self, request: RequestShape, workers: Sequence[WorkerView]) -> Decision:
        prefills, decodes = split_roles(workers)
        bs = request.block_size
        d = max(decodes, key=lambda w: (w.matched_blocks * bs - self.decode_load_weight * w.queued_tokens,
                                        -w.queued_tokens, w.worker_id))  # fmt: skip
        best_match = max(w.matched_blocks for w in workers)
        hit_ratio = best_match * bs / request.num_prompt_tokens
        decode_suffix = request.num_prompt_tokens - d.matched_blocks * bs
        terms = {"hit_ratio": hit_ratio, "decode_cached_tokens": float(d.matched_blocks * bs),
                 "decode_uncached_tokens": float(decode_suffix)}  # fmt: skip
        if decode_suffix <= self.local_prefill_max_tokens or not prefills:
            return Decision(self.name, LOCAL, None, d.worker_id, terms)
        warm = [w for w in prefills if w.role == WARM]
        fresh = [w for w in prefills if w.role == FRESH]
        if (hit_ratio >= self.warm_min_hit_ratio and warm) or not fresh:
            guard = PrefixAffinity(self.load_weight, self.max_queue_gap_tokens)
            inner = guard.route(request, [*warm, d] if warm else [*fresh, d])
            p = next(w for w in prefills if w.worker_id == inner.prefill)
            terms.update(inner.terms)
        else:
            p = min(fresh, key=load_key)
            terms["queued_tokens"] = float(p.queued_tokens)
        return Decision(self.name, p.role, p.worker_id, d.worker_id, terms)


class Colocated:
    """Every request prefilled on a decode worker (no prefill pools): the one holding most of the prompt,
    net of its queued tokens and running requests — aggregated serving, the baseline disaggregation must
    beat."""

    name = "colocated"

    def route(self, request: RequestShape, workers: Sequence[WorkerView]) -> Decision:
        _, decodes = split_roles(workers)
        bs = request.block_size
        d = max(decodes, key=lambda w: (w.matched_blocks * bs - w.queued_tokens, -w.running_requests,
                                        w.worker_id))  # fmt: skip
        terms = {"cached_tokens": float(d.matched_blocks * bs), "queued_tokens": float(d.queued_tokens)}
        return Decision(self.name, LOCAL, None, d.worker_id, terms)


POLICIES = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "prefix_affinity": PrefixAffinity,
            "cpd": CPD, "cpd_threshold": CPDThreshold, "colocated": Colocated}  # fmt: skip


def make_policy(name: str, costs: CostModel | None = None, fetch: bool = True, **config) -> Policy:
    """A policy by name, configured. `costs`: the cost model, for the policies that predict costs (others
    ignore it); `fetch` False: a policy that plans fetches plans none (the deployment's fetches are off).
    Raises ValueError naming the known policies for an unknown one, or a bad option."""
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    if costs is not None and "costs" in getattr(cls, "__dataclass_fields__", {}):
        config["costs"] = costs
    if not fetch and "fetch" in getattr(cls, "__dataclass_fields__", {}):
        config["fetch"] = False
    known = [f for f in getattr(cls, "__dataclass_fields__", {}) if f not in ("name", "costs")]
    unknown = sorted(set(config) - set(known) - {"costs"})
    if unknown:
        raise ValueError(f"policy {name} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(known) or 'none'}")  # fmt: skip
    return cls(**config)


def check_policy_options(names: Sequence[str], options: dict[str, float]) -> None:
    """ValueError for an option none of the policies `names` takes (a typo would be silently ignored)."""
    taken = {f for n in names if n in POLICIES for f in getattr(POLICIES[n], "__dataclass_fields__", {})}
    unused = sorted(set(options) - taken)
    if unused:
        raise ValueError(f"no policy among {', '.join(names)} takes the option {', '.join(unused)}")


def policy_options(name: str, options: dict[str, float]) -> dict[str, float | int]:
    """Of `options` (e.g. parsed `--policy-option NAME=VALUE`s shared by several arms), the ones policy
    `name` takes (its dataclass fields); int fields get ints."""
    fields = getattr(POLICIES[name], "__dataclass_fields__", {})
    return {k: (int(v) if fields[k].type == "int" else v) for k, v in options.items() if k in fields}


def parse_policy_options(specs: Sequence[str]) -> dict[str, float]:
    """["local_prefill_max_tokens=128", ...] → {"local_prefill_max_tokens": 128.0}. ValueError: malformed."""
    options = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"a policy option is NAME=VALUE, got {spec!r}")
        try:
            options[name] = float(value)
        except ValueError:
            raise ValueError(f"policy option {name}: expected a number, got {value!r}") from None
    return options
