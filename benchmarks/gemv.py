"""Small-batch GEMV kernels against the unfused path, on a GPU (Llama-3.2-1B shapes, bf16).

One run prints the device, versions and the device copy bandwidth, then for each projection of a decoder
layer and the LM head at 1, 4, 8 and 16 tokens: a correctness check, then the time of
  (a) the unfused path (the Triton add_rms_norm kernel, cuBLAS through F.linear, the Triton silu_and_mul
      kernel), what the engine runs above `fused_gemv_max_tokens`;
  (b) the fused GEMV kernel at its default tuning;
  (c) the best of a modest sweep of `GemvTuning` (each config checked before it is timed);
each in µs and as (weight bytes / time) / copy bandwidth. Kernel times replay CUDA graphs of back-to-back
calls that cycle through enough weight copies to miss L2, as a model's layers do.
Then a chain: 16 layers of the per-layer sequence (attention left out: o_proj reads the q columns of
qkv) captured in one CUDA graph, unfused against fused with PDL off and on, which shows the launch gaps
that fusion and PDL remove. Compact tables come last.
Usage: export PYTHONPATH=$(benchmarks/device_path.sh); python3 -P benchmarks/gemv.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from splitserve.kernels.gemv import (
    GemvTuning,
    add_rms_norm_gemv,
    add_rms_norm_gemv_reference,
    add_rms_norm_gemv_silu_mul,
    add_rms_norm_gemv_silu_mul_reference,
    default_tuning,
    gemv,
    gemv_reference,
    pdl_supported,
)
from splitserve.kernels.rms_norm import add_rms_norm, rms_norm
from splitserve.kernels.silu_mul import silu_and_mul

DEVICE = "cuda"
DTYPE = torch.bfloat16
EPS = 1e-5
HIDDEN, INTERMEDIATE, QKV, VOCAB, NUM_LAYERS = 2048, 8192, 3072, 128256, 16
ROTATE_BYTES = 256 * 2**20  # weight copies per timed case: five times an H100's 50 MiB L2
MAX_REL_ERROR = 1e-2  # bfloat16 outputs against the reference, as ||got - want|| / ||want||


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "plain": gemv; "norm": add_rms_norm_gemv; "norm_silu": add_rms_norm_gemv_silu_mul
    in_features: int
    weight_rows: int  # gate_up: 2 * intermediate

    @property
    def out_features(self) -> int:
        return self.weight_rows // 2 if self.kind == "norm_silu" else self.weight_rows

    @property
    def weight_bytes(self) -> int:
        return self.weight_rows * self.in_features * DTYPE.itemsize


CASES = [
    Case("qkv", "norm", HIDDEN, QKV),
    Case("o", "plain", HIDDEN, HIDDEN),
    Case("gate_up", "norm_silu", HIDDEN, 2 * INTERMEDIATE),
    Case("down", "plain", INTERMEDIATE, HIDDEN),
    Case("lm_head", "plain", HIDDEN, VOCAB),
]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of repeats)."""
    src = torch.randn(2**29, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, device=DEVICE)).to(DTYPE)


def graph_us(step: Callable[[torch.Tensor], object], weights: list[torch.Tensor], rep_ms: int) -> float:
    """Median µs per call of `step(weight)`, replayed from a CUDA graph of back-to-back calls that cycle
    through `weights` (so no launch overhead, and weights come from HBM)."""
    cycle = itertools.cycle(weights)
    return do_bench_cudagraph(lambda: step(next(cycle)), rep=rep_ms, return_mode="median") * 1e3


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


