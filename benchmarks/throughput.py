"""Throughput, like `vllm bench throughput`: N prompts of random tokens at once, fixed or sampled
input/output lengths, greedy and sampled, through the offline API (`LLM.generate`) and through a decode
worker process (every prompt a `DecodeWorker/Generate` stream over gRPC, prefilled there); prints
requests/s, output and total tokens/s.

A Llama-3.2-1B-shape checkpoint (random weights, bf16) on CUDA, the tiny model on CPU, or `--model DIR`.
Every request generates exactly its output length (`ignore_eos`). Each path first runs one unmeasured
full batch of the prompts (16 tokens each) per mode, so that compilation and graph capture are not timed.
    python -P benchmarks/throughput.py [--num-prompts 512] [--input-len 512] [--output-len 256]
        [--range-ratio 0.0] [--modes greedy,sampled] [--via offline,worker] [--max-num-seqs 256]
        [--device cuda|cpu] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from splitserve import LLM, SamplingParams
from splitserve.cluster.supervisor import parse_announcement
from splitserve.engine.model_config import ModelConfig
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.transport import GRPC_OPTIONS
from splitserve.protos import workers_pb2, workers_pb2_grpc
from splitserve.tiny_model import TinyModelSpec, make_tiny_model

MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "top_p": 0.9}}


def lengths(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    """`n` lengths uniform in [mean × (1 - ratio), mean × (1 + ratio)] (all `mean` for ratio 0)."""
    low, high = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


class Offline:
    """The offline API in this process."""

    def __init__(self, model: str, device: str, dtype: str, max_num_seqs: int, num_blocks: int) -> None:
        self.llm = LLM(model, device=device, dtype=dtype, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=8192)  # fmt: skip

    def run(self, prompts: list[list[int]], outs: list[int], mode: dict) -> dict:
        params = [SamplingParams(max_tokens=n, ignore_eos=True, seed=i, **mode) for i, n in enumerate(outs)]
        start = time.perf_counter()
        results = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        seconds = time.perf_counter() - start
        return rates(prompts, sum(len(r.outputs[0].token_ids) for r in results), sum(outs), seconds)

    def close(self) -> None:
        del self.llm  # its KV cache and graphs, before a worker process takes the device
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Worker:
    """A decode worker process serving the checkpoint on a free port, and async streams to it."""

    def __init__(self, model: str, device: str, dtype: str, max_num_seqs: int, num_blocks: int) -> None:
        python = [sys.executable, "-P"] if sys.flags.safe_path else [sys.executable]  # as this one runs
        cmd = [*python, "-m", "splitserve.decode_worker", "--model", model, "--port", "0",
               "--device", device, "--dtype", dtype, "--max-num-seqs", str(max_num_seqs),
               "--num-blocks", str(num_blocks)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            announced = parse_announcement(line)
            if announced is not None:
                self.address = announced[0]
                break
        else:
            raise RuntimeError(f"the decode worker exited with {self.proc.wait()} before serving")
        self._runs = 0

    def run(self, prompts: list[list[int]], outs: list[int], mode: dict) -> dict:
        return asyncio.run(self._run(prompts, outs, mode))

    async def _run(self, prompts, outs, mode) -> dict:
        self._runs += 1
        async with grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS) as channel:
            stub = workers_pb2_grpc.DecodeWorkerStub(channel)

            async def one(i: int) -> int:
                params = SamplingParams(max_tokens=outs[i], ignore_eos=True, seed=i, **mode)
                request = workers_pb2.GenerateRequest(request_id=f"run{self._runs}-{i}",
                                                      prompt_token_ids=prompts[i],
                                                      sampling=sampling_to_proto(params))  # fmt: skip
                return sum([len(chunk.token_ids) async for chunk in stub.Generate(request)])

            start = time.perf_counter()
            generated = sum(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
            seconds = time.perf_counter() - start
        return rates(prompts, generated, sum(outs), seconds)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def rates(prompts: list[list[int]], generated: int, expected: int, seconds: float) -> dict:
    assert generated == expected, (generated, expected)
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
    p.add_argument("--via", default="offline,worker", help="offline (LLM.generate), worker (a decode worker)")
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
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            max_len = max(ins) + max(outs) + 16
            spec = (TinyModelSpec.llama_3_2_1b_shape(max_position_embeddings=max_len) if cuda
                    else TinyModelSpec(arch="llama", max_position_embeddings=max_len))  # fmt: skip
            model = str(make_tiny_model(Path(tmp) / "model", spec))
        blocks = args.max_num_seqs * ((max(ins) + max(outs)) // 16 + 2) + 64
        dtype = "bfloat16" if cuda else "float32"
        name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
        which = model if args.model else ("1B shape" if cuda else "tiny")
        print(f"{name}; torch {torch.__version__}; {which}; "
              f"{args.num_prompts} prompts, in {args.input_len} / out {args.output_len} "
              f"(range ratio {args.range_ratio}), max_num_seqs {args.max_num_seqs}")  # fmt: skip
        print("| via | mode | seconds | requests/s | output tokens/s | total tokens/s |")
        print("|---|---|---|---|---|---|")
        modes = args.modes.split(",")
        vocab = ModelConfig.from_pretrained(model).vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in ins]
        for via in args.via.split(","):
            path = (Offline if via == "offline" else Worker)(
                model, args.device, dtype, args.max_num_seqs, blocks
            )
            try:
                # Warm-up, unmeasured: a full batch of the prompts per mode, so that the allocator, the
                # kernels of every prefill shape and the CUDA graphs of every batch size are ready.
                warm = min(len(prompts), args.max_num_seqs)
                for mode in modes:
                    path.run(prompts[:warm], [16] * warm, MODES[mode])
                for mode in modes:
                    r = rows[f"{via}/{mode}"] = path.run(prompts, outs, MODES[mode])
                    print(f"| {via} | {mode} | {r['seconds']:.2f} | {r['requests_per_s']:.1f} | "
                          f"{r['output_tokens_per_s']:,.0f} | {r['total_tokens_per_s']:,.0f} |",
                          flush=True)  # fmt: skip
            finally:
                path.close()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
