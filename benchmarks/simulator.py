"""Simulator speed: simulated requests per wall-clock second at 16 workers (4 fresh + 4 warm + 8 decode).

One run prints the machine and Python version, then for every routing policy on the multi-turn workload
(mean output 64 tokens), at the trace's own timestamps and at an offered rate high enough to batch:
  - requests per wall second (and per CPU second: less sensitive to a busy machine) and events/s of
    `simulate` alone (no shadows), the best of `--repeats` runs;
  - the share of that time spent inside the policy's `route` (the simulator's own cost is the rest);
  - requests/s as `splitserve simulate` runs an arm: with the other three policies as shadows.
Target: >= 1,000 simulated requests/s (no shadows) on a 2-core machine.
Usage: python benchmarks/simulator.py [--requests N] [--rate R] [--repeats K]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from splitserve.experiments.workloads import make_workload
from splitserve.router.cost_model import DEFAULT_COST_MODEL
from splitserve.router.policies import make_policy
from splitserve.simulator.config import SimConfig
from splitserve.simulator.run import simulate

POLICIES = ("cpd", "least_loaded", "prefix_affinity", "round_robin")
TARGET_REQUESTS_PER_S = 1000.0


class TimedPolicy:
    """A policy whose `route` calls are timed (perf_counter around each)."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.seconds = inner, inner.name, 0.0

    def route(self, request, workers):
        start = time.perf_counter()
        try:
            return self.inner.route(request, workers)
        finally:
            self.seconds += time.perf_counter() - start


def measure(trace, name: str, rate: float | None, repeats: int, config: SimConfig) -> dict:
    best = None
    for _ in range(repeats):
        policy = TimedPolicy(make_policy(name))
        cpu = time.process_time()
        run = simulate(trace, policy, config, DEFAULT_COST_MODEL, rate=rate)
        cpu = time.process_time() - cpu
        if best is None or run.wall_s < best[0].wall_s:
            best = (run, policy.seconds, cpu)
    run, route_s, cpu_s = best
    errors = sum(1 for r in run.results if r.error)
    shadows = {other: make_policy(other) for other in POLICIES if other != name}
    shadowed = simulate(trace, make_policy(name), config, DEFAULT_COST_MODEL, rate=rate, shadows=shadows)
    n = len(trace.requests)
    return {
        "requests_per_s": n / run.wall_s,
        "requests_per_cpu_s": n / cpu_s,
        "events_per_s": run.num_events / run.wall_s,
        "events_per_request": run.num_events / n,
        "route_share": route_s / run.wall_s,
        "shadowed_requests_per_s": n / shadowed.wall_s,
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=100.0, help="the batching run's offered rate, req/s")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; "
          f"python {platform.python_version()} ({platform.python_implementation()})")  # fmt: skip
    config = SimConfig()
    trace = make_workload("multi-turn", args.requests, seed=0, block_len=16)
    mean_out = sum(r.output_len for r in trace.requests) / len(trace.requests)
    mean_in = sum(r.input_len for r in trace.requests) / len(trace.requests)
    print(
        f"multi-turn: {len(trace.requests)} requests, mean input {mean_in:.0f}, mean output {mean_out:.0f} "
        f"tokens; {config.num_fresh} fresh + {config.num_warm} warm + {config.num_decode} decode workers"
    )
    worst = float("inf")
    for rate in (None, args.rate):
        label = "trace timestamps" if rate is None else f"{rate:g} req/s offered"
        print(f"\n{label}")
        print(f"{'policy':<17}{'req/s':>9}{'req/CPU s':>11}{'events/s':>11}{'events/req':>12}{'in route':>10}"
              f"{'req/s, 3 shadows':>18}{'errors':>8}")  # fmt: skip
        for name in POLICIES:
            m = measure(trace, name, rate, args.repeats, config)
            worst = min(worst, m["requests_per_s"])
            print(f"{name:<17}{m['requests_per_s']:>9,.0f}{m['requests_per_cpu_s']:>11,.0f}"
                  f"{m['events_per_s']:>11,.0f}{m['events_per_request']:>12.1f}{m['route_share']:>10.0%}"
                  f"{m['shadowed_requests_per_s']:>18,.0f}{m['errors']:>8}")  # fmt: skip
    verdict = "meets" if worst >= TARGET_REQUESTS_PER_S else "MISSES"
    ratio = worst / TARGET_REQUESTS_PER_S
    print(
        f"\nslowest: {worst:,.0f} simulated requests/s = {ratio:.2f} × the target of "
        f"{TARGET_REQUESTS_PER_S:,.0f} ({verdict} it)"
    )


if __name__ == "__main__":
    main()
