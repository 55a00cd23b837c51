"""`splitserve status`: the cluster's members (state, restarts, node, log) and the router's view of the
workers (health, load, KV usage, prefix hits by tier, what their work costs as they measure it: prefill
tokens/s by cached context, host-tier load and KV push bytes/s) and of the A/B arms (requests, cache hit
rate, mean TTFT)."""

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


def _rate(value: float, unit: str = "") -> str:
    """A measured rate, short: 52.1k, 1.27G ("-": not measured yet)."""
    if not value:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{prefix}{unit}"
    return f"{value:.3g}{unit}"


def _costs(costs: dict) -> str:
    """A worker's measured costs: prefill tokens/s per cached-context bucket, host-tier load and push
    bytes/s per transport."""
    prefill = " ".join(f"{_context(int(r['min_cached_tokens']))}:{_rate(r['tokens_per_s'])}"
                       for r in costs.get("prefill", []))  # fmt: skip
    pushes = " ".join(f"{t} {_rate(v, 'B/s')}" for t, v in sorted(costs.get("push_bytes_per_s", {}).items()))
    return (
        f"prefill tok/s {prefill or '-'}  host load {_rate(costs.get('host_load_bytes_per_s', 0), 'B/s')}"
        f"  push {pushes or '-'}"
    )


def _context(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens and tokens % 1024 == 0 else str(tokens)


def render(report: dict) -> list[str]:
    """The lines `status` prints for a `launcher.status` report."""
    lines = [f"router  gRPC {report['router_address']}  HTTP {report['http_address'] or '-'}  "
             f"index {report['redis_url']}"]  # fmt: skip
    router = report["router"]
    loads = {w["worker_id"]: w for w in router.get("workers", [])}
    lines.append(f"{'member':<12}{'state':<12}{'restarts':>9}  {'node':<16}{'healthy':<9}{'queued':>8}"
                 f"{'running':>8}{'kv':>7}  {'hits: memory':>12}{'host':>7}{'fetched':>8}")  # fmt: skip
    for m in report["members"]:
        w = loads.get(m["name"], {})
        load = w.get("load", {})
        healthy = "-" if m["name"] == "router" else ("yes" if w.get("healthy") else "no")
        lines.append(f"{m['name']:<12}{m['state']:<12}{m.get('restarts', '-'):>9}  {m.get('node', '-'):<16}"
                     f"{healthy:<9}"
                     f"{load.get('queued_tokens', 0):>8}{load.get('running_requests', 0):>8}"
                     f"{load.get('kv_usage', 0.0):>7.2f}  {_tier_hits(load.get('tiers', {}))}")  # fmt: skip
    for worker_id, w in loads.items():
        lines.append(f"costs {worker_id}: {_costs(w.get('load', {}).get('costs', {}))}")
    for arm in router.get("arms", []):
        requests, prompt = int(arm["requests"]), int(arm["prompt_tokens"])
        hit = int(arm["cached_tokens"]) / prompt if prompt else 0.0
        ttft = arm["ttft_ms_sum"] / requests if requests else 0.0
        lines.append(f"arm {arm['arm']}: {requests} requests, {arm['failures']} failed, cache hit {hit:.2f}, "
                     f"mean TTFT {ttft:.1f} ms")  # fmt: skip
    if router.get("index_stale"):
        lines.append("index: STALE (routing on the last mirror and on load)")
    if "error" in router:
        lines.append(f"router: {router['error']}")
    return lines


def _run(args: argparse.Namespace) -> int:
    from splitserve.cluster import launcher

    report = launcher.status(args.state_file)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("\n".join(render(report)))
    return 0
