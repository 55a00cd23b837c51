"""`splitserve bench ab` (routing-policy A/B experiments on a live cluster) and `splitserve bench trace`
(write a workload trace, or convert one to and from the Mooncake format)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitserve.cli.trace_args import add_trace_arguments, load_trace_from_args, parse_rates


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="A/B experiments and workload traces", description=__doc__)
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    _register_ab(sub)
    _register_trace(sub)


def _register_ab(sub) -> None:
    p = sub.add_parser("ab", help="replay a workload against several routing policies and compare them",
                       description="Replay one trace against each policy on one cluster (caches reset "
                                   "between runs) or as a live split, and write report.md, results.json, "
                                   "requests.jsonl and PNG plots.")  # fmt: skip
    p.add_argument("--policies", required=True, help="comma-separated, e.g. cpd,least_loaded")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--address", default=None, help="an existing router (HOST:PORT)")
    target.add_argument("--model", default=None, help="bring up a cluster of this checkpoint")
    add_trace_arguments(p, default_requests=200)
    p.add_argument("--rates", default=None, help="request rates to sweep, e.g. 1,2,4 (default: trace times)")
    p.add_argument("--slo-ttft-p90-ms", type=float, default=None, help="the TTFT p90 SLO of the sweep")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--live-split", action="store_true", help="one router runs every arm at once (--ab)")
    p.add_argument("--vocab-size", type=int, default=None, help="with --address: the model's vocabulary")
    p.add_argument("--fresh-prefill", type=int, default=1)
    p.add_argument("--warm-prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--block-size", type=int, default=16, help="the workers' KV block size")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="an option for every worker, e.g. --worker-arg=--num-blocks=2048 (repeatable)")
    p.add_argument("--gpus", default="", help="CUDA_VISIBLE_DEVICES for the workers in turn, e.g. 0,1,2,3")
    p.add_argument("--policy-option", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--calibration", type=Path, default=None, help="the cost model for cpd")
    p.add_argument("--no-fetch", action="store_true",
                   help="the router never plans fetches (prefill targets recompute what they lack)")
    p.add_argument("--device-note", default="", help="recorded in the report (e.g. the GPU model)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=_run_ab)


def _run_ab(args: argparse.Namespace) -> int:
    from splitserve.experiments.ab import ABConfig, run_ab
    from splitserve.experiments.local_cluster import LocalClusterSpec
    from splitserve.router.cost_model import load_calibration
    from splitserve.router.policies import check_policy_options, make_policy, parse_policy_options

    trace = load_trace_from_args(args)
    if args.calibration is not None:
        load_calibration(args.calibration)  # a bad file fails here, before anything runs
    policies = tuple(p for p in args.policies.split(",") if p)
    for name in policies:
        make_policy(name)  # an unknown policy fails here, not in a router started later
    check_policy_options(policies, parse_policy_options(args.policy_option))
    router_args = [f"--policy-option={o}" for o in args.policy_option]
    if args.calibration is not None:
        router_args += ["--calibration", str(args.calibration.resolve())]
    if args.no_fetch:
        router_args.append("--no-fetch")
    cluster = None
    if args.model is not None:
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
        cluster = LocalClusterSpec(args.model, args.out / "logs", args.fresh_prefill, args.warm_prefill,
                                   args.decode, args.block_size, tuple(args.worker_arg),
                                   tuple(g for g in args.gpus.split(",") if g))  # fmt: skip
    elif args.vocab_size is None:
        raise ValueError("with --address, give the model's --vocab-size (synthesized ids stay below it)")
    else:
        vocab = args.vocab_size
    meta = {"cluster": f"{args.fresh_prefill} fresh + {args.warm_prefill} warm + {args.decode} decode"
            if cluster else f"router at {args.address}", "device": args.device_note,
            "worker_args": " ".join(args.worker_arg), "policy_options": " ".join(args.policy_option),
            "calibration": str(args.calibration or "defaults"), "fetch": not args.no_fetch}  # fmt: skip
    config = ABConfig(policies, trace, args.out, vocab, parse_rates(args.rates), args.slo_ttft_p90_ms,
                      args.max_concurrency, args.live_split, args.seed, tuple(router_args),
                      meta=meta)  # fmt: skip
    results = run_ab(config, cluster=cluster, address=args.address)
    _print_table(results)
    print(f"report: {args.out / 'report.md'}")
    return 0


def _print_table(results: dict) -> None:
    print(f"{'arm':<16}{'rate':>8}{'req/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}{'ITL p99':>9}{'hit':>6}"
          f"{'sustain':>9}{'errors':>8}")  # fmt: skip
    for arm, r in results["arms"].items():
        def f(key, fmt=".1f", r=r):
            value = r.get(key)
            return "-" if value is None else format(value, fmt)

        print(f"{arm:<16}{f('rate', 'g'):>8}{f('request_throughput', '.2f'):>9}{f('median_ttft_ms'):>10}"
              f"{f('p90_ttft_ms'):>10}{f('p99_itl_ms'):>9}{f('hit_rate', '.2f'):>6}"
              f"{f('sustainable_rate', '.2f'):>9}{r.get('errors', 0):>8}")  # fmt: skip


def _register_trace(sub) -> None:
    p = sub.add_parser("trace", help="write a workload trace (JSONL) or convert Mooncake traces",
                       description="Generate a seeded workload trace, or convert between the splitserve "
                                   "JSONL trace and the Mooncake format.")  # fmt: skip
    add_trace_arguments(p, default_requests=200)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--format", default="splitserve", choices=["splitserve", "mooncake"])
    p.set_defaults(handler=_run_trace)


def _run_trace(args: argparse.Namespace) -> int:
    from splitserve.experiments.sessions import oracle_hit_rate
    from splitserve.experiments.trace import export_mooncake, save_trace

    trace = load_trace_from_args(args)
    if args.format == "mooncake":
        export_mooncake(trace, args.out, args.mooncake_block_len)
    else:
        save_trace(trace, args.out)
    sessions = len({r.session_id for r in trace.requests if r.session_id})
    print(f"{args.out}: {len(trace.requests)} requests, {sessions} sessions, "
          f"oracle hit rate {oracle_hit_rate(trace):.3f}")  # fmt: skip
    return 0
