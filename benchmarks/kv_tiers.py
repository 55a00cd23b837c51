"""What a prompt's leading KV costs its request, by where that KV is: recomputed, in the engine's KV memory,
loaded back from the host tier (`--cpu-kv-gb`), or fetched from another worker over gRPC (issue 12).

Engines on their loop threads, as the workers run them (real gRPC on loopback for the fetch: a holder
engine serving KVTransfer/Fetch, the receiving engine's `Fetcher`, the same code the workers use). For
each case, the time from the request's arrival to its first token, for a prompt of a `--prefix`-token
context (4k by default) plus a new 16-token turn; median of `--repeats`. The prefix's cost is that time
less the KV-memory hit's (which computes only the turn); the tier's target: a host-tier hit costs ≤ 0.2×
recomputing the prefix.
    python benchmarks/kv_tiers.py [--device cuda] [--prefix 4096] [--repeats 5]
CUDA: the Llama-3.2-1B shape in bf16 (random weights); CPU: the tiny test model in float32.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import statistics
import tempfile
import time

import grpc
import torch

from splitserve import LLM, SamplingParams
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.fetch import Fetched, Fetcher, FetchServer
from splitserve.kvtransfer.stream import kv_layout
from splitserve.kvtransfer.transport import add_kvtransfer_servicer, channel, make_server
from splitserve.protos import workers_pb2
from splitserve.tiny_model import TinyModelSpec, make_tiny_model

TURN = 16
GREEDY = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
_ids = itertools.count()


def first_token_s(loop: EngineLoop, prompt: list[int], fetcher: Fetcher | None = None,
                  holder: workers_pb2.KVHolder | None = None) -> tuple[float, Fetched]:  # fmt: skip
    """Seconds from arrival to the first token (after the fetch from `holder`, when given)."""
    rid = f"r{next(_ids)}"
    outputs = loop.listen(rid)
    start = time.perf_counter()
    fetched = Fetched(None)
    if fetcher is not None and holder is not None:
        request = workers_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, kv_holder=holder)
        fetched = fetcher.fetch(request)

    def add() -> None:
        tokens = fetcher.fill(fetched) if fetcher is not None else 0
        loop.engine.add_request(rid, prompt, GREEDY, fetched_tokens=tokens)

    loop.call(add)
    while not outputs.get().finished:
        pass
    elapsed = time.perf_counter() - start
    loop.forget(rid)
    return elapsed, fetched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default, choices=("cpu", "cuda"))
    p.add_argument("--prefix", type=int, default=4096)
    p.add_argument("--shape", default="1b", choices=("1b", "8b"), help="CUDA: Llama-3.2-1B or -3.1-8B shape")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    cuda = args.device == "cuda"
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    print(f"{name} ({args.shape if cuda else 'tiny'} shape); torch {torch.__version__}, grpcio "
          f"{grpc.__version__}, python {platform.python_version()}")
    tmp = tempfile.TemporaryDirectory()
    context = 4 * args.prefix
    eight_b = {"hidden_size": 4096, "intermediate_size": 14336, "num_layers": 32, "head_dim": 128,
               "tie_word_embeddings": False} if args.shape == "8b" else {}  # fmt: skip
    spec = (TinyModelSpec.llama_3_2_1b_shape(max_position_embeddings=context, **eight_b) if cuda
            else TinyModelSpec(max_position_embeddings=context))  # fmt: skip
    path = str(make_tiny_model(f"{tmp.name}/m", spec))
    dtype = "bfloat16" if cuda else "float32"
    bs, n = 16, args.prefix
    blocks = n // bs + 16  # room for one prompt: two fillers evict the prefix

    def engine(**kw):
        return LLM(path, dtype=dtype, device=args.device, block_size=bs, num_blocks=blocks,
                   max_model_len=2 * n + 256, max_num_batched_tokens=2 * n + 256, **kw).engine  # fmt: skip

    rng = random.Random(0)
    vocab = spec.vocab_size or 512

    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    holder_loop = EngineLoop(engine())
    layout = kv_layout(holder_loop.engine.kv_caches, holder_loop.engine.model_id)
    token_bytes = layout.num_layers * 2 * layout.num_kv_heads * layout.head_dim * (2 if cuda else 4)
    tier_loop = EngineLoop(engine(host_kv_gib=4 * (n + 2 * TURN) * token_bytes / 2**30))  # 4 prompts' KV
    receiver_loop = EngineLoop(engine())
    server, port = make_server("127.0.0.1:0")

    add_kvtransfer_servicer(FetchServer(holder_loop, layout), server)  # KVTransfer/Fetch alone
    server.start()
    channels: dict[str, grpc.Channel] = {}
    fetcher = Fetcher(receiver_loop, layout, lambda a: channels.setdefault(a, channel(a)), None)
    holder = workers_pb2.KVHolder(address=f"127.0.0.1:{port}", num_blocks=n // bs)

    cases = ("recompute", "KV memory hit", "host tier", "fetch (gRPC)")
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(args.repeats + 1):  # the first round warms up (kernels, channels): not counted
        prefix = tokens(n)
        for loop in (holder_loop, tier_loop, receiver_loop):
            loop.call(loop.engine.block_pool.reset_cache)
        t_cold, _ = first_token_s(holder_loop, [*prefix, *tokens(TURN)])  # holder now holds the prefix
        t_mem, _ = first_token_s(holder_loop, [*prefix, *tokens(TURN)])
        first_token_s(tier_loop, [*prefix, *tokens(TURN)])
        for _ in range(2):  # fillers evict the prefix into the host tier
            first_token_s(tier_loop, tokens(n + TURN))
        t_host, _ = first_token_s(tier_loop, [*prefix, *tokens(TURN)])
        t_fetch, fetched = first_token_s(receiver_loop, [*prefix, *tokens(TURN)], fetcher, holder)
        assert fetched.num_blocks == n // bs, f"fetched {fetched.num_blocks} blocks ({fetched.fallback})"
        if i:
            for key, value in zip(times, (t_cold, t_mem, t_host, t_fetch), strict=True):
                times[key].append(value)
    stats = tier_loop.call(lambda: tier_loop.engine.scheduler.prefix_stats)
    assert stats.host_hit_tokens >= args.repeats * (n // bs) * bs, "the host tier did not serve the prefix"
    med = {k: statistics.median(v) for k, v in times.items()}
    base, cold = med["KV memory hit"], med["recompute"] - med["KV memory hit"]
    print(f"\n{n}-token prefix + {TURN}-token turn, {layout.num_layers} layers, KV "
          f"{n * token_bytes / 1e6:.1f} MB; median of {args.repeats}\n")
    print("| prefix KV from | first token ms | prefix cost ms | × recompute |")
    print("|---|---|---|---|")
    for key, t in med.items():
        cost = t - base
        print(f"| {key} | {t * 1e3:.2f} | {cost * 1e3:.2f} | {cost / cold:.3f} |")
    server.stop(0).wait()
    for ch in channels.values():
        ch.close()
    for loop in (holder_loop, tier_loop, receiver_loop):
        loop.stop()


if __name__ == "__main__":
    main()
