"""Offline engine vs Hugging Face transformers `generate` (eager) on the same checkpoint, same run.

Prints the machine, versions, and generated tokens/s of both at batch 1 and batch 16 (greedy, fixed
output length, end to end including prefill), and their ratio. Usage:
    python benchmarks/engine_cpu.py [--model DIR] [--prompt-len 64] [--new-tokens 64] [--json OUT]
Without --model it makes a small random Llama checkpoint (hidden 256, 4 layers) in a temp dir;
`--shape llama-3.2-1b --device cuda --dtype bfloat16` runs the same comparison on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time

import torch
import transformers

from splitserve import LLM, SamplingParams
from splitserve.tiny_model import TinyModelSpec, make_tiny_model


def hf_tokens_per_s(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device=model.device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False,
    )
    with torch.no_grad():
        model.generate(ids[:, :8], **{**kwargs, "attention_mask": torch.ones_like(ids[:, :8])})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / elapsed


def engine_tokens_per_s(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p[:8]} for p in prompts], params)  # warm-up
    # Fresh token ids so the prefix cache does not serve the timed prompts.
    prompts = [[(t + 1) % llm.engine.model_config.vocab_size for t in p] for p in prompts]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a small random Llama)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", default="small", choices=["small", "llama-3.2-1b"])
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.shape == "small":
        spec = TinyModelSpec(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                             num_kv_heads=2, tokenizer_vocab_size=1024)
    else:
        spec = TinyModelSpec.llama_3_2_1b_shape(dtype=args.dtype)
    path = args.model or str(make_tiny_model(tmp.name, spec))
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads")
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    dtype = getattr(torch, args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    llm = LLM(path, dtype=args.dtype, device=args.device, max_model_len=4096)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
        hf_tps = hf_tokens_per_s(hf, prompts, args.new_tokens)
        ours = engine_tokens_per_s(llm, prompts, args.new_tokens)
        rows.append({"batch": batch, "hf_tokens_per_s": round(hf_tps, 1),
                     "engine_tokens_per_s": round(ours, 1), "ratio": round(ours / hf_tps, 2)})
    shape = f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens"
    print(f"\n{shape}, greedy, {args.dtype}, {args.device}")
    print("| batch | HF generate tok/s | splitserve tok/s | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['hf_tokens_per_s']} | {r['engine_tokens_per_s']} | {r['ratio']}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__, "transformers": transformers.__version__}, f)


if __name__ == "__main__":
    main()
