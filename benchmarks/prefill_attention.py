"""Paged prefill attention on a GPU: the Triton kernel against the engine's torch path.

For the Llama-3.2-1B attention shape (32 query / 8 KV heads, head_dim 64, bf16, block size 16) and cases of
num_seqs x new tokens x cached prefix, it first checks the kernel against
`splitserve.engine.attention.prefill_attention` (per-sequence gather + SDPA, the path the engine runs now),
then times both (median of `triton.testing.do_bench`, after a first call so compilation is excluded) and
sweeps the kernel's launch knobs (`PrefillTuning`), checking each config before timing it. Prints the device,
versions and the bf16 matmul rate measured in the same run (the ceiling), then per case: torch µs, Triton
default µs, Triton best µs with its knobs, speedup of the best over torch, and the best's TFLOP/s (causal
pairs only) as a fraction of the matmul rate. Knobs print as given: the launcher lowers block_m to the rows
max_query_len x group fill (64 for the 16-token case), so such configs can time alike.
Usage: python -P benchmarks/prefill_attention.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
from triton.runtime import OutOfResources
from triton.testing import do_bench

from splitserve.engine.attention import AttentionMetadata, prefill_attention
from splitserve.kernels.paged_prefill_attention import PrefillTuning, default_tuning, paged_prefill_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 32, 8, 64, 16, torch.bfloat16
CASES = [
    (1, 512, 0),
    (1, 2048, 0),
    (1, 2048, 2048),
    (8, 512, 0),
    (4, 1024, 3072),
    (16, 128, 1024),
    (64, 16, 2048),
]
SWEEP = {"block_m": (64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
QUICK_SWEEP = {"block_m": (64, 128), "block_n": (64,), "num_warps": (4, 8), "num_stages": (3,)}
TOL = 2e-2  # bf16 outputs, fp32 softmax on both sides


def matmul_rate() -> float:
    """bf16 FLOP/s of an 8192^3 cuBLAS matmul: the ceiling TFLOP/s are reported against."""
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    return 2 * 8192**3 / (do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median") * 1e-3)


def make_case(num_seqs: int, num_new: int, num_cached: int) -> tuple[tuple, AttentionMetadata]:
    """Kernel arguments (q a view of a packed qkv projection, shuffled blocks) and the engine's metadata."""
    seq_len = num_cached + num_new
    blocks_per_seq = -(-seq_len // BLOCK)
    num_blocks = num_seqs * blocks_per_seq + 1  # block 0 is the null block
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    tables = (torch.randperm(num_blocks - 1, device="cuda") + 1).view(num_seqs, blocks_per_seq).int()
    num_tokens = num_seqs * num_new
    qkv = torch.randn(num_tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=DTYPE, device="cuda")
    q = qkv[:, : HEADS * HEAD_DIM].view(num_tokens, HEADS, HEAD_DIM)
    starts = tuple(range(0, num_tokens + 1, num_new))
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda")
    positions = torch.arange(num_cached, seq_len, device="cuda")  # [num_new]
    slots = tables[:, positions // BLOCK].long() * BLOCK + positions % BLOCK  # [num_seqs, num_new]
    meta = AttentionMetadata(
        phase="prefill", slot_mapping=slots.flatten(), query_start_loc=query_start_loc, seq_lens=seq_lens,
        block_tables=tables, query_start_loc_host=starts, seq_lens_host=(seq_len,) * num_seqs,
    )  # fmt: skip
    return (q, cache, tables, query_start_loc, seq_lens), meta


def causal_flops(num_seqs: int, num_new: int, num_cached: int) -> int:
    """QK^T and PV over the visible (query, key) pairs only: query r sees num_cached + r + 1 keys."""
    pairs = num_new * num_cached + num_new * (num_new + 1) // 2
    return 4 * num_seqs * HEADS * HEAD_DIM * pairs


def time_us(fn, rep: int) -> float:
    fn()  # compile and warm up outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1e3


def time_triton(args, scale: float, num_new: int, tuning: PrefillTuning, expected, rep: int) -> float | None:
    """µs of one config, or None if it does not fit the device; raises if its output is wrong."""

    def run():
        return paged_prefill_attention(*args, scale, max_query_len=num_new, tuning=tuning)

    try:
        err = (run().float() - expected.float()).abs().max().item()
    except OutOfResources:
        return None
    if not err <= TOL:
        raise RuntimeError(f"{tuning} differs from the torch path by {err:.3g} (tolerance {TOL})")
    return time_us(run, rep)


def knobs(t: PrefillTuning) -> str:
    return f"m{t.block_m} n{t.block_n} w{t.num_warps} s{t.num_stages}"


def run_case(case: tuple[int, int, int], sweep: dict, peak: float) -> dict:
    args, meta = make_case(*case)
    num_new, scale = case[1], HEAD_DIM**-0.5
    torch_us = time_us(lambda: prefill_attention(args[0], args[1], meta, scale), rep=100)
    expected = prefill_attention(args[0], args[1], meta, scale)
    default = default_tuning(HEAD_DIM, DTYPE)
    default_us = time_triton(args, scale, num_new, default, expected, rep=100)
    if default_us is None:
        raise RuntimeError(f"the default {default} does not fit the device")
    timings = {default: default_us}  # first, so that ties go to the default
    for values in itertools.product(*sweep.values()):
        tuning = PrefillTuning(**dict(zip(sweep, values, strict=True)))
        if tuning not in timings:
            timings[tuning] = time_triton(args, scale, num_new, tuning, expected, rep=40)
    fitted = {t: us for t, us in timings.items() if us is not None}
    best = min(fitted, key=fitted.__getitem__)
    best_us = fitted[best]
    tflops = causal_flops(*case) / (best_us * 1e-6) / 1e12
    return {"case": "x".join(map(str, case)), "torch_us": torch_us, "default_us": default_us,
            "best_us": best_us, "best": knobs(best), "speedup": torch_us / best_us, "tflops": tflops,
            "peak_fraction": tflops * 1e12 / peak, "skipped": len(timings) - len(fitted)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sweep {QUICK_SWEEP} only")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    peak = matmul_rate()
    print(f"bf16 matmul {peak / 1e12:.0f} TFLOP/s; shape {HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}, "
          f"block {BLOCK}, default {knobs(default_tuning(HEAD_DIM, DTYPE))}")  # fmt: skip
    torch.manual_seed(0)
    sweep = QUICK_SWEEP if args.quick else SWEEP
    rows = [run_case(case, sweep, peak) for case in CASES]
    if any(r["skipped"] for r in rows):
        print(f"configs that did not fit the device: {max(r['skipped'] for r in rows)} per case at most")
    print("\n| seqs x new x cached | torch µs | triton default µs | triton best µs (knobs) | speedup "
          "| TFLOP/s | of matmul |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['case']} | {r['torch_us']:.1f} | {r['default_us']:.1f} | {r['best_us']:.1f} "
              f"({r['best']}) | {r['speedup']:.2f} | {r['tflops']:.0f} "
              f"| {r['peak_fraction']:.2f} |")  # fmt: skip
    if args.json:
        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": triton.__version__, "matmul_tflops": peak / 1e12, "cases": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
