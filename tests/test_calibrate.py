"""benchmarks/calibrate.py: its non-negative least-squares fit on synthetic points from known coefficients,
and a `--quick` run on the tiny model end to end (real engine, in-process prefill workers, a decode worker
process), whose calibration file must load, hold finite non-negative numbers that predict its own points
and say where they came from; and benchmarks/calibrate_path.py over a cluster of processes."""

from __future__ import annotations

import datetime
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from splitserve.router.cost_model import CostModel, DecodeCost, PrefillCost, TransferCost, load_calibration

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# The written model's predictions: every point within this factor of its measurement, and the median
# relative error of each part within MEDIAN_ERROR. Loose, for a loaded 2-core box: a busy neighbour moves
# single points by 2-4x (CPU figures are noisy), while a wrong formula or unit misses by orders.
FIT_FACTOR = 5.0
MEDIAN_ERROR = 0.5


def load_script(name):
    """benchmarks/ is no package: load a script by its path (registered first, as an import would)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


calibrate = load_script("calibrate")
Point = calibrate.Point


def assert_close(got, want, rel=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=rel, abs=0 if w else 1e-18), (got, want)


def test_fit_recovers_prefill_coefficients():
    want = PrefillCost(fixed_s=2e-3, per_token_s=4e-6, per_token_ctx_s=2e-10)
    points = [Point("prefill", "", {"num_new": n, "num_cached": c}, want.seconds(n, c))
              for n in (16, 64, 256, 1024, 4096) for c in (0, 512, 2048)]  # fmt: skip
    got = calibrate.fit_prefill(points)
    assert_close(list(vars(got).values()), list(vars(want).values()))


def test_fit_recovers_decode_coefficients():
    want = DecodeCost(fixed_s=1.2e-3, per_seq_s=2e-5, per_ctx_token_s=8e-9)
    points = [Point("decode", "", {"num_seqs": b, "num_ctx_tokens": b * c + 7 * b}, 0.0)
              for b in (1, 4, 16, 64, 256) for c in (128, 1024, 4096)]  # fmt: skip
    points = [p._replace(seconds=want.step_seconds(**p.inputs)) for p in points]
    got = calibrate.fit_decode(points)
    assert_close(list(vars(got).values()), list(vars(want).values()))


def test_fit_recovers_transfer_coefficients():
    want = TransferCost(latency_s=2e-3, bytes_per_s=0.82e9)
    points = [Point("transfer", "", {"num_bytes": n}, want.seconds(n), "grpc")
              for n in (2**16, 2**20, 2**24, 2**27)]  # fmt: skip
    got, resolved = calibrate.fit_transfer(points)
    assert resolved
    assert_close([got.latency_s, got.bytes_per_s], [want.latency_s, want.bytes_per_s])


def test_negative_slope_is_clamped_to_zero_and_the_intercept_refitted():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = 10.0 - x  # an unconstrained fit has slope -1
    intercept, slope = calibrate.fit_nonnegative([[1.0, v] for v in x], y)
    assert slope == 0.0
    # the best constant under relative residuals: minimises sum(((c - y) / y) ** 2)
    assert intercept == pytest.approx(np.sum(1 / y) / np.sum(1 / y**2), rel=1e-9)


def test_a_negative_coefficient_among_three_is_held_at_zero_and_the_rest_refitted():
    rng = np.random.default_rng(0)
    x, z = rng.uniform(1, 10, 20), rng.uniform(1, 10, 20)
    y = 5.0 + 2.0 * x - 0.3 * z  # positive everywhere; the z coefficient fits negative
    rows = np.column_stack([np.ones_like(x), x, z])
    assert np.linalg.lstsq(rows / y[:, None], np.ones_like(y), rcond=None)[0][2] < 0
    got = calibrate.fit_nonnegative(rows, y)
    assert got[2] == 0.0
    refit = np.linalg.lstsq(rows[:, :2] / y[:, None], np.ones_like(y), rcond=None)[0]
    assert_close(got[:2], refit, rel=1e-9)
    assert all(c >= 0 for c in got)


def test_a_transfer_rate_hidden_by_noise_is_the_slowest_the_noise_allows():
    y = np.array([3.1e-3, 2.9e-3, 3.0e-3, 2.95e-3])  # no trend in the bytes: latency and noise only
    sizes = (1000, 2000, 3000, 4000)
    points = [Point("transfer", "", {"num_bytes": n}, v, "grpc") for n, v in zip(sizes, y, strict=True)]
    got, resolved = calibrate.fit_transfer(points)
    assert not resolved
    latency = np.sum(1 / y) / np.sum(1 / y**2)  # the latency-only fit under relative residuals
    assert got.latency_s == pytest.approx(latency, rel=1e-9)
    noise = np.sqrt(np.mean((y - latency) ** 2))
    assert got.bytes_per_s == pytest.approx(4000 / noise, rel=1e-9)  # the largest one's bytes: the noise


def test_fit_refuses_a_non_positive_scale():
    with pytest.raises(ValueError):
        calibrate.fit_nonnegative([[1.0], [1.0]], [1.0, 0.0])


@pytest.mark.slow
def test_quick_run_writes_a_calibration_that_loads_and_predicts_its_points(tiny_model, tmp_path):
    model_dir = tiny_model()
    out = tmp_path / "calibration.json"
    returned = calibrate.main(["--model", str(model_dir), "--device", "cpu", "--quick", "--out", str(out)])

    model = load_calibration(out)
    assert (model.prefill, model.decode, model.transfers) == (returned.prefill, returned.decode,
                                                             returned.transfers)  # fmt: skip
    coefficients = [*vars(model.prefill).values(), *vars(model.decode).values()]
    for t in model.transfers.values():
        coefficients += [t.latency_s, t.bytes_per_s]
    assert all(math.isfinite(c) and c >= 0 for c in coefficients), coefficients
    assert set(model.transfers) == {"grpc", "same-host"}
    assert all(t.bytes_per_s > 0 for t in model.transfers.values())
    assert model.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers × kv heads × head dim × fp32, K and V

    assert model.device and model.device != "unknown"
    assert model.source == f"benchmarks/calibrate.py --model {model_dir} --device cpu --dtype auto --quick"
    assert datetime.datetime.fromisoformat(model.measured).tzinfo is not None
    extra = model.extra
    assert {"python", "torch", "grpcio"} <= {k for k, v in extra["versions"].items() if v}
    assert extra["model"] == {"family": "llama", "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                              "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 512,
                              "dtype": "float32"}  # fmt: skip
    assert set(extra["fit_errors"]) == {"prefill", "decode", "transfer grpc", "transfer same-host"}
    assert extra["prefill_rpc"]["overhead_s"] >= 0
    load = extra["host_load"]  # the host tier's loads back into the engine's caches, measured here
    assert model.host_load_bytes_per_s == load["bytes_per_s"] == load["num_bytes"] / load["seconds"]
    assert load["num_bytes"] == -(-max(calibrate.GRIDS["quick"].transfer_tokens) // 16) * 16 * 512

    points = extra["points"]
    grid = calibrate.GRIDS["quick"]
    prefill = [p for p in points if p["part"] == "prefill"]
    assert sorted((p["num_new"], p["num_cached"]) for p in prefill) == sorted(
        (n, c) for n in grid.prefill_new for c in grid.prefill_cached)  # the prefix cache served the prefix
    assert len([p for p in points if p["part"] == "decode"]) == len(grid.decode_batches) * len(
        grid.decode_contexts)
    assert {p["transport"] for p in points if p["part"] == "transfer"} == {"grpc", "same-host"}
    overhead = extra["prefill_rpc"]["overhead_s"]
    for p in points:
        assert p["measured_s"] > 0 or p["part"] == "transfer", p
        if p["part"] == "prefill":  # the rows are the engine alone; the file's fixed cost adds the RPC
            predicted = model.prefill.seconds(p["num_new"], p["num_cached"]) - overhead
        elif p["part"] == "decode":
            predicted = model.decode.step_seconds(p["num_seqs"], p["num_ctx_tokens"])
        else:
            predicted = model.transfer(p["transport"]).seconds(p["num_bytes"])
        assert predicted == pytest.approx(p["predicted_s"], rel=1e-9)
        measured = max(p["measured_s"], 1e-6)
        assert 1 / FIT_FACTOR <= predicted / measured <= FIT_FACTOR, p
    assert all(e["median"] <= MEDIAN_ERROR for e in extra["fit_errors"].values()), extra["fit_errors"]


@pytest.mark.slow
def test_the_request_path_is_measured_end_to_end_and_written_into_the_file(tiny_model, tmp_path):
    # benchmarks/calibrate_path.py over a cluster of processes: the path of each route is what its TTFT
    # (SDK → router → workers → first token back) takes beyond the file's prefill of 16 tokens.
    path_script = load_script("calibrate_path")
    out = tmp_path / "calibration.json"
    costs = CostModel(PrefillCost(1e-4, 0.0, 0.0), DecodeCost(1e-3, 0.0, 0.0),
                      {"grpc": TransferCost(0.0, 1e9)}, kv_bytes_per_token=16, device="test")  # fmt: skip
    costs.save(out)
    paths = path_script.main(["--model", str(tiny_model()), "--calibration", str(out), "--requests", "5"])
    written = load_calibration(out)
    assert (written.path.pool_s, written.path.local_s) == (paths["pool"], paths["local"])
    assert all(0.0 < p < 1.0 for p in paths.values())  # an RPC hop costs something, far below a second
    assert written.prefill == costs.prefill and written.device == "test"  # the rest kept
    medians = written.extra["request_path"]["ttft_median_s"]
    assert medians["pool"] == pytest.approx(paths["pool"] + costs.prefill.seconds(16))
