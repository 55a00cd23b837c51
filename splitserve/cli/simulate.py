"""`splitserve simulate`: run routing policies (A/B arms) through a simulated cluster and write their report.

Every arm runs on a fresh simulated cluster over the same trace (a generated workload or a trace file), once
per offered rate (no `--rates`: at the trace's own timestamps), with the other arms' policies as its shadows;
then the report is written as `splitserve bench ab` writes it (`experiments.report`). Every input is
validated before anything runs: a malformed trace or calibration is one error line naming the file, line
and field, and nothing is written to `--out`.
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitserve.cli.trace_args import add_trace_arguments, load_trace_from_args, parse_rates

if TYPE_CHECKING:  # imported when a command runs, so `splitserve --help` stays light
    from splitserve.experiments.report import ArmRun
    from splitserve.experiments.trace import Trace
    from splitserve.router.cost_model import CostModel
    from splitserve.simulator.config import SimConfig
    from splitserve.simulator.run import SimRun

DEFAULT_POLICIES = "cpd,least_loaded,prefix_affinity,round_robin"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("simulate", help="A/B routing policies in a discrete-event simulation",
                              description=__doc__)  # fmt: skip
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated arms")
    add_trace_arguments(p, default_requests=2000)
    p.add_argument("--rates", default=None, help="offered rates in requests/s, e.g. 2,4,8")
    p.add_argument("--slo-ttft-p90-ms", type=float, default=None, help="the SLO of the sustainable rate")
    p.add_argument("--fresh-prefill", type=int, default=4, help="fresh-pool prefill workers")
    p.add_argument("--warm-prefill", type=int, default=4, help="warm-pool prefill workers")
    p.add_argument("--decode", type=int, default=8, help="decode workers")
    p.add_argument("--prefill-kv-blocks", type=int, default=None, help="KV blocks per prefill worker")
    p.add_argument("--decode-kv-blocks", type=int, default=None, help="KV blocks per decode worker")
    p.add_argument("--decode-max-seqs", type=int, default=None, help="a decode batch's sequence cap")
    p.add_argument("--local-chunk-tokens", type=int, default=None, help="local prefill chunk per step")
    p.add_argument("--transport", default="same-host", help="KV transport: same-host or grpc")
    p.add_argument("--shared-device", action="store_true", help="every worker computes on one device")
    p.add_argument("--calibration", type=Path, default=None, help="cost model file (default: built in)")
    p.add_argument("--no-fetch", action="store_true",
                   help="prefill targets recompute what they lack, never fetch it (the router's --no-fetch)")
    p.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a policy option, passed to every arm that has it (repeatable)",
    )
    p.add_argument("--out", type=Path, default=Path("simulate-out"), help="report folder")
    p.set_defaults(handler=_run)


@dataclass(frozen=True)
class _Inputs:
    """Everything a run needs, validated."""

    trace: Trace
    source: str  # the workload's name or the trace file
    costs: CostModel
    config: SimConfig
    arms: list[str]
    options: dict[str, float]
    rates: list[float | None]


def _run(args: argparse.Namespace) -> int:
    import time

    from splitserve.experiments.report import ArmRun, write_report
    from splitserve.experiments.sessions import oracle_hit_rate
    from splitserve.router.decision_log import DecisionRecord

    inputs = _inputs(args)
    runs: dict[str, list[ArmRun]] = {}
    decisions: dict[str, list[DecisionRecord]] = {}
    started = time.perf_counter()
    num_simulated = 0
    for arm in inputs.arms:
        runs[arm], decisions[arm] = [], []
        for rate in inputs.rates:
            sim = _simulate_arm(inputs, arm, rate, args.seed)
            runs[arm].append(ArmRun(arm, rate, sim.results, sim.duration_s if sim.duration_s > 0 else None))
            decisions[arm] += sim.decisions
            num_simulated += len(sim.results)
    speed = num_simulated / max(time.perf_counter() - started, 1e-9)
    write_report(args.out, runs, oracle_hit_rate=oracle_hit_rate(inputs.trace),
                 slo_ttft_p90_ms=args.slo_ttft_p90_ms, meta=_meta(args, inputs, speed),
                 decisions=decisions)  # fmt: skip
    _print_table(runs)
    print(f"simulated {num_simulated} requests at {speed:.0f} requests/s; report: {args.out}")
    return 0


def _inputs(args: argparse.Namespace) -> _Inputs:
    """Load and check every input; raises ValueError (TraceError, CalibrationError) or FileNotFoundError."""
    from splitserve.router.cost_model import DEFAULT_COST_MODEL, load_calibration
    from splitserve.router.policies import (
        check_policy_options,
        make_policy,
        parse_policy_options,
        policy_options,
    )
    from splitserve.simulator.config import SimConfig

    arms = [name.strip() for name in args.policies.split(",") if name.strip()]
    if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"--policies needs distinct policy names, got {args.policies!r}")
    options = parse_policy_options(args.policy_option)
    check_policy_options(arms, options)
    costs = load_calibration(args.calibration) if args.calibration else DEFAULT_COST_MODEL
    for arm in arms:
        make_policy(arm, costs=costs, **policy_options(arm, options))  # unknown name or bad option: raises
    rates = list(parse_rates(args.rates))
    trace = load_trace_from_args(args)
    source = str(args.trace or args.mooncake or args.workload)
    given = {
        "prefill_kv_blocks": args.prefill_kv_blocks,
        "decode_kv_blocks": args.decode_kv_blocks,
        "decode_max_seqs": args.decode_max_seqs,
        "local_chunk_tokens": args.local_chunk_tokens,
    }
    config = SimConfig(num_fresh=args.fresh_prefill, num_warm=args.warm_prefill, num_decode=args.decode,
                       transport=args.transport, shared_device=args.shared_device, fetch=not args.no_fetch,
                       **{k: v for k, v in given.items() if v is not None})  # fmt: skip
    if config.transport not in costs.transfers:
        raise ValueError(f"--transport {config.transport}: the cost model has only "
                         f"{', '.join(sorted(costs.transfers))}")  # fmt: skip
    # The cluster moves KV over this one transport: the policies plan with its cost, the workers pay it.
    return _Inputs(trace, source, costs.only(config.transport), config, arms, options, rates)


def _simulate_arm(inputs: _Inputs, arm: str, rate: float | None, seed: int) -> SimRun:
    """One arm at one rate on a fresh cluster, with fresh policy instances (cursors start over)."""
    from splitserve.router.policies import make_policy, policy_options
    from splitserve.simulator.run import simulate

    def policy(name: str):
        return make_policy(name, inputs.costs, inputs.config.fetch, **policy_options(name, inputs.options))

    shadows = {other: policy(other) for other in inputs.arms if other != arm}
    return simulate(inputs.trace, policy(arm), inputs.config, inputs.costs, rate=rate, seed=seed,
                    shadows=shadows, arm=arm)  # fmt: skip


def _meta(args: argparse.Namespace, inputs: _Inputs, speed: float) -> dict:
    c, costs = inputs.config, inputs.costs
    return {
        "mode": "simulated", "workload": inputs.source, "requests": len(inputs.trace.requests),
        "block_len": inputs.trace.meta.block_len, "length_scale": args.length_scale,
        "cluster": {"fresh": c.num_fresh, "warm": c.num_warm, "decode": c.num_decode},
        "prefill_kv_blocks": c.prefill_kv_blocks, "decode_kv_blocks": c.decode_kv_blocks,
        "decode_max_seqs": c.decode_max_seqs, "local_chunk_tokens": c.local_chunk_tokens,
        "calibration": {"device": costs.device, "source": costs.source, "measured": costs.measured,
                        "file": str(args.calibration) if args.calibration else None},
        "transport": c.transport, "shared_device": c.shared_device, "fetch": c.fetch, "seed": args.seed,
        "policy_options": inputs.options, "simulated_requests_per_s": round(speed, 1),
        "python": platform.python_version(),
    }  # fmt: skip


def _print_table(runs: dict[str, list[ArmRun]]) -> None:
    from splitserve.experiments.metrics import summarize

    def fmt(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"{'arm':<18}{'rate':>8}{'req/s':>9}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}{'hit rate':>10}"
          f"{'errors':>8}")  # fmt: skip
    for arm, arm_runs in runs.items():
        for run in arm_runs:
            s = summarize(run.results, run.duration_s)
            rate = "trace" if run.rate is None else f"{run.rate:g}"
            print(f"{arm:<18}{rate:>8}{fmt(s['request_throughput'], 2):>9}{fmt(s['median_ttft_ms'], 1):>13}"
                  f"{fmt(s['p90_ttft_ms'], 1):>13}{fmt(s['hit_rate'], 3):>10}{s['errors']:>8}")  # fmt: skip
