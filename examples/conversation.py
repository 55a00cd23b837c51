"""A multi-turn conversation against a running cluster: three turns through the client SDK, then three
through the OpenAI-compatible HTTP API (plain urllib, no SDK). Each turn prints where the router sent it
(pool, workers) and how much of the prompt was served from a prefix cache.

    python examples/conversation.py --address 127.0.0.1:50051 --http 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import urllib.request

from splitserve import Client

QUESTIONS = [
    "I am planning a vegetable garden on a small balcony with six hours of sun. What should I grow?",
    "Which of those grow well in containers, and how deep should the containers be?",
    "How often should I water them in midsummer?",
]


def sdk_turns(address: str, max_tokens: int) -> None:
    messages: list[dict[str, str]] = []
    with Client(address) as client:
        for i, question in enumerate(QUESTIONS, 1):
            messages.append({"role": "user", "content": question})
            out = client.generate(
                messages=messages, max_tokens=max_tokens, temperature=0.0, session_id="demo-sdk"
            )
            messages.append({"role": "assistant", "content": out.text})
            route, usage = out.route, out.usage
            print(f"SDK  turn {i}: {usage.prompt_tokens} prompt tokens, {usage.cached_tokens} cached; "
                  f"pool {route['pool']} (prefill {route['prefill_worker'] or '-'}, "
                  f"decode {route['decode_worker']}); TTFT {out.ttft_ms:.1f} ms")  # fmt: skip


def http_turns(http: str, max_tokens: int) -> None:
    messages: list[dict[str, str]] = []
    for i, question in enumerate(QUESTIONS, 1):
        messages.append({"role": "user", "content": question})
        body = {"model": "demo", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                "user": "demo-http"}  # fmt: skip
        request = urllib.request.Request(f"http://{http}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.load(response)
        messages.append(reply["choices"][0]["message"])
        usage = reply["usage"]
        print(f"HTTP turn {i}: {usage['prompt_tokens']} prompt tokens, "
              f"{usage['prompt_tokens_details']['cached_tokens']} cached")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the router's gRPC address")
    parser.add_argument("--http", default=None, help="the router's HTTP address (host:port)")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    sdk_turns(args.address, args.max_tokens)
    if args.http:
        http_turns(args.http, args.max_tokens)


if __name__ == "__main__":
    main()
