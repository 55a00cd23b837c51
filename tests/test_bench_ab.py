"""`splitserve bench ab` end to end on a CPU cluster it brings up itself (an embedded Redis, a fresh and a
warm prefill worker, a decode worker and a router, as plain processes): two arms over one multi-turn trace,
caches reset between them; the report's files and numbers agree with the per-request records, turns of a
session are sent in order with the real output in the next prompt, and the decision logs carry shadows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitserve.experiments.trace import load_trace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ab_run(tiny_model, tmp_path_factory):
    model = tiny_model("llama", max_position_embeddings=2048)
    out = tmp_path_factory.mktemp("ab")
    trace = out / "trace.jsonl"
    base = [sys.executable, "-m", "splitserve", "bench"]
    subprocess.run([*base, "trace", "--workload", "multi-turn", "--requests", "24", "--length-scale", "0.1",
                    "--workload-param", "think_s=0.2", "--out", str(trace)],
                   check=True, timeout=60)  # fmt: skip
    proc = subprocess.run([*base, "ab", "--policies", "cpd,round_robin", "--model", str(model), "--trace",
                           str(trace), "--rates", "8", "--worker-arg=--num-blocks=1024", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, load_trace(trace), proc.stdout


def test_the_report_has_every_arm_with_the_serving_benchmark_fields(ab_run):
    out, trace, stdout = ab_run
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"cpd", "round_robin"}
    for arm, r in results["arms"].items():
        for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                    "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "hit_rate",
                    "oracle_hit_rate", "errors"):  # fmt: skip
            assert key in r, (arm, key)
        assert r["errors"] == 0 and r["completed"] == len(trace.requests)
        assert 0 < r["hit_rate"] <= r["oracle_hit_rate"] <= 1
        assert arm in stdout
    for name in ("report.md", "ttft_cdf.png", "latency_vs_rate.png", "hit_rate_over_time.png",
                 "pool_shares.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0
    assert "cpd" in (out / "report.md").read_text()


def test_requests_follow_their_sessions_and_the_numbers_add_up(ab_run):
    out, trace, _ = ab_run
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    for arm in ("cpd", "round_robin"):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["index"])
        assert [r["index"] for r in mine] == list(range(len(trace.requests)))
        last_done: dict[str, float] = {}
        for row, req in zip(mine, trace.requests, strict=True):
            assert row["output_len"] == req.output_len and row["input_len"] == req.input_len
            if req.turn > 0:  # never before the previous turn ended, and its context was cached somewhere
                assert row["sent_s"] >= last_done[req.session_id] - 1e-6
            last_done[req.session_id] = row["sent_s"] + row["e2e_s"]
            assert len(row["itl_s"]) == req.output_len - 1
        cached = sum(r["cached_tokens"] for r in mine)
        assert results["arms"][arm]["hit_rate"] == pytest.approx(cached / sum(r["input_len"] for r in mine))
        predicted = sum(r["predicted_cached_tokens"] for r in mine)
        assert results["arms"][arm]["prediction_ratio"] == pytest.approx(predicted / cached)
    # cpd's prediction is its index's view of the target it chose: it matches what the worker reused.
    assert results["arms"]["cpd"]["prediction_ratio"] == pytest.approx(1.0, abs=0.05)


def test_every_decision_is_logged_with_the_other_arm_as_shadow(ab_run):
    out, trace, _ = ab_run
    for arm, other in (("cpd", "round_robin"), ("round_robin", "cpd")):
        lines = (out / f"decisions-{arm}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == len(trace.requests)  # the warm-up pass ran on a router of its own
        assert sorted(r["prompt_tokens"] for r in records) == sorted(q.input_len for q in trace.requests)
        assert all(r["arm"] == arm and set(r["shadow"]) == {other} for r in records)


def test_each_run_records_the_workers_tier_hits_and_measured_costs(ab_run):
    out, trace, _ = ab_run
    results = json.loads((out / "results.json").read_text())
    for arm, r in results["arms"].items():
        (run,) = r["sweep"]
        loads = {w["worker_id"]: w["load"] for w in run["workers"]}
        assert len(loads) == 3, arm
        # Every prompt token of the run was scheduled on some worker, counted with its hits by tier.
        prompt = sum(int(load["tiers"]["prompt_tokens"]) for load in loads.values())
        assert prompt >= sum(req.input_len for req in trace.requests), arm
        for load in loads.values():  # every worker publishes its prefill rate by context bucket (0: not yet)
            buckets = [int(p.get("min_cached_tokens", 0)) for p in load["costs"]["prefill"]]
            assert buckets == [0, 1024, 4096, 16384], (arm, load)
