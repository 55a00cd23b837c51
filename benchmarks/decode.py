"""Decode speed against the memory-bandwidth limit, on a GPU (issue 3's benchmark).

One run prints the device, versions and measured ceilings (device copy bandwidth, bf16 matmul rate),
then for a Llama-3.2-1B-shaped model (random weights, bf16):
  1. batch-1 decode step time and (bytes read per step / step time) / copy bandwidth   (target >= 0.85)
  2. paged decode attention alone, context x batch x block size, as a fraction of copy bandwidth
  3. batch 64, context 2k: step time / ((weights + KV bytes) / copy bandwidth)            (target <= 1.15)
  4. tokens/s against transformers `generate`, eager and static-cache (compiled), batch 1 and 32
Usage: python -P benchmarks/decode.py [--skip-hf-static] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time

import torch
import transformers
import triton
from triton.testing import do_bench

from splitserve import LLM, SamplingParams
from splitserve.kernels.paged_decode_attention import paged_decode_attention
from splitserve.tiny_model import TinyModelSpec, make_tiny_model


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of repeats)."""
    src = torch.randn(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def weight_bytes_per_step(llm: LLM) -> int:
    """Every weight a decode step reads: all matrices and norms, plus the LM head (the embedding table
    when tied); the embedding lookup itself reads one row per token and is left out."""
    model = llm.engine.runner.model
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.lm_head is None:
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def kv_bytes(llm: LLM, num_tokens: int) -> int:
    cfg = llm.engine.model_config
    return 2 * cfg.num_layers * num_tokens * cfg.kv_size * llm.engine.dtype.itemsize


def decode_step_ms(llm: LLM, batch: int, context: int, steps: int = 60, profile: bool = False,
                   sampling: dict | None = None):  # fmt: skip
    """(ms per engine decode step, ms per graph replay) for `batch` sequences at about `context` tokens.

    Steps run back to back, in steady state: the engine overlaps each step's host work with the
    previous step's device work, so timing steps one at a time with a sync around each would measure
    something else. Step time is the median of three runs of steps // 3 steps. The replay time is the
    captured GPU work alone (no scheduling, input copies or sampling), timed while the sequences still
    run, on the last step's inputs (a replay rewrites the same K/V into the same slots). `sampling`:
    the requests' sampling parameters (greedy when None)."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    # More tokens than the run needs (sequences that finish prefill early decode while others still
    # prefill): every sequence is still running, so each timed step is a full batch. Aborted at the end.
    params = SamplingParams(max_tokens=4 * steps + 64, ignore_eos=True, **(sampling or {"temperature": 0.0}))
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
        engine.add_request(f"b{batch}-c{context}-{i}", prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()  # prefill (chunked) until every sequence decodes
    for _ in range(3):
        engine.step()  # the pipeline fills: from here on each step overlaps the previous one
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps // 3):
            engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3 / (steps // 3))
    graphs = engine.runner.graphs
    graph = graphs.graphs[graphs.bucket_for(batch)]
    replay_ms = do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    if profile:
        profile_replay(graph, batch)
    for i in range(batch):
        engine.abort_request(f"b{batch}-c{context}-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times), replay_ms


def profile_replay(graph: torch.cuda.CUDAGraph, batch: int, top: int = 14) -> None:
    """Per-kernel GPU time of one captured decode step (torch profiler over 20 replays)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    print(f"\nkernels of one batch-{batch} decode step (20 replays):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))


def time_attention(batch: int, context: int, block_size: int, shape: tuple[int, int, int]) -> float:
    """µs per paged decode attention call over random, shuffled blocks: 16 calls in one CUDA graph."""
    num_kv_heads, num_heads, head_dim = shape
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq + 1
    shape5 = (2, num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.randn(shape5, dtype=torch.bfloat16, device="cuda")  # [2, blocks, block_size, kvh, d]
    tables = torch.randperm(num_blocks - 1, device="cuda")[: batch * blocks_per_seq] + 1
    tables = tables.view(batch, blocks_per_seq).to(torch.int32)  # [batch, blocks_per_seq]
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, num_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    paged_decode_attention(q, cache, tables, lens, head_dim**-0.5, out=out)  # compile outside the timing
    graph = torch.cuda.CUDAGraph()  # as the engine runs it: back to back in a graph, one call per layer
    with torch.cuda.graph(graph):
        for _ in range(16):
            paged_decode_attention(q, cache, tables, lens, head_dim**-0.5, out=out)
    return do_bench(graph.replay, warmup=10, rep=50, return_mode="median") / 16 * 1e3


def attention_sweep(bw: float, num_kv_heads: int, num_heads: int, head_dim: int) -> list[dict]:
    rows = []
    for block_size in (16, 64):
        for context in (1024, 4096, 16384, 32768):
            for batch in (1, 8, 64):
                us = time_attention(batch, context, block_size, (num_kv_heads, num_heads, head_dim))
                moved = 2 * batch * context * num_kv_heads * head_dim * 2
                rows.append({"block": block_size, "context": context, "batch": batch, "us": us,
                             "fraction": moved / (us * 1e-6) / bw})
    return rows


class StepClock(transformers.StoppingCriteria):
    """Records when each generation step ends (after a device sync); never stops generation."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_ms_per_step(model, batch: int, static: bool, new_tokens: int = 128) -> float:
    """Median time between consecutive decode steps of transformers `generate` (prefill excluded).
    The static cache is one fixed-size `StaticCache` per run, so every run reuses one compiled forward."""
    ids = torch.randint(0, min(1000, model.config.vocab_size), (batch, 128), device="cuda")

    def run() -> list[float]:
        extra = {}
        if static:
            extra["past_key_values"] = transformers.StaticCache(config=model.config, max_cache_len=128 + 160)
        clock = StepClock()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=transformers.StoppingCriteriaList([clock]), **extra)
        return clock.times

    for _ in range(2):  # warm-up (and compilation, for the static cache)
        run()
    times = run()
    return statistics.median(b - a for a, b in itertools.pairwise(times[4:])) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-hf-static", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--fused-gemv", type=int, default=0, metavar="N",
                        help="projections of batches up to N rows on the fused GEMV kernels (engine option)")
    parser.add_argument("--profile", action="store_true", help="per-kernel times of the context-2k steps")
    parser.add_argument("--json")
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "triton": triton.__version__, "transformers": transformers.__version__}
    bw, flops = copy_bandwidth(), matmul_rate()
    results.update(copy_bandwidth_gbs=bw / 1e9, matmul_tflops=flops / 1e12)
    print(f"device {results['device']}; torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; bf16 matmul {flops / 1e12:.0f} TFLOP/s")

    tmp = tempfile.TemporaryDirectory()
    path = str(make_tiny_model(tmp.name, TinyModelSpec.llama_3_2_1b_shape()))
    llm = LLM(path, dtype="bfloat16", device="cuda", max_model_len=8192, max_num_seqs=64,
              max_num_batched_tokens=8192, fused_gemv_max_tokens=args.fused_gemv)
    cfg = llm.engine.model_config
    weights = weight_bytes_per_step(llm)
    rows = []
    for batch, context in ((1, 128), (1, 2048), (32, 128), (64, 2048)):
        profile = args.profile and context == 2048
        ms, gpu_ms = decode_step_ms(llm, batch, context, profile=profile)
        moved = weights + kv_bytes(llm, batch * context)
        floor_ms = moved / bw * 1e3
        rows.append({"batch": batch, "context": context, "ms": ms, "gpu_ms": gpu_ms, "floor_ms": floor_ms,
                     "bw_fraction": floor_ms / ms, "gpu_bw_fraction": floor_ms / gpu_ms,
                     "tokens_per_s": batch / ms * 1e3})
    results["steps"] = rows
    print("\n| batch | context | step ms | replay ms | floor ms | floor/step | floor/replay | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['ms']:.3f} | {r['gpu_ms']:.3f} | {r['floor_ms']:.3f} | "
              f"{r['bw_fraction']:.2f} | {r['gpu_bw_fraction']:.2f} | {r['tokens_per_s']:.0f} |")

    if not args.skip_attention:
        att = attention_sweep(bw, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim)
        results["attention"] = att
        print("\npaged decode attention alone (bf16, GQA 32/8, head_dim 64)")
        print("| block | context | batch | µs | fraction of copy bw |\n|---|---|---|---|---|")
        for r in att:
            print(f"| {r['block']} | {r['context']} | {r['batch']} | {r['us']:.1f} | {r['fraction']:.2f} |")

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ours = {r["batch"]: r["ms"] for r in rows if r["context"] == 128}
    print("\n| batch | splitserve ms/step | HF eager ms/step | × eager | HF static ms/step | × static |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 32):
        eager = hf_ms_per_step(hf, batch, static=False)
        static = float("nan") if args.skip_hf_static else hf_ms_per_step(hf, batch, static=True)
        results[f"hf_bs{batch}"] = {"eager_ms": eager, "static_ms": static}
        print(f"| {batch} | {ours[batch]:.3f} | {eager:.2f} | {eager / ours[batch]:.1f} | {static:.2f} | "
              f"{static / ours[batch]:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
