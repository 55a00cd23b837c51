"""Offline throughput, like `vllm bench throughput`: N prompts of random tokens through `LLM.generate`
at once, fixed or sampled input/output lengths, greedy and sampled; prints requests/s, output and total
tokens/s.

A Llama-3.2-1B-shape checkpoint (random weights, bf16) on CUDA, the tiny model on CPU, or `--model DIR`.
Every request generates exactly its output length (`ignore_eos`). One unmeasured pass of 8 prompts first.
    python -P benchmarks/throughput.py [--num-prompts 512] [--input-len 512] [--output-len 256]
        [--range-ratio 0.0] [--modes greedy,sampled] [--max-num-seqs 256] [--device cuda|cpu] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from splitserve import LLM, SamplingParams
from splitserve.tiny_model import TinyModelSpec, make_tiny_model

MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "top_p": 0.9}}


def lengths(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    """`n` lengths uniform in [mean × (1 - ratio), mean × (1 + ratio)] (all `mean` for ratio 0)."""
    low, high = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def run(llm: LLM, prompts: list[list[int]], outs: list[int], mode: dict) -> dict:
    params = [SamplingParams(max_tokens=n, ignore_eos=True, seed=i, **mode) for i, n in enumerate(outs)]
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    seconds = time.perf_counter() - start
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    assert generated == sum(outs), (generated, sum(outs))
    total = generated + sum(len(p) for p in prompts)
    return {"seconds": seconds, "requests_per_s": len(prompts) / seconds,
            "output_tokens_per_s": generated / seconds, "total_tokens_per_s": total / seconds}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--modes", default="greedy,sampled")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu")
    )
    p.add_argument("--model")
    p.add_argument("--json")
    args = p.parse_args()
    cuda = args.device == "cuda"
    rng = random.Random(0)
    ins = lengths(rng, args.num_prompts, args.input_len, args.range_ratio)
    outs = lengths(rng, args.num_prompts, args.output_len, args.range_ratio)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            max_len = max(ins) + max(outs) + 16
            spec = (TinyModelSpec.llama_3_2_1b_shape(max_position_embeddings=max_len) if cuda
                    else TinyModelSpec(arch="llama", max_position_embeddings=max_len))  # fmt: skip
            model = str(make_tiny_model(Path(tmp) / "model", spec))
        blocks = args.max_num_seqs * ((max(ins) + max(outs)) // 16 + 2) + 64
        llm = LLM(model, device=args.device, dtype="bfloat16" if cuda else "float32", num_blocks=blocks,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192)  # fmt: skip
        vocab = llm.engine.model_config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in ins]
        # Warm-up, unmeasured: a full batch of the prompts, so the allocator, the kernels of every prefill
        # shape and the CUDA graphs of every batch size it meets are ready before the clock starts.
        warm = min(len(prompts), args.max_num_seqs)
        for mode in args.modes.split(","):
            run(llm, prompts[:warm], [16] * warm, MODES[mode])
        name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
        which = model if args.model else ("1B shape" if cuda else "tiny")
        print(f"{name}; torch {torch.__version__}; {which}; "
              f"{args.num_prompts} prompts, in {args.input_len} / out {args.output_len} "
              f"(range ratio {args.range_ratio}), max_num_seqs {args.max_num_seqs}")  # fmt: skip
        rows = {}
        print("| mode | seconds | requests/s | output tokens/s | total tokens/s |\n|---|---|---|---|---|")
        for mode in args.modes.split(","):
            r = rows[mode] = run(llm, prompts, outs, MODES[mode])
            print(f"| {mode} | {r['seconds']:.2f} | {r['requests_per_s']:.1f} | "
                  f"{r['output_tokens_per_s']:,.0f} | {r['total_tokens_per_s']:,.0f} |",
                  flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
