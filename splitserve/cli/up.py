"""`splitserve up`: start a cluster (router, fresh and warm prefill workers, decode workers) on Ray.

Without `--detach` it stays in the foreground and stops the cluster on Ctrl-C (or when `splitserve down`
stops it from elsewhere); with `--detach` it returns once the cluster serves.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from splitserve.cluster.state import default_state_file
from splitserve.index.config import REDIS_URL_ENV, ROUTER_REDIS_URL_ENV
from splitserve.worker.options import EngineOptions, KVOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("up", help="start a cluster on Ray", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face-format checkpoint directory (on every node)")
    p.add_argument("--fresh-prefill", type=int, default=1, help="prefill workers for fresh requests")
    p.add_argument("--warm-prefill", type=int, default=1, help="prefill workers for mostly cached requests")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--policy", default="cpd", help="routing policy (see `python -m splitserve.router -h`)")
    p.add_argument("--ab", default=None, help="A/B arms by share, e.g. cpd:0.5,least_loaded:0.5")
    p.add_argument("--policy-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a policy threshold (repeatable)")
    p.add_argument("--failure-policy", default="recompute", choices=["fail", "recompute"])
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="the router's cost model (benchmarks/calibrate.py writes one for this machine; "
                        "default: H200 figures)")  # fmt: skip
    p.add_argument("--no-fetch", action="store_true",
                   help="prefill targets recompute what they lack instead of fetching it from the worker "
                        "holding it")  # fmt: skip
    p.add_argument("--grpc-port", type=int, default=50051, help="the router's gRPC port (0: any free port)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the router's OpenAI-compatible HTTP port (0: any free port; -1: none)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface every member binds (0.0.0.0: all; members then advertise their node's IP)")
    p.add_argument("--redis-url", default=os.environ.get(REDIS_URL_ENV),
                   help=f"the prefix index's Redis (default: ${REDIS_URL_ENV}; unset: start an embedded one)")
    p.add_argument("--router-redis-url", default=os.environ.get(ROUTER_REDIS_URL_ENV),
                   help=f"the router's Redis URL, a read-only ACL user (deploy/redis) (default: "
                        f"${ROUTER_REDIS_URL_ENV}, else --redis-url)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a Ray head)")
    p.add_argument("--tenants", default=None, help="JSON file: tenant name → SHA-256 hex of its API key")
    EngineOptions.add_arguments(p)  # every worker's engine, as the workers define it
    KVOptions.add_arguments(p)  # how the prefill workers move KV, as they define it
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the cluster to serve")
    p.add_argument("--state-file", type=Path, default=default_state_file())
    p.add_argument("--detach", action="store_true", help="return once the cluster serves")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from splitserve.cluster import launcher
    from splitserve.cluster.ray_head import ClusterStartError
    from splitserve.cluster.spec import ClusterSpec

    spec = ClusterSpec(
        model=str(Path(args.model).resolve()), num_fresh=args.fresh_prefill, num_warm=args.warm_prefill,
        num_decode=args.decode, policy=args.policy, ab=args.ab, policy_options=tuple(args.policy_option),
        failure_policy=args.failure_policy, fetch=not args.no_fetch, grpc_port=args.grpc_port,
        http_port=None if args.http_port < 0 else args.http_port, host=args.host, redis_url=args.redis_url,
        router_redis_url=args.router_redis_url,
        ray_address=args.ray_address, tenants=str(Path(args.tenants).resolve()) if args.tenants else None,
        calibration=str(Path(args.calibration).resolve()) if args.calibration else None,
        engine=EngineOptions.from_args(args), kv=KVOptions.from_args(args),
    )  # fmt: skip
    if not (Path(spec.model) / "config.json").exists():
        raise FileNotFoundError(f"{args.model} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        state = launcher.up(spec, args.state_file, args.timeout)
    except ClusterStartError as exc:
        print(f"splitserve up: the cluster did not start: {exc}", file=sys.stderr)
        return 1
    print(f"cluster up: gRPC {state.router_address}" + (f", HTTP http://{state.http_address}/v1"
                                                         if state.http_address else ""))  # fmt: skip
    print(
        f"state: {args.state_file}; stop with `splitserve down"
        + ("`" if args.state_file == default_state_file() else f" --state-file {args.state_file}`")
    )
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if not args.state_file.exists():  # `splitserve down` ran elsewhere
            return 0
    launcher.down(args.state_file)
    return 0
