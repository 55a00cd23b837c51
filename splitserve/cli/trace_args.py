"""The trace a command replays or simulates: a generated workload, a trace file or a Mooncake file, and the
rates it is offered at. Shared by `bench ab`, `bench trace` and `simulate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WORKLOAD_NAMES = ("multi-turn", "tenants", "agentic", "mixed")


def add_trace_arguments(p: argparse.ArgumentParser, default_requests: int) -> None:
    """How a command gets its trace: a generated workload, a trace file, or a Mooncake file."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", default="multi-turn", choices=WORKLOAD_NAMES)
    src.add_argument("--trace", type=Path, default=None, help="a splitserve JSONL trace")
    src.add_argument("--mooncake", type=Path, default=None, help="a Mooncake-format trace")
    p.add_argument("--mooncake-block-len", type=int, default=512, help="tokens per Mooncake hash id")
    p.add_argument("--requests", type=int, default=None,
                   help=f"requests of a generated workload (default {default_requests}); of a trace file, "
                        "its first N (default all)")
    p.set_defaults(default_requests=default_requests)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-len", type=int, default=16, help="tokens per hash id of a generated workload")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply a generated workload's token lengths (e.g. 0.1 for a CPU run)")
    p.add_argument("--workload-param", action="append", default=[], metavar="NAME=VALUE",
                   help="a workload parameter, e.g. system_prompt_len=512 (repeatable)")


def load_trace_from_args(args: argparse.Namespace):
    """The trace the arguments name (validated; TraceError/ValueError name what is wrong)."""
    from splitserve.experiments.trace import Trace, import_mooncake, load_trace
    from splitserve.experiments.workloads import make_workload

    if args.requests is not None and args.requests < 1:
        raise ValueError(f"--requests must be >= 1, got {args.requests}")
    if args.trace is not None or args.mooncake is not None:
        trace = load_trace(args.trace) if args.trace is not None else import_mooncake(
            args.mooncake, args.mooncake_block_len)
        if not trace.requests:
            raise ValueError(f"{args.trace or args.mooncake}: the trace has no requests")
        return trace if args.requests is None else Trace(trace.meta, trace.requests[: args.requests])
    params = {}
    for spec in args.workload_param:
        name, sep, value = spec.partition("=")
        if not sep:
            raise ValueError(f"a workload parameter is NAME=VALUE, got {spec!r}")
        params[name] = json.loads(value)
    num_requests = args.requests or args.default_requests
    return make_workload(args.workload, num_requests, args.seed, args.block_len, args.length_scale, **params)


def parse_rates(spec: str | None) -> tuple[float | None, ...]:
    """"4,1,2" → (1.0, 2.0, 4.0); None → (None,): the trace's own timestamps. ValueError unless the rates
    are distinct, positive and finite."""
    if not spec:
        return (None,)
    try:
        rates = [float(r) for r in spec.split(",")]
    except ValueError:
        raise ValueError(f"--rates: comma-separated numbers, got {spec!r}") from None
    if any(not 0 < r < float("inf") for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"--rates must be distinct positive numbers, got {spec!r}")
    return tuple(sorted(rates))
