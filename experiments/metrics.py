"""Metrics of an experiment run: latency and throughput summaries, the sustainable rate of a sweep, the cache
hit rate over time, and statistics of the routing-decision log.

Everything here is a pure function of `RequestResult`s or `DecisionRecord`s, so a live replay and a simulated
run are summarized alike. Latency and throughput fields are named as `vllm bench serve` names them (times in
ms, throughputs per second). A statistic of no samples is None — never NaN, never an exception. Rendering
(tables, plots) belongs to `report`, not here. Torch-free.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from splitserve.experiments.results import RequestResult
from splitserve.router.decision_log import DecisionRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0 ≤ p ≤ 100) by linear interpolation between closest ranks — numpy.percentile's
    default method. None for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside [0, 100]")
    if not values:
        return None
    xs = sorted(values)
    rank = p / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def _stats(name: str, values_ms: list[float], mean: bool = True) -> dict[str, float | None]:
    """`mean_NAME_ms`, `median_NAME_ms`, `p90_NAME_ms`, `p99_NAME_ms` of the values."""
    out: dict[str, float | None] = {}
    if mean:
        out[f"mean_{name}_ms"] = sum(values_ms) / len(values_ms) if values_ms else None
    out[f"median_{name}_ms"] = percentile(values_ms, 50)
    for p in PERCENTILES[1:]:
        out[f"p{p}_{name}_ms"] = percentile(values_ms, p)
    return out


def _ratio(num: float, den: float | None) -> float | None:
    return None if not den else num / den


def _error_kind(error: str) -> str:
    """The first word of a typed error ("OverloadedError: queue full" → "OverloadedError")."""
    words = error.split()
    return words[0].rstrip(":") if words else "error"


def run_duration(results: Sequence[RequestResult]) -> float | None:
    """First send to last completion over all results. A request that failed without a completion time counts
    as done when it was sent (the run lasted at least that long). None for no results."""
    if not results:
        return None
    start = min(r.sent_s for r in results)
    end = max(r.done_s if r.done_s is not None else r.sent_s for r in results)
    return end - start


def summarize(results: Sequence[RequestResult], duration_s: float | None = None) -> dict:
    """The run's summary (see the module docstring for the field names). Latencies and token counts are over
    ok requests only; `errors` and `error_kinds` count the failed ones. `duration_s` overrides the measured
    duration (`run_duration`); throughputs are None when the duration is None or 0. TPOT per request is
    (e2e − ttft) / (output_len − 1) over requests with output_len > 1; ITL pools every gap of every request.
    `prediction_ratio` is Σ predicted / Σ actual cached tokens (a ratio of sums). Raises ValueError for a
    duration_s ≤ 0."""
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    duration = duration_s if duration_s is not None else run_duration(results)
    num_input = sum(r.input_len for r in ok)
    num_output = sum(r.output_len for r in ok)
    predicted = sum(r.predicted_cached_tokens for r in ok)
    actual = sum(r.cached_tokens for r in ok)
    ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    tpot = [(r.e2e_s - r.ttft_s) * 1e3 / (r.output_len - 1)
            for r in ok if r.output_len > 1 and r.e2e_s is not None and r.ttft_s is not None]  # fmt: skip
    itl = [gap * 1e3 for r in ok for gap in r.itl_s]
    e2el = [r.e2e_s * 1e3 for r in ok if r.e2e_s is not None]
    pools = Counter(r.pool or "unknown" for r in ok)
    return {
        "completed": len(ok),
        "errors": len(failed),
        "error_kinds": dict(Counter(_error_kind(r.error or "") for r in failed)),
        "duration": duration,
        "request_throughput": _ratio(len(ok), duration),
        "output_throughput": _ratio(num_output, duration),
        "total_token_throughput": _ratio(num_input + num_output, duration),
        **_stats("ttft", ttft),
        **_stats("tpot", tpot),
        **_stats("itl", itl),
        **_stats("e2el", e2el),
        "hit_rate": _ratio(actual, num_input),
        "predicted_cached_tokens": predicted,
        "actual_cached_tokens": actual,
        "prediction_ratio": _ratio(predicted, actual),
        "pool_shares": {pool: n / len(ok) for pool, n in sorted(pools.items())},
    }


def error_share(summary: dict) -> float | None:
    """Failed requests over all requests of a summary; None for a run of no requests."""
    return _ratio(summary["errors"], summary["completed"] + summary["errors"])


def passes_slo(summary: dict, slo_ttft_p90_ms: float, max_error_share: float = 0.01) -> bool:
    """p90 TTFT within the SLO and at most `max_error_share` of requests failed. A run without a p90 TTFT
    (nothing completed) fails."""
    share = error_share(summary)
    p90 = summary["p90_ttft_ms"]
    return share is not None and share <= max_error_share and p90 is not None and p90 <= slo_ttft_p90_ms


def sustainable_rate(points: Sequence[tuple[float, dict]], slo_ttft_p90_ms: float,
                     max_error_share: float = 0.01) -> float | None:  # fmt: skip
    """The highest offered rate the system sustains within the SLO.

    `points` are (offered rate, `summarize` output) of a rate sweep, in any order. A point passes when its
    p90_ttft_ms ≤ `slo_ttft_p90_ms` and errors / (completed + errors) ≤ `max_error_share`. Let r_i be the
    highest rate such that it and every lower rate pass, and r_k the next (failing) rate:
    - when r_k fails on latency alone, the result is interpolated linearly on p90_ttft_ms between the two:
      r_i + (SLO − p90_i) / (p90_k − p90_i) · (r_k − r_i), the rate at which p90 TTFT would reach the SLO;
    - when r_k fails on errors (or has no p90 TTFT), the result is r_i;
    - when every rate passes, it is the highest rate; when the lowest rate fails, None (as for no points).
    Passing rates above the first failure do not count (latency need not be monotone in the rate).
    Raises ValueError for a negative or repeated rate, or a non-positive SLO."""
    if slo_ttft_p90_ms <= 0:
        raise ValueError(f"slo_ttft_p90_ms must be positive, got {slo_ttft_p90_ms}")
    ordered = sorted(points, key=lambda point: point[0])
    rates = [rate for rate, _ in ordered]
    if any(rate < 0 for rate in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"rates must be non-negative and distinct, got {rates}")
    for k, (rate_k, summary_k) in enumerate(ordered):
        if passes_slo(summary_k, slo_ttft_p90_ms, max_error_share):
            continue
        if k == 0:
            return None
        rate_i, summary_i = ordered[k - 1]
        share_k = error_share(summary_k)
        p90_i, p90_k = summary_i["p90_ttft_ms"], summary_k["p90_ttft_ms"]
        if p90_k is None or share_k is None or share_k > max_error_share:
            return rate_i
        return rate_i + (slo_ttft_p90_ms - p90_i) / (p90_k - p90_i) * (rate_k - rate_i)
    return rates[-1] if rates else None


def rolling_hit_rate(results: Iterable[RequestResult], window_s: float) -> list[tuple[float, float]]:
    """(t, Σ cached / Σ input tokens of the ok requests sent in (t − window_s, t]) at each ok request's
    sent_s, in time order; points whose window holds no input tokens are left out."""
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, got {window_s}")
    ok = sorted((r for r in results if r.ok), key=lambda r: r.sent_s)
    points: list[tuple[float, float]] = []
    start = cached = num_input = 0
    for r in ok:
        cached += r.cached_tokens
        num_input += r.input_len
        while ok[start].sent_s <= r.sent_s - window_s:
            cached -= ok[start].cached_tokens
            num_input -= ok[start].input_len
            start += 1
        if num_input > 0:
            points.append((r.sent_s, cached / num_input))
    return points


def summarize_decisions(records: Sequence[DecisionRecord], top: int = 3) -> dict:
    """Statistics of one arm's decisions: `num_decisions`; `agreement` {other arm: share of the records
    carrying that arm's shadow choice where it equals the arm's own choice (pool, prefill and decode)};
    `pool_agreement` (the same on the pool alone); `compared` {other arm: records carrying its shadow};
    `mean_terms` {term: mean over the records that have it}; `top_choices` [[pool, prefill worker or None,
    count], ...], the `top` most common, ties in order of first appearance."""
    agree: Counter[str] = Counter()
    pool_agree: Counter[str] = Counter()
    compared: Counter[str] = Counter()
    term_sums: dict[str, float] = {}
    term_counts: Counter[str] = Counter()
    for rec in records:
        for other, shadow in rec.shadow.items():
            compared[other] += 1
            agree[other] += shadow == rec.choice
            pool_agree[other] += shadow.pool == rec.choice.pool
        for term, value in rec.terms.items():
            term_sums[term] = term_sums.get(term, 0.0) + value
            term_counts[term] += 1
    choices = Counter((rec.choice.pool, rec.choice.prefill) for rec in records)
    return {
        "num_decisions": len(records),
        "agreement": {other: agree[other] / n for other, n in sorted(compared.items())},
        "pool_agreement": {other: pool_agree[other] / n for other, n in sorted(compared.items())},
        "compared": dict(sorted(compared.items())),
        "mean_terms": {term: term_sums[term] / n for term, n in sorted(term_counts.items())},
        "top_choices": [[pool, prefill, n] for (pool, prefill), n in choices.most_common(top)],
    }
