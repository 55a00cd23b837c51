"""`splitserve generate`: one completion (or chat turn) with the offline engine, printed to stdout."""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text for a prompt with the offline engine")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", required=True, help="Hugging Face-format checkpoint directory")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.llm import LLM

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    start = time.perf_counter()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    elapsed = time.perf_counter() - start
    completion = out.outputs[0]
    if args.json:
        print(json.dumps({
            "text": completion.text, "token_ids": completion.token_ids,
            "finish_reason": str(completion.finish_reason), "prompt_tokens": len(out.prompt_token_ids),
            "cached_tokens": out.num_cached_tokens, "seconds": round(elapsed, 4),
        }))
    else:
        print(completion.text)
        print(
            f"[{len(out.prompt_token_ids)} prompt tokens, {len(completion.token_ids)} generated, "
            f"finish={completion.finish_reason}, {elapsed:.3f}s]"
        )
    return 0
