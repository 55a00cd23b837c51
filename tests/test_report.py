"""Metrics (`experiments.metrics`) and the A/B report (`experiments.report`) on hand-built runs whose every
number is computed by hand here."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from splitserve.experiments import metrics
from splitserve.experiments.metrics import percentile, rolling_hit_rate, summarize, sustainable_rate
from splitserve.experiments.report import ArmRun, write_report
from splitserve.experiments.results import RequestResult
from splitserve.router.decision_log import Choice, DecisionRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def request(index: int, **fields) -> RequestResult:
    base = {"arm": "cpd", "session_id": f"s{index}", "turn": 0, "input_len": 100, "sent_s": float(index)}
    return RequestResult(index=index, **{**base, **fields})


def hand_built() -> list[RequestResult]:
    return [
        request(0, input_len=100, sent_s=0.0, ttft_s=0.1, itl_s=[0.02, 0.03, 0.05], e2e_s=0.2, output_len=4,
                pool="warm", predicted_cached_tokens=60, cached_tokens=64),
        # a single-token output: no ITLs, no TPOT
        request(1, input_len=50, sent_s=0.5, ttft_s=0.3, e2e_s=0.3, output_len=1, pool="fresh",
                predicted_cached_tokens=0, cached_tokens=16),
        request(2, input_len=200, sent_s=1.0, ttft_s=0.2, itl_s=[0.04], e2e_s=0.24, output_len=2, pool="warm",
                predicted_cached_tokens=100, cached_tokens=96),
        request(3, input_len=80, sent_s=1.5, predicted_cached_tokens=32, error="OverloadedError: queue full"),
        request(4, input_len=70, sent_s=2.0, e2e_s=0.5, output_len=3, error="Timeout after 30 s"),
    ]  # fmt: skip


def test_summarize_every_field_by_hand():
    s = summarize(hand_built())
    approx = pytest.approx
    assert s["completed"] == 3 and s["errors"] == 2
    assert s["error_kinds"] == {"OverloadedError": 1, "Timeout": 1}
    assert s["duration"] == approx(2.5)  # sent 0.0 → request 4 done at 2.0 + 0.5
    assert s["request_throughput"] == approx(3 / 2.5)
    assert s["output_throughput"] == approx(7 / 2.5)  # ok requests only: 4 + 1 + 2
    assert s["total_token_throughput"] == approx((350 + 7) / 2.5)
    # TTFT ms [100, 300, 200] → sorted [100, 200, 300]
    assert s["mean_ttft_ms"] == approx(200) and s["median_ttft_ms"] == approx(200)
    assert s["p90_ttft_ms"] == approx(280) and s["p99_ttft_ms"] == approx(298)
    # TPOT ms: (200 − 100) / 3 and (240 − 200) / 1; the single-token request has none
    lo, hi = 100 / 3, 40.0
    assert s["mean_tpot_ms"] == approx((lo + hi) / 2) and s["median_tpot_ms"] == approx((lo + hi) / 2)
    assert s["p90_tpot_ms"] == approx(lo + 0.9 * (hi - lo))
    assert s["p99_tpot_ms"] == approx(lo + 0.99 * (hi - lo))
    # ITL ms pooled: [20, 30, 50, 40] → sorted [20, 30, 40, 50]
    assert s["mean_itl_ms"] == approx(35) and s["median_itl_ms"] == approx(35)
    assert s["p90_itl_ms"] == approx(47) and s["p99_itl_ms"] == approx(49.7)
    # E2E ms [200, 300, 240] → sorted [200, 240, 300]
    assert s["mean_e2el_ms"] == approx(740 / 3) and s["median_e2el_ms"] == approx(240)
    assert s["p90_e2el_ms"] == approx(288) and s["p99_e2el_ms"] == approx(298.8)
    assert s["hit_rate"] == approx(176 / 350)
    assert s["predicted_cached_tokens"] == 160 and s["actual_cached_tokens"] == 176  # the failure's 32 is out
    assert s["prediction_ratio"] == approx(160 / 176)
    assert s["pool_shares"] == approx({"fresh": 1 / 3, "warm": 2 / 3})


def test_prediction_ratio_is_a_ratio_of_sums():
    results = [request(0, ttft_s=0.1, e2e_s=0.1, output_len=1, predicted_cached_tokens=10, cached_tokens=10),
               request(1, ttft_s=0.1, e2e_s=0.1, output_len=1, predicted_cached_tokens=0, cached_tokens=90)]
    assert summarize(results)["prediction_ratio"] == pytest.approx(0.1)  # a mean of ratios would be 0.5
    nothing_cached = [request(0, ttft_s=0.1, e2e_s=0.1, output_len=1, predicted_cached_tokens=10)]
    assert summarize(nothing_cached)["prediction_ratio"] is None


@pytest.mark.parametrize("results", [[], [request(0, error="WorkerUnavailable: gone")]],
                         ids=["empty", "failed"])  # fmt: skip
def test_summarize_without_ok_requests_gives_none_not_nan(results):
    s = summarize(results)
    assert s["completed"] == 0 and s["errors"] == len(results) and s["pool_shares"] == {}
    for key in ("request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_itl_ms",
                "p90_e2el_ms", "hit_rate", "prediction_ratio"):  # fmt: skip
        assert s[key] in (None, 0.0), key
    assert s["mean_ttft_ms"] is None and s["hit_rate"] is None
    json.dumps(s, allow_nan=False)


def test_duration_counts_a_failure_without_completion_at_its_send_and_can_be_overridden():
    results = [request(0, sent_s=0.0, ttft_s=0.1, e2e_s=1.0, output_len=2), request(1, sent_s=3.0, error="X")]
    assert summarize(results)["duration"] == pytest.approx(3.0)
    assert summarize(results, duration_s=10.0)["request_throughput"] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        summarize(results, duration_s=0.0)


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(7)
    for n in (1, 2, 5, 17):
        values = [rng.uniform(0, 100) for _ in range(n)]
        for p in (0, 10, 50, 90, 99, 100):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert percentile([], 50) is None


def test_rolling_hit_rate_windows_ok_requests_only():
    results = [request(0, sent_s=0.0, input_len=100, cached_tokens=0),
               request(1, sent_s=1.0, input_len=100, cached_tokens=50),
               request(2, sent_s=2.0, input_len=100, cached_tokens=100),
               request(9, sent_s=2.5, input_len=100, error="X"),
               request(3, sent_s=3.0, input_len=300, cached_tokens=300)]  # fmt: skip
    points = rolling_hit_rate(results, window_s=2.0)
    assert points == [(0.0, 0.0), (1.0, 0.25), (2.0, 0.75), (3.0, 1.0)]  # binary-exact shares


def point(p90_ms: float | None, completed: int = 100, errors: int = 0) -> dict:
    return {"p90_ttft_ms": p90_ms, "completed": completed, "errors": errors}


def test_sustainable_rate_all_pass_gives_the_highest_rate():
    assert sustainable_rate([(1.0, point(50)), (4.0, point(150)), (2.0, point(100))], 200) == 4.0


def test_sustainable_rate_none_when_the_lowest_rate_fails():
    assert sustainable_rate([(1.0, point(250)), (2.0, point(100))], 200) is None
    assert sustainable_rate([(1.0, point(100, errors=5))], 200) is None
    assert sustainable_rate([], 200) is None


def test_sustainable_rate_interpolates_on_p90_ttft():
    points = [(4.0, point(300)), (1.0, point(100)), (2.0, point(150))]
    assert sustainable_rate(points, 200) == pytest.approx(2 + (200 - 150) / (300 - 150) * (4 - 2))


def test_sustainable_rate_does_not_interpolate_a_failure_on_errors():
    assert sustainable_rate([(1.0, point(100)), (2.0, point(150, completed=95, errors=5))], 200) == 1.0
    assert sustainable_rate([(1.0, point(100)), (2.0, point(900, completed=50, errors=50))], 200) == 1.0
    assert sustainable_rate([(1.0, point(100)), (2.0, point(None, completed=0, errors=10))], 200) == 1.0
    # exactly at the error budget passes
    assert sustainable_rate([(1.0, point(100, completed=99, errors=1))], 200) == 1.0


def test_sustainable_rate_ignores_passing_rates_above_the_first_failure():
    points = [(1.0, point(100)), (2.0, point(300)), (3.0, point(150)), (4.0, point(180))]
    assert sustainable_rate(points, 200) == pytest.approx(1.5)


def test_sustainable_rate_rejects_repeated_or_negative_rates():
    with pytest.raises(ValueError):
        sustainable_rate([(1.0, point(100)), (1.0, point(100))], 200)
    with pytest.raises(ValueError):
        sustainable_rate([(-1.0, point(100))], 200)


def decision_records() -> list[DecisionRecord]:
    def rec(i, choice, terms, **shadow):
        return DecisionRecord(float(i), f"r{i}", "cpd", choice, terms, 100, 0, shadow)

    w1, w1b = Choice("warm", "p1", "d1"), Choice("warm", "p1", "d2")
    f2, local = Choice("fresh", "p2", "d1"), Choice("decode-local", None, "d1")
    return [
        rec(0, w1, {"hit": 1.0, "load": 2.0}, rr=w1, ll=f2),  # rr agrees; ll does not
        rec(1, w1b, {"hit": 3.0, "load": 0.0}, rr=Choice("warm", "p2", "d2"), ll=w1b),  # rr: pool only
        rec(2, f2, {"hit": 0.0}, rr=f2),  # rr agrees; no ll shadow
        rec(3, local, {"hit": 2.0, "load": 4.0, "local": 1.0}, rr=w1, ll=f2),  # neither agrees
    ]


def test_summarize_decisions_by_hand():
    d = metrics.summarize_decisions(decision_records())
    assert d["num_decisions"] == 4
    assert d["compared"] == {"ll": 3, "rr": 4}
    assert d["agreement"] == {"ll": 1 / 3, "rr": 0.5}
    assert d["pool_agreement"] == {"ll": 1 / 3, "rr": 0.75}
    assert d["mean_terms"] == {"hit": 1.5, "load": 2.0, "local": 1.0}
    assert d["top_choices"] == [["warm", "p1", 2], ["fresh", "p2", 1], ["decode-local", None, 1]]


def sweep_run(arm: str, rate: float, ttft_s: float, n: int = 10) -> ArmRun:
    results = [request(i, arm=arm, sent_s=i / rate, ttft_s=ttft_s, itl_s=[0.01], e2e_s=ttft_s + 0.01,
                       output_len=2, pool="warm" if i % 2 else "fresh", predicted_cached_tokens=40,
                       cached_tokens=50) for i in range(n)]  # fmt: skip
    return ArmRun(arm, rate, results)


def ab_runs() -> dict[str, list[ArmRun]]:
    # p90 TTFT is the (constant) TTFT of each run: cpd 100/150/300 ms, rr 120/400/500 ms
    return {"cpd": [sweep_run("cpd", 4.0, 0.3), sweep_run("cpd", 1.0, 0.1), sweep_run("cpd", 2.0, 0.15)],
            "rr": [sweep_run("rr", r, t) for r, t in ((1.0, 0.12), (2.0, 0.4), (4.0, 0.5))]}  # fmt: skip


def test_write_report_end_to_end(tmp_path):
    out = tmp_path / "report"
    meta = {"workload": "sessions", "cluster": "2 warm + 1 fresh + 2 decode", "device": "cpu"}
    returned = write_report(out, ab_runs(), oracle_hit_rate=0.8, slo_ttft_p90_ms=200.0, meta=meta,
                            decisions={"cpd": decision_records()})  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results == returned and results["meta"] == meta and results["slo_ttft_p90_ms"] == 200.0
    cpd, rr = results["arms"]["cpd"], results["arms"]["rr"]
    for entry in (cpd, rr):
        for key in ("completed", "request_throughput", "p90_ttft_ms", "mean_tpot_ms", "hit_rate",
                    "prediction_ratio", "pool_shares", "oracle_hit_rate", "hit_rate_vs_oracle"):  # fmt: skip
            assert key in entry, key
        assert [p["rate"] for p in entry["sweep"]] == [1.0, 2.0, 4.0]
        assert entry["hit_rate"] == pytest.approx(0.5) and entry["hit_rate_vs_oracle"] == pytest.approx(0.625)
        assert entry["prediction_ratio"] == pytest.approx(0.8)
    assert cpd["sustainable_rate"] == pytest.approx(2 + 50 / 150 * 2) and cpd["rate"] == 2.0
    assert cpd["p90_ttft_ms"] == pytest.approx(150)  # the headline run's summary
    assert rr["sustainable_rate"] == pytest.approx(1 + 80 / 280) and rr["rate"] == 1.0
    assert [p["p90_ttft_ms"] for p in rr["sweep"]] == pytest.approx([120, 400, 500])
    assert results["decisions"]["cpd"]["agreement"] == {"ll": 1 / 3, "rr": 0.5}

    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 60
    assert {(r["arm"], r["rate"]) for r in map(json.loads, lines)} == {
        (arm, rate) for arm in ("cpd", "rr") for rate in (1.0, 2.0, 4.0)}  # fmt: skip

    md = (out / "report.md").read_text()
    for text in ("| cpd |", "| rr |", "| workload | sessions |", "### Sweep: cpd", "## Decisions",
                 "| rr | 4 | 0.500 | 0.750 |", "| ll | 3 | 0.333 | 0.333 |", "| hit | 1.50 |",
                 "| decode-local | local | 1 | 0.250 |", "Ratios of sustainable_rate",
                 f"| cpd | – | {(8 / 3) / (1 + 80 / 280):.2f} |"):  # fmt: skip
        assert text in md, text
    for name in ("ttft_cdf.png", "latency_vs_rate.png", "hit_rate_over_time.png", "pool_shares.png"):
        assert f"]({name})" in md
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)


def test_write_report_without_slo_headlines_the_lowest_rate(tmp_path):
    results = write_report(tmp_path, ab_runs(), oracle_hit_rate=0.5, meta={})
    assert results["arms"]["cpd"]["rate"] == 1.0 and results["arms"]["cpd"]["sustainable_rate"] is None
    assert "Ratios of request_throughput" in (tmp_path / "report.md").read_text()
    assert "decisions" not in results and "## Decisions" not in (tmp_path / "report.md").read_text()


def test_write_report_on_empty_and_failed_runs(tmp_path):
    failed = [request(i, arm="b", error="OverloadedError: full") for i in range(3)]
    runs = {"a": [ArmRun("a", None, [])], "b": [ArmRun("b", 1.0, failed), ArmRun("b", 2.0, [])]}
    results = write_report(tmp_path, runs, oracle_hit_rate=0.0, slo_ttft_p90_ms=100.0, meta={"x": 1})
    assert results["arms"]["a"]["completed"] == 0 and results["arms"]["a"]["hit_rate_vs_oracle"] is None
    assert results["arms"]["b"]["errors"] == 3 and results["arms"]["b"]["sustainable_rate"] is None
    assert results["arms"]["b"]["error_kinds"] == {"OverloadedError": 3}
    assert (tmp_path / "requests.jsonl").read_text().count("\n") == 3
    for name in ("ttft_cdf.png", "latency_vs_rate.png", "hit_rate_over_time.png", "pool_shares.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("runs", [
    {},
    {"a": []},
    {"a": [ArmRun("a", -1.0, [])]},
    {"a": [ArmRun("a", 0.0, [])]},
    {"a": [ArmRun("b", 1.0, [])]},
    {"a": [ArmRun("a", 1.0, []), ArmRun("a", 1.0, [])]},
    {"a": [ArmRun("a", None, []), ArmRun("a", 1.0, [])]},
    {"a": [ArmRun("a", 1.0, [], duration_s=-2.0)]},
], ids=["no-arms", "no-runs", "negative-rate", "zero-rate", "other-arm", "repeated-rate", "mixed-none",
        "negative-duration"])  # fmt: skip
def test_write_report_rejects_malformed_runs_before_writing(tmp_path, runs):
    out = tmp_path / "report"
    with pytest.raises(ValueError):
        write_report(out, runs, oracle_hit_rate=0.5, meta={})
    assert not out.exists()


@pytest.mark.parametrize("kwargs", [
    {"oracle_hit_rate": 1.5},
    {"oracle_hit_rate": 0.5, "slo_ttft_p90_ms": 0.0},
    {"oracle_hit_rate": 0.5, "decisions": {"zz": []}},
])  # fmt: skip
def test_write_report_rejects_malformed_options_before_writing(tmp_path, kwargs):
    out = tmp_path / "report"
    with pytest.raises(ValueError):
        write_report(out, {"a": [ArmRun("a", 1.0, [])]}, meta={}, **kwargs)
    assert not out.exists()
