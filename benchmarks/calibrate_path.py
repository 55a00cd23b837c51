"""Calibrate the request path: what a request's time to first token costs beyond its worker's prefill.

`benchmarks/calibrate.py` times the engines and the wire; a user's request also crosses the SDK, the
router (tokens in, a routing decision, the prefix index) and a worker's RPC, and its first token comes
back the same way. This measures that end to end, on a cluster of plain processes
(`experiments.local_cluster`: an embedded Redis, 1 fresh prefill worker, 1 decode worker, the router):
`--requests` requests one at a time through the SDK, each a distinct 16-token prompt (nothing cached) and
2 output tokens, first routed to the prefill pool (`round_robin`), then prefilled on the decode worker
(`colocated`). A route's path cost is its median TTFT less the calibration's prefill of 16 tokens: the
file's `path` (`pool_s`, `local_s`; the simulator adds it to each request by its route); the medians are
kept under `extra.request_path`.

    python benchmarks/calibrate_path.py --model DIR --calibration FILE [--device cpu|cuda] [--requests 40]

The file is rewritten in place (written by benchmarks/calibrate.py first). On the GPU machine:
PYTHONPATH=$(benchmarks/device_path.sh) python -P benchmarks/calibrate_path.py ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from splitserve.client import Client
from splitserve.experiments.local_cluster import LocalCluster, LocalClusterSpec
from splitserve.router.cost_model import RequestPath, load_calibration

PROMPT_TOKENS = 16
ROUTES = {"pool": "round_robin", "local": "colocated"}


def time_to_first_token(client: Client, prompt: list[int]) -> float:
    started, first = time.perf_counter(), None
    for chunk in client.stream(prompt, max_tokens=2, temperature=0.0, ignore_eos=True):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the request ended without a token")
    return first  # the stream was read to its end: the next request starts on an idle cluster


def measure(cluster: LocalCluster, policy: str, prompts: list[list[int]]) -> list[float]:
    """TTFTs of `prompts` sent one at a time through a router running `policy` (after 3 unmeasured)."""
    address = cluster.start_router(["--policy", policy])
    with Client(address) as client:
        for prompt in prompts[:3]:
            time_to_first_token(client, [t + 1 for t in prompt])  # warm-up, distinct prompts
        return [time_to_first_token(client, prompt) for prompt in prompts[3:]]


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True, type=Path, help="read, and rewritten with its path")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--requests", type=int, default=40)
    args = p.parse_args(argv)
    costs = load_calibration(args.calibration)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts = [[(1000 + 7919 * (i * PROMPT_TOKENS + j)) % vocab for j in range(PROMPT_TOKENS)]
               for i in range(args.requests + 3)]  # fmt: skip
    prefill_s = costs.prefill.seconds(PROMPT_TOKENS)
    medians, paths = {}, {}
    with tempfile.TemporaryDirectory() as logs:
        spec = LocalClusterSpec(args.model, Path(logs), num_fresh=1, num_warm=0, num_decode=1,
                                worker_args=(f"--device={args.device}",))  # fmt: skip
        with LocalCluster(spec) as cluster:
            for route, policy in ROUTES.items():
                ttfts = measure(cluster, policy, prompts)
                medians[route] = statistics.median(ttfts)
                paths[route] = max(0.0, medians[route] - prefill_s)
                print(f"{route:5s} ({policy}): TTFT median {medians[route] * 1e3:.2f} ms over {len(ttfts)}, "
                      f"p90 {sorted(ttfts)[int(0.9 * len(ttfts))] * 1e3:.2f} ms; less the model's prefill "
                      f"of {PROMPT_TOKENS} tokens ({prefill_s * 1e3:.2f} ms): "
                      f"path {paths[route] * 1e3:.2f} ms")
    extra = {**costs.extra, "request_path": {"ttft_median_s": medians, "prompt_tokens": PROMPT_TOKENS,
                                             "requests": args.requests, "device": args.device}}  # fmt: skip
    path = RequestPath(pool_s=paths["pool"], local_s=paths["local"])
    replace(costs, path=path, extra=extra).save(args.calibration)
    print(f"path: pool {path.pool_s * 1e3:.2f} ms, local {path.local_s * 1e3:.2f} ms; "
          f"wrote {args.calibration}")
    return paths


if __name__ == "__main__":
    main()