class Bench:
    """One case at one row count: its inputs, weight copies, and the unfused/fused calls on them."""

    def __init__(self, case: Case, num_tokens: int) -> None:
        self.case, self.num_tokens = case, num_tokens
        k = case.in_features
        copies = max(1, math.ceil(ROTATE_BYTES / case.weight_bytes))
        self.weights = [randn(case.weight_rows, k, scale=k**-0.5) for _ in range(copies)]  # [rows, K] each
        self.x, self.residual = randn(num_tokens, k), randn(num_tokens, k)  # [num_tokens, K]
        self.norm_weight = 1.0 + randn(k, scale=0.1)
        self.out = torch.empty(num_tokens, case.out_features, dtype=DTYPE, device=DEVICE)

    def fused(self, tuning: GemvTuning | None) -> Callable[[torch.Tensor], object]:
        x, residual, nw, kind = self.x, self.residual, self.norm_weight, self.case.kind
        if kind == "norm":
            return lambda w: add_rms_norm_gemv(x, residual, nw, EPS, w, tuning=tuning)[0]
        if kind == "norm_silu":
            return lambda w: add_rms_norm_gemv_silu_mul(x, residual, nw, EPS, w, tuning=tuning)[0]
        return lambda w: gemv(x, w, out=self.out, tuning=tuning)

    def unfused(self) -> Callable[[torch.Tensor], object]:
        """The engine's path above fused_gemv_max_tokens; the norm runs in place on private copies."""
        x, residual, nw, kind = self.x.clone(), self.residual.clone(), self.norm_weight, self.case.kind
        if kind == "norm":
            return lambda w: F.linear(add_rms_norm(x, residual, nw, EPS)[0], w)
        if kind == "norm_silu":
            return lambda w: silu_and_mul(F.linear(add_rms_norm(x, residual, nw, EPS)[0], w))
        return lambda w: F.linear(x, w)

    def reference(self) -> torch.Tensor:
        w, kind = self.weights[0], self.case.kind
        if kind == "norm":
            return add_rms_norm_gemv_reference(self.x, self.residual, self.norm_weight, EPS, w)[0]
        if kind == "norm_silu":
            return add_rms_norm_gemv_silu_mul_reference(self.x, self.residual, self.norm_weight, EPS, w)[0]
        return gemv_reference(self.x, w)

    def check(self, tuning: GemvTuning | None, want: torch.Tensor) -> None:
        got = self.fused(tuning)(self.weights[0])
        err = rel_error(got, want)
        if not err < MAX_REL_ERROR:
            raise AssertionError(f"{self.case.name} M={self.num_tokens} {tuning}: relative error {err:.3g}")

    def fraction(self, us: float, bandwidth: float) -> float:
        return self.case.weight_bytes / (us * 1e-6) / bandwidth


def sweep_tunings(case: Case, quick: bool, one_row: bool = False) -> list[GemvTuning]:
    """A modest grid: column block x K tile x split (x warps for the one-row kernel); splits only where
    programs are few."""
    warps = (4,)
    if quick:
        block_ns, block_ks, splits = (16, 32), (256,), (1, 2)
    elif one_row:
        block_ns, block_ks, splits, warps = (16, 32, 64), (256, 512, 1024), (1, 2, 4), (4, 8)
    else:
        block_ns, block_ks, splits = (16, 32, 64), (128, 256), (1, 2, 4)
    stages = 4 if case.kind == "plain" else 3
    tunings = []
    for block_n, block_k, split_k, num_warps in itertools.product(block_ns, block_ks, splits, warps):
        programs = triton.cdiv(case.out_features, block_n)
        if split_k > 1 and (programs * split_k > 1024 or case.in_features < 2 * split_k * block_k):
            continue
        tunings.append(GemvTuning(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=stages,
                                  split_k=split_k))  # fmt: skip
    return tunings


def short(t: GemvTuning) -> str:
    return f"n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages} split{t.split_k}"


