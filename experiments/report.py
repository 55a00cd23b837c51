"""The A/B report: the runs of every arm (routing policy), summarized, compared and plotted in one folder.

`write_report` owns the folder's files: `results.json` (the machine-readable summary), `requests.jsonl`
(every request), `report.md` (tables and embedded plots) and the PNG plots. It reads `RequestResult`s and
`DecisionRecord`s only, so a live replay and a simulated run report alike. The numbers come from `metrics`;
this module decides which run is an arm's headline and how things are laid out. Torch-free; matplotlib is
imported only while plotting, on its Agg canvas.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from splitserve.experiments import metrics
from splitserve.experiments.results import RequestResult
from splitserve.router.decision_log import DecisionRecord

PLOTS = {  # file → title
    "ttft_cdf.png": "TTFT CDF at the headline rate",
    "latency_vs_rate.png": "Latency vs offered rate",
    "hit_rate_over_time.png": "Prefix-cache hit rate over time",
    "pool_shares.png": "Pool shares",
}


@dataclass
class ArmRun:
    """One run of one arm: its offered rate (req/s; None when the trace's own timestamps were replayed)."""

    arm: str
    rate: float | None
    results: list[RequestResult]
    duration_s: float | None = None
    # The router's view of every worker as the run ended (`Client.status()["workers"]`: load, prefix hits
    # by tier since start, measured costs); None where there is no live cluster (the simulator).
    workers: list[dict] | None = None


def write_report(out_dir: str | Path, runs: dict[str, list[ArmRun]], *, oracle_hit_rate: float,
                 slo_ttft_p90_ms: float | None = None, meta: dict,
                 decisions: dict[str, Sequence[DecisionRecord]] | None = None) -> dict:  # fmt: skip
    """Writes results.json, requests.jsonl, report.md and the PNG plots into `out_dir` (created; existing
    files of those names are replaced) and returns the results dict written to results.json.

    `runs` maps each arm to its runs (a rate sweep, or one run). An arm's headline run is its highest rate
    that passes the SLO together with every lower rate (`metrics.sustainable_rate`'s definition) when an SLO
    is given, else — or when none passes — its lowest-rate run. `decisions` maps an arm to its own decision
    records (with their shadow choices). Raises ValueError, before writing anything, for no arms, an arm
    with no runs, a run filed under another arm, a rate ≤ 0 or repeated, a rate-less run beside others, an
    oracle hit rate outside [0, 1], a non-positive SLO or duration, or decisions of an unknown arm."""
    sweeps = _validated(runs, oracle_hit_rate, slo_ttft_p90_ms, decisions)
    headlines = {arm: _headline(sweep, slo_ttft_p90_ms) for arm, sweep in sweeps.items()}
    results: dict = {"meta": meta, "slo_ttft_p90_ms": slo_ttft_p90_ms,
                     "arms": {arm: _arm_entry(sweep, headlines[arm], oracle_hit_rate, slo_ttft_p90_ms)
                              for arm, sweep in sweeps.items()}}  # fmt: skip
    if decisions is not None:
        results["decisions"] = {arm: metrics.summarize_decisions(recs) for arm, recs in decisions.items()}
    results_text = json.dumps(results, indent=2, allow_nan=False, default=str)
    request_lines = [json.dumps({**r.to_json(), "rate": run.rate}, allow_nan=False)
                     for sweep in sweeps.values() for run, _ in sweep for r in run.results]  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(results_text + "\n")
    (out / "requests.jsonl").write_text("".join(line + "\n" for line in request_lines))
    _plot_ttft_cdf(out / "ttft_cdf.png", {arm: run for arm, (run, _) in headlines.items()})
    _plot_latency_vs_rate(out / "latency_vs_rate.png", sweeps, slo_ttft_p90_ms)
    _plot_hit_rate(out / "hit_rate_over_time.png", {arm: run for arm, (run, _) in headlines.items()},
                   oracle_hit_rate)  # fmt: skip
    _plot_pool_shares(out / "pool_shares.png", results["arms"])
    (out / "report.md").write_text(_markdown(results))
    return results


Sweep = list[tuple[ArmRun, dict]]  # an arm's runs in rate order, each with its summary


def _validated(runs: dict[str, list[ArmRun]], oracle_hit_rate: float, slo: float | None,
               decisions: dict[str, Sequence[DecisionRecord]] | None) -> dict[str, Sweep]:  # fmt: skip
    if not runs:
        raise ValueError("no arms to report")
    if not 0 <= oracle_hit_rate <= 1:
        raise ValueError(f"oracle_hit_rate must be in [0, 1], got {oracle_hit_rate}")
    if slo is not None and slo <= 0:
        raise ValueError(f"slo_ttft_p90_ms must be positive, got {slo}")
    if decisions is not None and (unknown := set(decisions) - set(runs)):
        raise ValueError(f"decisions of arms without runs: {sorted(unknown)}")
    sweeps: dict[str, Sweep] = {}
    for arm, arm_runs in runs.items():
        if not arm_runs:
            raise ValueError(f"arm {arm!r} has no runs")
        if any(run.arm != arm for run in arm_runs):
            raise ValueError(f"arm {arm!r} holds runs of {sorted({run.arm for run in arm_runs})}")
        rates = [run.rate for run in arm_runs]
        if None in rates and len(rates) > 1:
            raise ValueError(f"arm {arm!r}: a run at trace timestamps (rate None) must be its only run")
        if any(rate is not None and rate <= 0 for rate in rates) or len(set(rates)) != len(rates):
            raise ValueError(f"arm {arm!r}: rates must be positive and distinct, got {rates}")
        if any(run.duration_s is not None and run.duration_s <= 0 for run in arm_runs):
            raise ValueError(f"arm {arm!r}: durations must be positive")
        ordered = sorted(arm_runs, key=lambda run: run.rate or 0.0)
        sweeps[arm] = [(run, metrics.summarize(run.results, run.duration_s)) for run in ordered]
    return sweeps


def _headline(sweep: Sweep, slo: float | None) -> tuple[ArmRun, dict]:
    if slo is None or len(sweep) == 1:
        return sweep[0]
    passing = 0
    while passing < len(sweep) and metrics.passes_slo(sweep[passing][1], slo):
        passing += 1
    return sweep[max(passing - 1, 0)]


def _arm_entry(sweep: Sweep, headline: tuple[ArmRun, dict], oracle: float, slo: float | None) -> dict:
    run, summary = headline
    sustainable = None
    if slo is not None and len(sweep) > 1:
        sustainable = metrics.sustainable_rate([(r.rate, s) for r, s in sweep if r.rate is not None], slo)
    hit_rate = summary["hit_rate"]
    return {**summary, "oracle_hit_rate": oracle,
            "hit_rate_vs_oracle": None if hit_rate is None or oracle == 0 else hit_rate / oracle,
            "sustainable_rate": sustainable, "rate": run.rate,
            "sweep": [{"rate": r.rate, **s, **({"workers": r.workers} if r.workers is not None else {})}
                      for r, s in sweep]}  # fmt: skip


# --- report.md ---------------------------------------------------------------------------------------------

COMPARISON = (("rate", "rate"), ("request_throughput", "req/s"), ("output_throughput", "out tok/s"),
              ("sustainable_rate", "sustainable req/s"), ("median_ttft_ms", "TTFT p50 ms"),
              ("p90_ttft_ms", "TTFT p90 ms"), ("p99_ttft_ms", "TTFT p99 ms"),
              ("mean_tpot_ms", "TPOT mean ms"), ("p99_tpot_ms", "TPOT p99 ms"), ("p99_itl_ms", "ITL p99 ms"),
              ("mean_e2el_ms", "E2E mean ms"), ("hit_rate", "hit rate"), ("oracle_hit_rate", "oracle"),
              ("prediction_ratio", "pred/actual"), ("errors", "errors"))  # fmt: skip
SWEEP = (("rate", "rate"), ("completed", "ok"), ("errors", "errors"), ("request_throughput", "req/s"),
         ("p90_ttft_ms", "TTFT p90 ms"), ("p99_ttft_ms", "TTFT p99 ms"), ("mean_tpot_ms", "TPOT mean ms"),
         ("hit_rate", "hit rate"))  # fmt: skip


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        digits = 0 if abs(value) >= 100 else 2 if abs(value) >= 1 else 3
        return f"{value:.{digits}f}"
    text = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _markdown(results: dict) -> str:
    arms = results["arms"]
    lines = ["# splitserve A/B report", "", *_table(["key", "value"], list(results["meta"].items()))]
    slo = results["slo_ttft_p90_ms"]
    lines += ["## Arms", "", f"SLO: p90 TTFT ≤ {_fmt(slo)} ms." if slo is not None else "No SLO given.", ""]
    rows = [[arm, *(entry[key] for key, _ in COMPARISON)] for arm, entry in arms.items()]
    lines += _table(["arm", *(label for _, label in COMPARISON)], rows)
    for arm, entry in arms.items():
        if len(entry["sweep"]) > 1:
            lines += [f"### Sweep: {arm}", ""]
            lines += _table([label for _, label in SWEEP], [[p[k] for k, _ in SWEEP] for p in entry["sweep"]])
    pools = sorted({pool for entry in arms.values() for pool in entry["pool_shares"]})
    pool_rows = [[arm, *(entry["pool_shares"].get(p, 0.0) for p in pools)] for arm, entry in arms.items()]
    lines += ["## Pool shares", "", *_table(["arm", *pools], pool_rows)]
    lines += _ratio_section(arms)
    if "decisions" in results:
        lines += _decisions_section(results["decisions"])
    lines += ["## Plots", ""] + [f"![{title}]({name})\n" for name, title in PLOTS.items()]
    return "\n".join(lines)


def _ratio_section(arms: dict) -> list[str]:
    """Each arm's sustainable rate over every other arm's — request throughput when an arm has none."""
    key = "sustainable_rate" if all(e["sustainable_rate"] for e in arms.values()) else "request_throughput"
    names = list(arms)
    rows = [[a, *(None if a == b or not arms[b][key] or arms[a][key] is None else arms[a][key] / arms[b][key]
                  for b in names)] for a in names]  # fmt: skip
    return [f"## Ratios of {key} (row / column)", "", *_table(["arm", *names], rows)]


def _decisions_section(decisions: dict) -> list[str]:
    lines = ["## Decisions", ""]
    for arm, d in decisions.items():
        lines += [f"### {arm}: {d['num_decisions']} decisions", ""]
        lines += _table(["shadow arm", "compared", "same choice", "same pool"],
                        [[other, n, d["agreement"][other], d["pool_agreement"][other]]
                         for other, n in d["compared"].items()])  # fmt: skip
        lines += _table(["score term", "mean"], list(d["mean_terms"].items()))
        total = d["num_decisions"]
        rows = [[pool, prefill or "local", n, n / total] for pool, prefill, n in d["top_choices"]]
        lines += _table(["pool", "prefill worker", "count", "share"], rows)
    return lines


# --- plots -------------------------------------------------------------------------------------------------


def _figure(num_axes: int = 1):  # -> (Figure, list[Axes]); matplotlib types stay out of the signature
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * num_axes, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, num_axes, squeeze=False)[0]
    return fig, list(axes)


