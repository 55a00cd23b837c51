"""Decode-step sweep: `Engine.step()` time by batch and context, greedy against sampled, each row against
the bytes/bandwidth floor (every weight once + the batch's KV, over the device's measured copy bandwidth),
the sampler alone on the batch's logits, and (CUDA) how long per step the host waited for the device: near
0 means the host's work per step, not the device, sets the step time.

A Llama-3.2-1B-shape checkpoint (random weights, bf16) on CUDA, or the tiny model on CPU (`--device cpu`,
where the floor column is left out: a CPU step is not bandwidth-bound). Steps run back to back in steady
state (the engine overlaps each step's host work with the previous step's device work); a row is the
median of three runs of `--steps` // 3 steps.
    python -P benchmarks/step_sweep.py [--device cuda|cpu] [--batches 1,64,128,256] [--contexts 600,2048]
                                       [--shape 1b|8b] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import copy_bandwidth, kv_bytes, matmul_rate, weight_bytes_per_step

from splitserve import LLM, SamplingParams
from splitserve.engine.sampler import Sampler, SampleRow
from splitserve.tiny_model import TinyModelSpec, make_tiny_model

MODES = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 0.8, "top_p": 0.9},  # the target configuration
    "penalized": {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1},
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(llm: LLM, batch: int, context: int, sampling: dict, steps: int, device: str) -> float:
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=4 * steps + 64, ignore_eos=True, **sampling)
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    ids = [f"s{batch}-{context}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, torch.randint(0, vocab, (context,), generator=gen).tolist(), params)
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    times, waits = [], []
    for _ in range(3):
        sync(device)
        waited.clear()
        start = time.perf_counter()
        for _ in range(steps // 3):
            engine.step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3 / (steps // 3))
        waits.append(sum(waited) * 1e3 / (steps // 3))
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times), statistics.median(waits)


waited: list[float] = []  # seconds the host spent waiting for a step's tokens (CUDA)


def _timed_synchronize(synchronize):
    def wrapper(event):
        start = time.perf_counter()
        synchronize(event)
        waited.append(time.perf_counter() - start)

    return wrapper


if torch.cuda.is_available():
    torch.cuda.Event.synchronize = _timed_synchronize(torch.cuda.Event.synchronize)


def prefill(llm: LLM, num_prompts: int, length: int, device: str, profile: bool = False) -> dict:
    """Prompts of `length` random tokens, `num_prompts` at once, prefilled to their first token (median of
    three rounds, new tokens each so nothing is a prefix hit); rate against the decoder layers' linear
    FLOPs (2 × their weights per token; the LM head runs on one token a prompt and is left out)."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    layers = engine.runner.model.layers
    flops_per_token = 2 * sum(p.numel() for n, p in layers.named_parameters() if p.dim() == 2)
    gen = torch.Generator().manual_seed(length)
    seconds = []
    for round_ in range(4):  # the first warms up (kernels of every chunk shape)
        prompts = [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(num_prompts)]
        params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"prefill-{round_}-{i}", prompt, params)
        sync(device)
        start = time.perf_counter()
        with torch.profiler.profile() if profile and round_ == 3 else contextlib.nullcontext() as prof:
            while engine.has_unfinished_requests():
                engine.step()
            sync(device)
        seconds.append(time.perf_counter() - start)
    if profile:
        print(prof.key_averages().table(sort_by="self_device_time_total" if device == "cuda" else
                                        "self_cpu_time_total", row_limit=15))  # fmt: skip
    median = statistics.median(seconds[1:])
    tokens_per_s = num_prompts * length / median
    return {"prompts": num_prompts, "length": length, "seconds": median, "tokens_per_s": tokens_per_s,
            "linear_tflops": tokens_per_s * flops_per_token / 1e12}  # fmt: skip