def run_case(case: Case, num_tokens: int, bw: float, rep_ms: int, sweep: list[GemvTuning]) -> dict:
    bench = Bench(case, num_tokens)
    want = bench.reference()
    default = default_tuning(num_tokens, case.out_features, case.in_features,
                             norm=case.kind != "plain", silu=case.kind == "norm_silu")  # fmt: skip
    bench.check(None, want)
    row = {"case": case.name, "num_tokens": num_tokens, "default": short(default)}
    row["unfused_us"] = graph_us(bench.unfused(), bench.weights, rep_ms)
    row["fused_us"] = graph_us(bench.fused(None), bench.weights, rep_ms)
    best_us, best = row["fused_us"], default
    for tuning in sweep:
        if tuning == default:
            continue
        try:
            bench.check(tuning, want)
            us = graph_us(bench.fused(tuning), bench.weights, rep_ms)
        except triton.runtime.errors.OutOfResources as e:  # e.g. shared memory of a large tile
            print(f"  skip {short(tuning)}: {e}")
            continue
        if us < best_us:
            best_us, best = us, tuning
    row.update(best_us=best_us, best=short(best), swept=len(sweep))
    for key in ("unfused", "fused", "best"):
        row[f"{key}_fraction"] = bench.fraction(row[f"{key}_us"], bw)
    return row


# ------------------------------------------------------------------------------------------------- chain


def make_layers() -> list[tuple[torch.Tensor, ...]]:
    """Per layer: input norm, qkv [3072, H], o [H, H], post-attention norm, gate_up [2I, H], down [H, I]."""

    def layer() -> tuple[torch.Tensor, ...]:
        attn = (1.0 + randn(HIDDEN, scale=0.1), randn(QKV, HIDDEN, scale=HIDDEN**-0.5),
                randn(HIDDEN, HIDDEN, scale=HIDDEN**-0.5))  # fmt: skip
        mlp = (1.0 + randn(HIDDEN, scale=0.1), randn(2 * INTERMEDIATE, HIDDEN, scale=HIDDEN**-0.5),
               randn(HIDDEN, INTERMEDIATE, scale=INTERMEDIATE**-0.5))  # fmt: skip
        return attn + mlp

    return [layer() for _ in range(NUM_LAYERS)]


def fused_chain(x0: torch.Tensor, layers, pdl: bool) -> torch.Tensor:
    x, residual = x0.clone(), None
    for ln1, qkv_w, o_w, ln2, gate_up_w, down_w in layers:
        qkv, residual = add_rms_norm_gemv(x, residual, ln1, EPS, qkv_w, pdl=pdl)
        x = gemv(qkv[:, :HIDDEN], o_w, pdl=pdl)  # attention left out
        act, residual = add_rms_norm_gemv_silu_mul(x, residual, ln2, EPS, gate_up_w, pdl=pdl)
        x = gemv(act, down_w, pdl=pdl)
    return x + residual


def unfused_chain(x0: torch.Tensor, layers) -> torch.Tensor:
    x, residual = x0.clone(), None
    for ln1, qkv_w, o_w, ln2, gate_up_w, down_w in layers:
        if residual is None:
            residual, x = x, rms_norm(x, ln1, EPS)
        else:
            x, residual = add_rms_norm(x, residual, ln1, EPS)
        x = F.linear(F.linear(x, qkv_w)[:, :HIDDEN], o_w)
        x, residual = add_rms_norm(x, residual, ln2, EPS)
        x = F.linear(silu_and_mul(F.linear(x, gate_up_w)), down_w)
    return x + residual


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and warms up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def run_chain(layers, num_tokens: int, bw: float, pdl_ok: bool) -> dict:
    x0 = randn(num_tokens, HIDDEN)
    variants = {"unfused": lambda: unfused_chain(x0, layers), "fused": lambda: fused_chain(x0, layers, False)}
    if pdl_ok:
        variants["fused_pdl"] = lambda: fused_chain(x0, layers, True)
    outs, row = {}, {"num_tokens": num_tokens}
    for name, fn in variants.items():
        graph, out = capture(fn)
        graph.replay()
        torch.cuda.synchronize()
        outs[name] = out.clone()
        row[f"{name}_us"] = do_bench(graph.replay, warmup=10, rep=200, return_mode="median") * 1e3
        del graph
    row["fused_vs_unfused_rel_error"] = rel_error(outs["fused"], outs["unfused"])
    if pdl_ok and not torch.equal(outs["fused_pdl"], outs["fused"]):
        raise AssertionError("the chain with PDL gives different values than without")
    if not row["fused_vs_unfused_rel_error"] < 5e-2:
        raise AssertionError(f"fused chain differs from unfused: {row['fused_vs_unfused_rel_error']:.3g}")
    weight_bytes = sum(w.numel() * w.element_size() for layer in layers for w in layer)
    for name in variants:
        row[f"{name}_fraction"] = weight_bytes / (row[f"{name}_us"] * 1e-6) / bw
    return row


