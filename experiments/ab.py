"""`bench ab`: replay one trace against several routing policies on one cluster and report the comparison.

Two ways to run the arms:
- sequential (the default, with `--model`): this process brings up its own cluster of plain processes
  (`LocalCluster`); for each arm it restarts the router with that policy (the other arms as shadows in
  its decision log) and, before every (arm, rate) run, empties every worker's prefix cache, so each run
  starts cold on the same workers with the same trace;
- a live split (`live_split`): one router runs every arm at once (`--ab`, per session), each run's
  results are split by the arm the router reports. This is also how arms run against an existing cluster
  (`--address`): its router must have been started with those arms.

A rate sweep (several rates) with a TTFT p90 SLO gives each arm's sustainable rate. The report (`report.md`,
`results.json`, `requests.jsonl`, the plots) is `experiments.report.write_report`'s. Torch-free.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from splitserve.client import Client
from splitserve.experiments.local_cluster import LocalCluster, LocalClusterSpec
from splitserve.experiments.replay import ReplayConfig, ReplayRun, replay_blocking
from splitserve.experiments.report import ArmRun, write_report
from splitserve.experiments.sessions import oracle_hit_rate
from splitserve.experiments.trace import Trace
from splitserve.router.decision_log import DecisionRecord, read_decision_log

SETTLE_S = 1.0  # after a cache reset: time for the workers' evictions to reach the router's index mirror


@dataclass(frozen=True)
class ABConfig:
    policies: tuple[str, ...]
    trace: Trace
    out_dir: Path
    vocab_size: int
    rates: tuple[float | None, ...] = (None,)
    slo_ttft_p90_ms: float | None = None
    max_concurrency: int | None = None
    live_split: bool = False
    seed: int = 0
    router_args: tuple[str, ...] = ()  # --policy-option, --calibration, ... for every router started
    warmup_pass: bool = True  # replay the trace once, unmeasured, before the first arm
    meta: dict = field(default_factory=dict)  # what the caller knows of the setup (device, cluster shape)

    def __post_init__(self) -> None:
        if not self.policies or len(set(self.policies)) != len(self.policies):
            raise ValueError(f"give distinct policies, got {list(self.policies)}")
        if not self.rates or (len(self.rates) > 1 and None in self.rates):
            raise ValueError("rates: one or more request rates, or the trace's own timestamps alone")


def run_ab(config: ABConfig, *, cluster: LocalClusterSpec | None = None, address: str | None = None) -> dict:
    """Run every arm at every rate, write the report into `config.out_dir` and return results.json's
    contents. Exactly one of `cluster` (bring one up, sequential arms unless live_split) or `address`
    (an existing router: a live split, or a single policy) is given."""
    if (cluster is None) == (address is None):
        raise ValueError("give exactly one of a cluster to start or a router address")
    if address is not None and len(config.policies) > 1 and not config.live_split:
        raise ValueError("against an existing router the arms run as a live split (--live-split): start "
                         "its router with --ab over the same policies")  # fmt: skip
    config.out_dir.mkdir(parents=True, exist_ok=True)
    if address is not None:
        runs = _live_split(address, config) if config.live_split else _one_arm(address, config)
        return _report(config, runs, {})
    with LocalCluster(cluster) as local:
        if config.warmup_pass:
            _warm_up(local.start_router(["--policy", "round_robin"]), config)
        if config.live_split:
            log = config.out_dir / "decisions.jsonl"
            shares = ",".join(f"{p}:1" for p in config.policies)
            address = local.start_router(["--ab", shares, "--decision-log", str(log), *config.router_args])
            runs = _live_split(address, config)
            records = read_decision_log(log)
            decisions = {p: [r for r in records if r.arm == p] for p in config.policies}
        else:
            runs, decisions = _sequential(local, config)
    return _report(config, runs, decisions)


def _sequential(local: LocalCluster, config: ABConfig):
    runs: dict[str, list[ArmRun]] = {}
    decisions: dict[str, list[DecisionRecord]] = {}
    for policy in config.policies:
        log = config.out_dir / f"decisions-{policy}.jsonl"
        log.unlink(missing_ok=True)
        address = local.start_router(["--policy", policy, "--decision-log", str(log),
                                      "--shadow-policies", ",".join(config.policies), *config.router_args])
        runs[policy] = [_arm_run(address, config, rate, policy) for rate in config.rates]
        local.start_router(["--policy", policy])  # the old router writes out its log as it stops
        decisions[policy] = read_decision_log(log)
        if policy != config.policies[-1]:  # the arms so far: a run cut short still leaves a report
            _report(config, runs, decisions)
    return runs, decisions


def _one_arm(address: str, config: ABConfig) -> dict[str, list[ArmRun]]:
    (policy,) = config.policies
    return {policy: [_arm_run(address, config, rate, policy) for rate in config.rates]}


def _live_split(address: str, config: ABConfig) -> dict[str, list[ArmRun]]:
    runs: dict[str, list[ArmRun]] = {p: [] for p in config.policies}
    for rate in config.rates:
        run = _replay(address, config, rate, "")
        for policy in config.policies:
            mine = [r for r in run.results if r.arm == policy]
            runs[policy].append(ArmRun(policy, rate, mine, None))
    return runs


def _replay(address: str, config: ABConfig, rate: float | None, arm: str) -> ReplayRun:
    """One cold run: every cache emptied, then the trace replayed (`arm` "" = labelled by the router)."""
    with Client(address) as client:
        client.reset_cache()
    time.sleep(SETTLE_S)
    replay_config = ReplayConfig(config.vocab_size, rate, config.max_concurrency, config.seed, arm=arm)
    label = f"{arm or 'live split'} at {'trace timestamps' if rate is None else f'{rate:g} req/s'}"
    print(f"== {label}", flush=True)
    return replay_blocking(address, config.trace, replay_config)


def _arm_run(address: str, config: ABConfig, rate: float | None, arm: str) -> ArmRun:
    run = _replay(address, config, rate, arm)
    with Client(address) as client:  # what the workers measured and hit, per tier, as the run ended
        workers = client.status().get("workers", [])
    return ArmRun(arm, rate, run.results, run.duration_s, workers)


def _warm_up(address: str, config: ABConfig) -> None:
    """The whole trace once, unmeasured, spread over every worker (round robin) at the sweep's top rate:
    a fresh worker process pays one-time costs on its first prompts of each size (allocator growth, kernels
    compiled or tuned for new shapes) that must not land on whichever arm runs first."""
    top = max((r for r in config.rates if r is not None), default=None)
    print("== warm-up pass (unmeasured)", flush=True)
    replay_blocking(address, config.trace, ReplayConfig(config.vocab_size, top, config.max_concurrency,
                                                        config.seed, progress=False))  # fmt: skip


def _report(config: ABConfig, runs: dict[str, list[ArmRun]], decisions: dict) -> dict:
    meta = {
        "mode": "live split" if config.live_split else "sequential arms, caches reset between runs",
        "workload": config.trace.meta.workload or "trace", "requests": len(config.trace.requests),
        "block_len": config.trace.meta.block_len, "trace_params": json.dumps(config.trace.meta.params),
        "seed": config.seed, "max_concurrency": config.max_concurrency, "date": date.today().isoformat(),
        "python": platform.python_version(), "host": platform.node(), **config.meta,
    }  # fmt: skip
    return write_report(config.out_dir, runs, oracle_hit_rate=oracle_hit_rate(config.trace),
                        slo_ttft_p90_ms=config.slo_ttft_p90_ms, meta=meta,
                        decisions=decisions or None)  # fmt: skip
