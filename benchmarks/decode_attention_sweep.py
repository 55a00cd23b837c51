"""Sweep the paged decode attention kernel's launch knobs (`DecodeTuning`) on a GPU.

For a few (batch, context, block-table capacity) cases of the Llama-3.2-1B shape (bf16, 32 query / 8 KV
heads, head_dim 64, block size 16) it times every knob combination and prints, per case, the default and
the five fastest, as a fraction of the device copy bandwidth measured in the same run. Each timed config is
checked against the plain-torch reference first. Calls are timed as the engine runs them: 16 back to back
inside one CUDA graph (one per layer of the 1B model), so host launch cost is excluded and the kernels'
own fixed cost (launch gap, merge pass) is included.
Usage: python -P benchmarks/decode_attention_sweep.py
"""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench

from splitserve.kernels.paged_decode_attention import (
    DecodeTuning,
    default_tuning,
    paged_decode_attention,
    paged_decode_attention_reference,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 64, 16
CASES = [(1, 2048, 8192), (1, 16384, 16384), (8, 2048, 8192), (8, 4096, 8192), (32, 2048, 8192),
         (64, 2048, 8192)]
GRID = {
    "block_n": (64,),
    "num_warps": (4,),
    "num_stages": (2, 3),
    "min_split_chunks": (1, 2, 4),
    "programs_per_sm": (2, 4, 8),
}
CALLS_PER_GRAPH = 16


def copy_bandwidth() -> float:
    src = torch.randn(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 4 * src.numel() / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def make_case(batch: int, context: int, capacity: int):
    blocks_per_seq = capacity // BLOCK
    num_blocks = batch * blocks_per_seq + 1
    cache = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    tables = (torch.randperm(num_blocks - 1, device="cuda") + 1).view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return q, cache, tables, lens


def time_config(args, tuning: DecodeTuning, ref: torch.Tensor) -> float:
    q, cache, tables, lens = args
    out = paged_decode_attention(q, cache, tables, lens, HEAD_DIM**-0.5, tuning=tuning)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        raise AssertionError(f"{tuning}: relative error {err:.3g}")
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            paged_decode_attention(q, cache, tables, lens, HEAD_DIM**-0.5, out=out, tuning=tuning)
    return do_bench(graph.replay, warmup=10, rep=40, return_mode="median") / CALLS_PER_GRAPH


def main() -> None:
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.3f} TB/s")
    for batch, context, capacity in CASES:
        args = make_case(batch, context, capacity)
        ref = paged_decode_attention_reference(*args, HEAD_DIM**-0.5).float()
        moved = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
        results = []
        for values in itertools.product(*GRID.values()):
            tuning = DecodeTuning(**dict(zip(GRID, values, strict=True)))
            results.append((time_config(args, tuning, ref), tuning))
        default_ms = time_config(args, default_tuning(HEAD_DIM, batch), ref)
        results.sort(key=lambda r: r[0])
        print(f"\nbatch {batch}, context {context}, capacity {capacity}: default {default_ms * 1e3:.1f} µs "
              f"({moved / (default_ms * 1e-3) / bw:.2f} of copy bw)")
        for ms, tuning in results[:5]:
            print(f"  {ms * 1e3:7.1f} µs  {moved / (ms * 1e-3) / bw:.2f}  {tuning}")


if __name__ == "__main__":
    main()