# -------------------------------------------------------------------------------------------------- main


def timing(row: dict, key: str) -> str:
    """'µs (fraction of copy bandwidth)' of one measurement, or n/a."""
    if f"{key}_us" not in row:
        return "n/a"
    return f"{row[f'{key}_us']:.1f} ({row[f'{key}_fraction']:.2f})"


def print_tables(rows: list[dict], chains: list[dict]) -> None:
    print("\nµs per call (weight bytes / time as a fraction of copy bandwidth)")
    print("| proj | M | unfused | fused, default | fused, best | best of sweep (configs) | default |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["case"], r["num_tokens"], *(timing(r, k) for k in ("unfused", "fused", "best"))]
        cells += [f"{r['best']} ({r['swept']})", r["default"]]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"\n{NUM_LAYERS} layers in one CUDA graph (no attention), µs per replay (fraction of bandwidth)")
    print("| M | unfused | fused | fused + PDL | saved per layer, µs | fused vs unfused rel. error |")
    print("|---|---|---|---|---|---|")
    for c in chains:
        saved = (c["unfused_us"] - c.get("fused_pdl_us", c["fused_us"])) / NUM_LAYERS
        cells = [c["num_tokens"], *(timing(c, k) for k in ("unfused", "fused", "fused_pdl"))]
        cells += [f"{saved:.2f}", f"{c['fused_vs_unfused_rel_error']:.1e}"]
        print("| " + " | ".join(map(str, cells)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M 1 and 8, a 4-config sweep, chain at M=1")
    parser.add_argument("--one-row", action="store_true", help="M 1 only, a wider sweep (the one-row kernel)")
    parser.add_argument("--sweep-budget-s", type=float, default=100.0, help="stop sweeping after this long")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    start = time.perf_counter()
    pdl_ok = pdl_supported(torch.device(DEVICE))
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"copy bandwidth {bw / 1e12:.3f} TB/s; PDL {'on' if pdl_ok else 'unsupported'}")  # fmt: skip
    token_counts = (1,) if args.one_row else (1, 8) if args.quick else (1, 4, 8, 16)
    rep_ms = 5 if args.quick else 10
    rows = []
    for case, num_tokens in itertools.product(CASES, token_counts):
        over_budget = time.perf_counter() - start > args.sweep_budget_s
        sweep = [] if over_budget else sweep_tunings(case, args.quick, args.one_row)
        row = run_case(case, num_tokens, bw, rep_ms, sweep)
        rows.append(row)
        print(
            f"{case.name:8s} M={num_tokens:2d}: unfused {row['unfused_us']:7.1f} µs, fused "
            f"{row['fused_us']:7.1f}, best {row['best_us']:7.1f} ({row['best']}, {row['swept']} swept)",
            flush=True,
        )

    layers = make_layers()
    chains = [run_chain(layers, m, bw, pdl_ok) for m in ((1,) if args.quick or args.one_row else (1, 8))]
    print_tables(rows, chains)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        results = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "cases": rows}
        with open(args.json, "w") as f:
            json.dump({**results, "chains": chains}, f, indent=1)


if __name__ == "__main__":
    main()
