"""`splitserve status`: the cluster's members (state, restarts, node, log) and the router's view of the
workers (health, load, KV usage) and of the A/B arms (requests, cache hit rate, mean TTFT)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitserve.cluster.state import default_state_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status", help="show the cluster started by `splitserve up`", description=__doc__
    )
    p.add_argument("--state-file", type=Path, default=default_state_file())
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_run)


def _tier_hits(tiers: dict) -> str:
    """A worker's prefix hits by tier, as shares of the prompt tokens it scheduled ("-" before any)."""
    prompt = int(tiers.get("prompt_tokens", 0))
    if not prompt:
        return f"{'-':>12}{'-':>7}{'-':>8}"
    memory, host, fetched = (int(tiers.get(k, 0)) / prompt
                             for k in ("gpu_hit_tokens", "host_hit_tokens", "fetched_tokens"))  # fmt: skip
    return f"{memory:>12.2f}{host:>7.2f}{fetched:>8.2f}"


def _run(args: argparse.Namespace) -> int:
    from splitserve.cluster import launcher

    report = launcher.status(args.state_file)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"router  gRPC {report['router_address']}  HTTP {report['http_address'] or '-'}  "
          f"index {report['redis_url']}")  # fmt: skip
    router = report["router"]
    loads = {w["worker_id"]: w for w in router.get("workers", [])}
    print(f"{'member':<12}{'state':<12}{'restarts':>9}  {'node':<16}{'healthy':<9}{'queued':>8}{'running':>8}"
          f"{'kv':>7}  {'hits: memory':>12}{'host':>7}{'fetched':>8}")  # fmt: skip
    for m in report["members"]:
        w = loads.get(m["name"], {})
        load = w.get("load", {})
        healthy = "-" if m["name"] == "router" else ("yes" if w.get("healthy") else "no")
        print(f"{m['name']:<12}{m['state']:<12}{m.get('restarts', '-'):>9}  {m.get('node', '-'):<16}"
              f"{healthy:<9}"
              f"{load.get('queued_tokens', 0):>8}{load.get('running_requests', 0):>8}"
              f"{load.get('kv_usage', 0.0):>7.2f}  {_tier_hits(load.get('tiers', {}))}")  # fmt: skip
    for arm in router.get("arms", []):
        requests, prompt = int(arm["requests"]), int(arm["prompt_tokens"])
        hit = int(arm["cached_tokens"]) / prompt if prompt else 0.0
        ttft = arm["ttft_ms_sum"] / requests if requests else 0.0
        print(f"arm {arm['arm']}: {requests} requests, {arm['failures']} failed, cache hit {hit:.2f}, "
              f"mean TTFT {ttft:.1f} ms")  # fmt: skip
    if router.get("index_stale"):
        print("index: STALE (routing on the last mirror and on load)")
    if "error" in router:
        print(f"router: {router['error']}")
    return 0
