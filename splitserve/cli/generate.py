"""`splitserve generate`: one completion (or chat turn), printed to stdout: from a running cluster's router
(`--address`, or the cluster `splitserve up` started) or, with `--model`, from the offline engine."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from splitserve.cluster.state import ClusterState, default_state_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text for a prompt (cluster or offline engine)")
    p.add_argument("prompt", help="the prompt text")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--address", default=None, help="a router's gRPC address HOST:PORT")
    where.add_argument("--model", default=None, help="run the offline engine on this checkpoint directory")
    p.add_argument("--state-file", type=Path, default=default_state_file(),
                   help="with neither --address nor --model: the cluster started by `splitserve up`")
    p.add_argument("--session-id", default=None, help="a conversation's id (its A/B arm and cache affinity)")
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
    if args.model is None:
        return _remote(args, args.address or ClusterState.load(args.state_file).router_address)
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


def _remote(args: argparse.Namespace, address: str) -> int:
    from splitserve.client import Client

    chat = [{"role": "user", "content": args.prompt}]
    prompt = {"messages": chat} if args.chat else {"prompt": args.prompt}
    with Client(address) as client:
        out = client.generate(
            **prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
            session_id=args.session_id,
        )  # fmt: skip
    route = out.route
    if args.json:
        print(json.dumps({
            "text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
            "prompt_tokens": out.usage.prompt_tokens, "cached_tokens": out.usage.cached_tokens,
            "ttft_ms": out.ttft_ms, "total_ms": round(out.total_ms, 2), "route": route,
        }))
    else:
        print(out.text)
        print(f"[{out.usage.prompt_tokens} prompt tokens ({out.usage.cached_tokens} cached), "
              f"{out.usage.completion_tokens} generated, finish={out.finish_reason}, "
              f"pool {route.get('pool')}, "
              f"TTFT {out.ttft_ms:.1f} ms, total {out.total_ms:.1f} ms]")  # fmt: skip
    return 0