def _finish(fig, axes, drawn: bool, path: Path) -> None:
    for ax in axes:
        if drawn and ax.get_legend_handles_labels()[0]:
            ax.legend()
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, format="png", dpi=100)


def _plot_ttft_cdf(path: Path, headline_runs: dict[str, ArmRun]) -> None:
    fig, (ax,) = _figure()
    drawn = False
    for arm, run in headline_runs.items():
        ttft_ms = sorted(r.ttft_s * 1e3 for r in run.results if r.ok and r.ttft_s is not None)
        if ttft_ms:
            ax.step(ttft_ms, [(i + 1) / len(ttft_ms) for i in range(len(ttft_ms))], where="post", label=arm)
            drawn = True
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title=PLOTS[path.name], ylim=(0, 1.02))
    _finish(fig, [ax], drawn, path)


def _plot_latency_vs_rate(path: Path, sweeps: dict[str, Sweep], slo: float | None) -> None:
    fig, axes = _figure(2)
    drawn = False
    for arm, sweep in sweeps.items():
        for ax, key in zip(axes, ("p90_ttft_ms", "mean_tpot_ms"), strict=True):
            points = [(run.rate, s[key]) for run, s in sweep if run.rate is not None and s[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=arm)
                drawn = True
    if slo is not None:
        axes[0].axhline(slo, color="red", linestyle=":", label="SLO")
    axes[0].set(xlabel="offered rate (req/s)", ylabel="p90 TTFT (ms)", title="p90 TTFT vs offered rate")
    axes[1].set(xlabel="offered rate (req/s)", ylabel="mean TPOT (ms)", title="mean TPOT vs offered rate")
    for ax in axes:
        ax.set_ylim(bottom=0)  # latencies from zero: a flat line reads as flat, not as axis offset noise
    _finish(fig, axes, drawn, path)


def _plot_hit_rate(path: Path, headline_runs: dict[str, ArmRun], oracle: float) -> None:
    """Rolling windows of a tenth of each run's send span (1 s for a run sent at one instant)."""
    fig, (ax,) = _figure()
    drawn = False
    for arm, run in headline_runs.items():
        sent = [r.sent_s for r in run.results if r.ok]
        window_s = (max(sent) - min(sent)) / 10 if len(sent) > 1 and max(sent) > min(sent) else 1.0
        points = metrics.rolling_hit_rate(run.results, window_s)
        if points:
            ax.plot(*zip(*points, strict=True), label=arm)
            drawn = True
    ax.axhline(oracle, color="black", linestyle="--", label="oracle")
    ax.set(xlabel="sent (s)", ylabel="cached / input tokens", title=PLOTS[path.name], ylim=(0, 1.02))
    _finish(fig, [ax], drawn, path)


def _plot_pool_shares(path: Path, arms: dict) -> None:
    fig, (ax,) = _figure()
    pools = sorted({pool for entry in arms.values() for pool in entry["pool_shares"]})
    bottoms = [0.0] * len(arms)
    for pool in pools:
        shares = [entry["pool_shares"].get(pool, 0.0) for entry in arms.values()]
        ax.bar(list(arms), shares, bottom=bottoms, label=pool)
        bottoms = [b + s for b, s in zip(bottoms, shares, strict=True)]
    ax.set(ylabel="share of ok requests", title=PLOTS[path.name], ylim=(0, 1.02))
    if not pools:
        ax.bar(list(arms), [0.0] * len(arms))
    _finish(fig, [ax], bool(pools), path)