def sampler_ms(vocab: int, batch: int, sampling: dict, device: str, repeats: int = 20) -> float:
    """The sampler alone on random bf16 logits of the batch (tokens written on the device)."""
    logits = torch.randn(batch, vocab, device=device).to(torch.bfloat16)
    params = SamplingParams(**sampling)
    rows = [SampleRow(params, i, 100, [1, 2, 3], [4, 5]) for i in range(batch)]
    sampler = Sampler(torch.device(device))
    for _ in range(3):
        sampler(logits, rows)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        sampler(logits, rows)
    sync(device)
    return (time.perf_counter() - start) * 1e3 / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu")
    )
    p.add_argument("--shape", default="1b", choices=("1b", "8b"), help="CUDA: Llama-3.2-1B or -3.1-8B shape")
    p.add_argument("--batches", default="1,64,128,256")
    p.add_argument("--contexts", default="600,2048")
    p.add_argument("--modes", default="greedy,sampled,penalized")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--model", help="a checkpoint instead of one made here")
    p.add_argument("--prefill", metavar="NxL", help="also time prefilling N prompts of L tokens (16x2048)")
    p.add_argument("--profile", action="store_true", help="per-kernel times of one prefill round")
    p.add_argument("--json")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    modes = args.modes.split(",")
    cuda = args.device == "cuda"
    extra = {}
    n_prefill, prefill_len = (int(x) for x in args.prefill.lower().split("x")) if args.prefill else (0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        max_len = max(*contexts, prefill_len) + 4 * args.steps + 128
        eight_b = {"hidden_size": 4096, "intermediate_size": 14336, "num_layers": 32, "head_dim": 128,
                   "tie_word_embeddings": False} if args.shape == "8b" else {}  # fmt: skip
        path = args.model
        if path is None:  # llama3 rope scaling wants at least its original 8192 positions
            spec = (TinyModelSpec.llama_3_2_1b_shape(max_position_embeddings=max(max_len, 8192), **eight_b)
                    if cuda else TinyModelSpec(arch="llama", max_position_embeddings=max_len))  # fmt: skip
            path = make_tiny_model(Path(tmp) / "model", spec)
        num_blocks = max(batches) * (max(contexts) + 4 * args.steps + 80) // 16 + 64
        num_blocks = max(num_blocks, n_prefill * (prefill_len // 16 + 2) + 64)
        llm = LLM(str(path), device=args.device, dtype="bfloat16" if cuda else "float32",
                  num_blocks=num_blocks, max_num_seqs=max(batches), max_num_batched_tokens=8192)  # fmt: skip
        bw = copy_bandwidth() if cuda else None
        weights = weight_bytes_per_step(llm)
        vocab = llm.engine.model_config.vocab_size
        name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
        print(f"{name}; torch {torch.__version__}; {args.shape if cuda else 'tiny llama'}, vocab {vocab}"
              + (f"; copy bandwidth {bw / 1e12:.2f} TB/s" if bw else ""))  # fmt: skip
        rows = []
        for context in contexts:
            for batch in batches:
                row = {"batch": batch, "context": context}
                for mode in modes:
                    row[f"{mode}_ms"], row[f"{mode}_wait_ms"] = step_ms(
                        llm, batch, context, MODES[mode], args.steps, args.device
                    )
                    row[f"{mode}_sampler_ms"] = sampler_ms(vocab, batch, MODES[mode], args.device)
                if bw:
                    row["floor_ms"] = (weights + kv_bytes(llm, batch * context)) / bw * 1e3
                rows.append(row)
                print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        if args.prefill:
            pre = prefill(llm, n_prefill, prefill_len, args.device, args.profile)
            line = f"\nprefill {n_prefill} x {prefill_len}: {pre['tokens_per_s']:,.0f} tokens/s, " \
                   f"linear layers {pre['linear_tflops']:.0f} TFLOP/s"  # fmt: skip
            if cuda:
                pre["matmul_tflops"] = matmul_rate() / 1e12
                line += f" = {pre['linear_tflops'] / pre['matmul_tflops']:.2f} of the matmul rate " \
                        f"({pre['matmul_tflops']:.0f} TFLOP/s, 8192³ bf16)"  # fmt: skip
            print(line)
            extra["prefill"] = pre
    head = "| batch | context | " + " | ".join(f"{m} ms" for m in modes) + " | sampled / greedy |"
    head += " floor ms | floor / sampled |" if cuda else ""
    head += " " + " | ".join(f"sampler alone, {m} ms" for m in modes) + " |"
    head += " " + " | ".join(f"{m}: host waits ms" for m in modes) + " |" if cuda else ""
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [str(r["batch"]), str(r["context"]), *(f"{r[f'{m}_ms']:.2f}" for m in modes)]
        cells.append(
            f"{r['sampled_ms'] / r['greedy_ms']:.2f}" if "sampled" in modes and "greedy" in modes else "-"
        )
        if cuda:
            cells += [f"{r['floor_ms']:.2f}", f"{r['floor_ms'] / r.get('sampled_ms', r['greedy_ms']):.2f}"]
        cells += [f"{r[f'{m}_sampler_ms']:.3f}" for m in modes]
        cells += [f"{r[f'{m}_wait_ms']:.2f}" for m in modes] if cuda else []
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": rows, **extra}, indent=1))


if __name__ == "__main__":
    main()
