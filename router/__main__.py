"""`python -m splitserve.router --model DIR --port P --redis-url URL [--policy cpd | --ab A:S,B:S] ...`: one
router process. Workers register themselves through the prefix index (`--redis-url`); a worker whose block
hashes would differ from the router's (model, block size) is refused with a log line. `--worker
ID=ROLE@HOST:PORT` adds workers by hand (then the index is optional: routing uses load only). Never
imports torch."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from splitserve.engine.model_config import checkpoint_identity
from splitserve.index.config import REDIS_URL_ENV, IndexConfig, redact_url
from splitserve.index.mirror import IndexMirror
from splitserve.index.schema import WorkerInfo
from splitserve.protos import router_pb2_grpc
from splitserve.router.core import ArmAssigner, Router, WorkerSet, parse_ab
from splitserve.router.cost_model import DEFAULT_COST_MODEL, load_calibration
from splitserve.router.decision_log import DecisionLog
from splitserve.router.dispatch import FailurePolicy
from splitserve.router.http_front import HTTPFront
from splitserve.router.inflight import Ledger
from splitserve.router.policies import (
    POLICIES,
    check_policy_options,
    make_policy,
    parse_policy_options,
    policy_options,
)
from splitserve.router.service import RouterService
from splitserve.router.tenants import Tenants
from splitserve.router.text import TextCodec

log = logging.getLogger("splitserve.router")


def registrar(workers: WorkerSet, model_id: str, block_size: int):
    """The index mirror's worker-change callback: add agreeing workers, refuse the others, drop leavers."""

    def on_change(worker_id: str, info: WorkerInfo | None) -> None:
        if info is None:
            workers.remove(worker_id)
            return
        if not info.agrees_with(model_id, block_size):
            log.error("refusing worker %s at %s: it hashes blocks for model %s, block size %d; this router "
                      "uses model %s, block size %d", worker_id, info.address, info.model_id, info.block_size,
                      model_id, block_size)  # fmt: skip
            return
        known = {h.worker_id: h for h in workers.all()}
        if worker_id in known and known[worker_id].address == info.address:
            return  # re-registered (a new epoch or a Redis restart): nothing changed for routing
        workers.remove(worker_id)
        workers.add(worker_id, info.role, info.address, info.device)

    return on_change


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitserve.router", description=__doc__)
    parser.add_argument("--model", required=True, help="the workers' checkpoint (for its tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="gRPC port (0: any free port)")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the OpenAI-compatible HTTP API on this port (0: any free port)")
    parser.add_argument("--block-size", type=int, default=16, help="the workers' KV block size")
    parser.add_argument("--redis-url", default=os.environ.get(REDIS_URL_ENV),
                        help=f"the prefix index (workers register there; default: ${REDIS_URL_ENV})")
    parser.add_argument("--policy", default="cpd", choices=sorted(POLICIES))
    parser.add_argument("--ab", default=None, help="A/B arms by share, e.g. cpd:0.5,least_loaded:0.5")
    parser.add_argument("--policy-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a policy threshold, e.g. local_prefill_max_tokens=128 (repeatable)")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="the cost model cpd predicts with (benchmarks/calibrate.py writes one; default: "
                             "H200 figures from docs/benchmarks.md)")
    parser.add_argument("--no-fetch", action="store_true",
                        help="never fetch a prompt's leading blocks from the worker holding them: the "
                             "prefill target recomputes what it lacks (default: when predicted cheaper)")
    parser.add_argument("--load-view", default="inflight", choices=["inflight", "polled"],
                        help="inflight: polled loads plus this router's own assignments since (default); "
                             "polled: the workers' last reported loads only")
    parser.add_argument("--decision-log", default=None, metavar="FILE",
                        help="append every routing decision (score terms, shadow choices) as JSON lines")
    parser.add_argument("--shadow-policies", default="", metavar="NAME,...",
                        help="policies asked what they would have chosen, for the decision log "
                             "(default: the other A/B arms)")
    parser.add_argument("--max-streams", type=int, default=1024,
                        help="requests served at once over gRPC, one thread each (more wait for a thread)")
    parser.add_argument("--failure-policy", default="recompute", choices=[p.value for p in FailurePolicy])
    parser.add_argument("--tenants", default=None, metavar="FILE",
                        help="API keys: JSON of tenant name → SHA-256 hex of its key; the tenant salts the "
                             "requests' prefix hashes (default: no keys, one tenant)")
    parser.add_argument("--worker", action="append", default=[], metavar="ID=ROLE@HOST:PORT",
                        help="a worker added by hand (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s router %(levelname)s %(message)s")

    model_id = checkpoint_identity(args.model)
    workers = WorkerSet()
    for spec in args.worker:
        worker_id, _, rest = spec.partition("=")
        role, _, address = rest.partition("@")
        workers.add(worker_id, role, address)
    mirror = None
    if args.redis_url:
        mirror = IndexMirror(IndexConfig(args.redis_url), registrar(workers, model_id, args.block_size))
        if not mirror.start():
            log.warning("prefix index at %s not reachable yet: routing on load until it is",
                        redact_url(args.redis_url))
    workers.start()
    shares = parse_ab(args.ab) if args.ab else {args.policy: 1.0}
    options = parse_policy_options(args.policy_option)
    check_policy_options([*shares, *(n for n in args.shadow_policies.split(",") if n)], options)
    costs = load_calibration(args.calibration) if args.calibration else None

    def policy(name: str):
        return make_policy(name, costs, not args.no_fetch, **policy_options(name, options))

    policies = {name: policy(name) for name in shares}
    shadow_names = [n for n in args.shadow_policies.split(",") if n] or list(shares)
    decision_log = DecisionLog(args.decision_log) if args.decision_log else None
    router = Router(
        workers, policies, model_id, args.block_size,
        mirror.match_tiers if mirror is not None else (lambda hashes: {}),
        ArmAssigner(shares) if args.ab else None, FailurePolicy(args.failure_policy),
        shadows={name: policy(name) for name in shadow_names},
        ledger=Ledger() if args.load_view == "inflight" else None, decision_log=decision_log,
        costs=costs or DEFAULT_COST_MODEL, fetch=not args.no_fetch,
    )  # fmt: skip
    tenants = Tenants.from_file(args.tenants) if args.tenants else None
    stale = lambda: mirror is not None and mirror.stale  # noqa: E731
    service = RouterService(router, TextCodec(args.model), stale, tenants)
    # No SO_REUSEPORT: a second router on a taken port must fail (RuntimeError), not share its clients.
    server = grpc.server(ThreadPoolExecutor(max_workers=args.max_streams), options=[("grpc.so_reuseport", 0)])
    router_pb2_grpc.add_RouterServicer_to_server(service, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    front = None
    if args.http_port is not None:
        front = HTTPFront(service, Path(args.model).name, args.host, args.http_port).start()
        log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", args.host, front.port)
    # The supervisor's contract (see cluster/supervisor.py): the gRPC address, then the HTTP one if any.
    http = f" http {args.host}:{front.port}" if front is not None else ""
    print(f"router listening on {args.host}:{port}{http}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(5.0).wait()
    if front is not None:
        front.stop()
    if mirror is not None:
        mirror.stop()
    workers.close()
    if decision_log is not None:
        decision_log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
