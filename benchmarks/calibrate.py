"""Calibrate the cost model on this machine: fit its formulas to measurements of our engine and KV wire.

Writes the calibration file of `router/cost_model.py`, the numbers the `cpd` policy and the simulator
predict with.

What it measures on one checkpoint (`--model`), every figure a median over repeats after a warm-up, the
engines driven on their loop threads as the workers drive them (on CPU measurably slower than from the
main thread):
  1. prefill: a request through the engine a prefill worker runs (add_request with max_tokens=1, steps
     until its first token; the worker's scheduler defaults, so a prompt past 2048 tokens is chunked),
     over a grid of (new tokens, cached tokens); a cached prefix is served by the prefix cache after one
     request that computed it. Then the per-request overhead of the worker's `Prefill` RPC on an
     in-process prefill worker over real gRPC: (RPC time to the reply) − (engine-only time) for a small
     prompt, interleaved pairs, clamped at 0, added to `prefill.fixed_s`;
  2. decode: `Engine.step()` in steady state (greedy, ignore_eos, steps back to back as served) over a
     grid of (batch, context); the context each step reads is counted from the running sequences;
  3. transfer, per transport ("grpc", "same-host"): what pushing a prompt's KV to a decode worker (a
     `python -m splitserve.decode_worker` process, started by benchmarks/kv_transfer.py's helper) adds to
     that prefill worker's request: time to the `Prefill` RPC's last reply (KV delivered) minus time to
     the reply for a prompt of the same length with no decode target, interleaved pairs, over several
     prompt lengths. Layer-wise streaming hides part of the wire behind the prefill, so this is what a
     request pays for its transfer, not the raw wire rate (that is benchmarks/kv_transfer.py's);
  4. host-tier load: a prompt's blocks saved to a host tier (`HostKVTier`) over the prefill engine's caches
     and loaded back into them, as a prefix hit from the tier does: bytes / the median time.
Each formula is then fitted by least squares on relative residuals (a 0.5 ms point weighs as much as a
50 ms one) with non-negative coefficients; every point is printed beside its prediction, and the JSON is
written with its provenance (device, versions, model shape, fit errors, the raw points). The grids: GRIDS
("cuda" adds longer prompts and contexts and batches to 256; `--quick` is a few seconds on a 2-core CPU
with the tiny model, the CPU grid under a minute).

CPU figures are noisy: on a small shared machine (2 cores) other work moves single points by tens of
percent, and the transfer figures are differences of two such times. Medians damp that; the printed fit
errors say how well the formulas held. Usage:
    python benchmarks/calibrate.py --model DIR [--device cpu|cuda] [--dtype auto] [--out calibration.json]
        [--quick]
On the GPU machine: PYTHONPATH=$(benchmarks/device_path.sh) python -P benchmarks/calibrate.py ...
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

import grpc
import numpy as np
import torch

from splitserve.engine.engine import Engine
from splitserve.engine.host_tier import HostKVTier
from splitserve.engine.kv_cache_manager import cdiv
from splitserve.engine.loop import EngineLoop
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.model_runner import kv_block_bytes, resolve_device, resolve_dtype
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.kvtransfer.transport import channel, make_server, tune_malloc_for_transfers
from splitserve.llm import build_engine_config
from splitserve.prefill_worker.service import PrefillService
from splitserve.protos import kvtransfer_pb2, kvtransfer_pb2_grpc, workers_pb2, workers_pb2_grpc
from splitserve.router.cost_model import CostModel, DecodeCost, PrefillCost, TransferCost

sys.path.append(str(Path(__file__).resolve().parent))  # benchmarks/ is no package, and -P leaves it off
from kv_transfer import start_decode_worker, stop_worker

BLOCK_SIZE = 16  # the workers' default, so the decode worker process's KV layout matches
SETUP_BUDGET = 8192  # the decode benchmark's engine fills its batches faster; decode steps are unaffected
DECODE_WINDOWS = 5  # timed windows per decode point; their median counts
GREEDY_ONE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
TRANSPORTS = {"grpc": "grpc", "same-host": "auto"}  # cost-model transport -> the prefill service's option
A, B = TypeVar("A"), TypeVar("B")


@dataclasses.dataclass(frozen=True)
class Grid:
    prefill_new: tuple[int, ...]
    prefill_cached: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    transfer_tokens: tuple[int, ...]  # prompt lengths whose KV is pushed
    repeats: int  # timed prefills per point, after one warm-up
    decode_steps: int  # steps per timed window (DECODE_WINDOWS windows per point, after one warm-up)
    pairs: int  # interleaved pairs per difference (RPC vs engine alone, with vs without a transfer)


GRIDS = {
    "quick": Grid(prefill_new=(16, 256, 1024), prefill_cached=(0, 512), decode_batches=(1, 4, 16),
                  decode_contexts=(128, 1024), transfer_tokens=(128, 512, 1024), repeats=5, decode_steps=16,
                  pairs=10),
    "cpu": Grid(prefill_new=(16, 64, 256, 1024), prefill_cached=(0, 512), decode_batches=(1, 4, 16, 64),
                decode_contexts=(128, 1024), transfer_tokens=(128, 512, 1024, 1536), repeats=7,
                decode_steps=20, pairs=24),
    "cuda": Grid(prefill_new=(16, 64, 256, 1024, 4096), prefill_cached=(0, 512, 2048),
                 decode_batches=(1, 4, 16, 64, 128, 256), decode_contexts=(128, 1024, 4096),
                 transfer_tokens=(256, 1024, 4096), repeats=5, decode_steps=20, pairs=20),
}  # fmt: skip


class Point(NamedTuple):
    """One measured point. `inputs` are the cost formula's arguments: (num_new, num_cached) for "prefill",
    (num_seqs, num_ctx_tokens) for "decode", (num_bytes,) for "transfer" over `transport`."""

    part: Literal["prefill", "decode", "transfer"]
    label: str
    inputs: dict[str, int]
    seconds: float
    transport: str = ""


def fit_nonnegative(
    rows: Sequence[Sequence[float]], y: Sequence[float], scale: Sequence[float] | None = None
) -> tuple[float, ...]:
    """Coefficients c >= 0 minimising sum(((rows @ c - y) / scale) ** 2); `scale` defaults to y (relative
    residuals) and must be positive. A coefficient that would fit negative is held at 0 and the rest
    refitted: every support of the (two or three) columns is tried and the best fit whose coefficients
    are all >= 0 wins, which makes that exact (non-negative least squares). Raises ValueError."""
    a, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    s = b if scale is None else np.asarray(scale, dtype=float)
    if a.ndim != 2 or len(a) != len(b) or len(s) != len(b) or not np.all(s > 0):
        raise ValueError("need one row per measurement and a positive scale for each")
    a, b = a / s[:, None], b / s
    norms = np.abs(a).max(axis=0)  # columns of 1 and of ~1e6 token products: solve on a common scale
    norms[norms == 0] = 1.0
    a = a / norms
    num_cols = a.shape[1]
    best, best_cost = np.zeros(num_cols), float(b @ b)
    for k in range(1, num_cols + 1):
        for support in itertools.combinations(range(num_cols), k):
            sol = np.linalg.lstsq(a[:, support], b, rcond=None)[0]
            if np.any(sol < 0):
                continue
            coef = np.zeros(num_cols)
            coef[list(support)] = sol
            residual = a @ coef - b
            if float(residual @ residual) < best_cost:
                best, best_cost = coef, float(residual @ residual)
    return tuple(float(c) for c in best / norms)


def fit_prefill(points: list[Point]) -> PrefillCost:
    shapes = [(p.inputs["num_new"], p.inputs["num_cached"]) for p in points]
    rows = [[1.0, new, new * (cached + new / 2)] for new, cached in shapes]
    return PrefillCost(*fit_nonnegative(rows, [p.seconds for p in points]))


def fit_decode(points: list[Point]) -> DecodeCost:
    rows = [[1.0, p.inputs["num_seqs"], p.inputs["num_ctx_tokens"]] for p in points]
    return DecodeCost(*fit_nonnegative(rows, [p.seconds for p in points]))


def fit_transfer(points: list[Point]) -> tuple[TransferCost, bool]:
    """(cost, whether the rate was resolved). A difference of two times may come out near 0, so residuals
    are relative to at least 1% of the largest point. When the sizes measured are too small for their
    bytes to show through the noise (the slope fits 0), the rate written is the slowest one that noise
    could hide: the largest transfer's bytes in the latency fit's RMS residual (at least 1 µs)."""
    x, y = [p.inputs["num_bytes"] for p in points], [max(p.seconds, 0.0) for p in points]
    scale = [max(v, 0.01 * max(y), 1e-9) for v in y]
    latency, per_byte = fit_nonnegative([[1.0, b] for b in x], y, scale)
    if per_byte > 0:
        return TransferCost(latency, 1.0 / per_byte), True
    noise = max(statistics.fmean((v - latency) ** 2 for v in y) ** 0.5, 1e-6)
    return TransferCost(latency, max(x) / noise), False


def predict(model: CostModel, p: Point) -> float:
    if p.part == "prefill":
        return model.prefill.seconds(**p.inputs)
    if p.part == "decode":
        return model.decode.step_seconds(**p.inputs)
    return model.transfer(p.transport).seconds(**p.inputs)


def fit_errors(model: CostModel, points: list[Point]) -> dict[str, dict[str, float]]:
    """|predicted − measured| / measured per part ("transfer grpc" etc. per transport): max and median."""
    errors: dict[str, list[float]] = {}
    for p in points:
        key = p.part if p.part != "transfer" else f"transfer {p.transport}"
        errors.setdefault(key, []).append(abs(predict(model, p) - p.seconds) / max(p.seconds, 1e-9))
    return {k: {"max": max(v), "median": statistics.median(v)} for k, v in errors.items()}


class Tokens:
    """Fresh random prompts: no two share a block, so only a deliberately warmed prefix is ever cached."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.gen = torch.Generator().manual_seed(seed)
        self.ids = itertools.count()

    def __call__(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab_size, (n,), generator=self.gen).tolist()

    def request_id(self, tag: str) -> str:
        return f"calibrate-{tag}-{next(self.ids)}"


def new_engine(args: argparse.Namespace, num_blocks: int, max_model_len: int, **options) -> Engine:
    config = build_engine_config(args.model, device=args.device, dtype=args.dtype, num_blocks=num_blocks,
                                 max_model_len=max_model_len, block_size=BLOCK_SIZE, **options)  # fmt: skip
    return Engine(config)


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def prefill_seconds(engine: Engine, prompt: list[int], request_id: str) -> tuple[float, int]:
    """(seconds from add_request to the first token, tokens served by the prefix cache). Drives the idle
    engine itself: run it on the engine's loop thread (`EngineLoop.call`), where a worker runs it."""
    start = time.perf_counter()
    engine.add_request(request_id, prompt, GREEDY_ONE)
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                elapsed = time.perf_counter() - start
                while engine.has_unfinished_requests():  # the pipeline's last (empty) step
                    engine.step()
                return elapsed, out.num_cached_tokens


def measure_prefill(loop: EngineLoop, grid: Grid, tokens: Tokens, max_len: int) -> list[Point]:
    points = []
    for num_cached, num_new in itertools.product(grid.prefill_cached, grid.prefill_new):
        if num_cached + num_new >= max_len:
            continue
        prefix = tokens(num_cached)
        if num_cached:  # computed once: its blocks stay in the prefix cache
            loop.call(prefill_seconds, loop.engine, prefix, tokens.request_id("prefix"))
        prompts = [prefix + tokens(num_new) for _ in range(grid.repeats + 1)]
        runs = [loop.call(prefill_seconds, loop.engine, p, tokens.request_id("prefill")) for p in prompts][1:]
        cached = min(c for _, c in runs)  # as served: a prefix hit is whole blocks
        seconds = statistics.median(t for t, _ in runs)
        points.append(Point("prefill", f"new {num_new}, cached {cached}", {"num_new": num_new,
                            "num_cached": cached}, seconds))  # fmt: skip
    return points


def decode_step_seconds(engine: Engine, batch: int, context: int, grid: Grid, tokens: Tokens):
    """(median seconds per step over windows of back-to-back steps, mean context tokens read per step)
    for `batch` sequences of about `context` tokens. Sequences that finish their prompt early decode
    while the rest prefill, so every timed step is a full batch; all are aborted at the end. Run it on
    the engine's loop thread."""
    max_tokens = cdiv(batch * context, SETUP_BUDGET) + (DECODE_WINDOWS + 1) * grid.decode_steps + 64
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [tokens.request_id(f"b{batch}-c{context}") for _ in range(batch)]
    for rid in ids:
        engine.add_request(rid, tokens(context), params)
    sched = engine.scheduler
    while sched.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in sched.running):
        engine.step()
    for _ in range(grid.decode_steps):
        engine.step()  # warm-up; the pipeline fills: each step now overlaps the previous one
    if len(sched.running) != batch:
        raise RuntimeError(f"batch {batch}: only {len(sched.running)} sequences running (KV or max_num_seqs)")
    times, contexts = [], []
    for _ in range(DECODE_WINDOWS):
        before = sum(s.num_computed_tokens for s in sched.running)
        sync(engine)
        start = time.perf_counter()
        for _ in range(grid.decode_steps):
            engine.step()
        sync(engine)
        times.append((time.perf_counter() - start) / grid.decode_steps)
        contexts.append((before + sum(s.num_computed_tokens for s in sched.running)) / 2)
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return statistics.median(times), statistics.mean(contexts)


def measure_decode(args: argparse.Namespace, grid: Grid, tokens: Tokens, max_len: int) -> list[Point]:
    """Decode steps on an engine of their own, on its loop thread as in a decode worker."""
    batches = grid.decode_batches
    growth = cdiv(max(batches) * max(grid.decode_contexts), SETUP_BUDGET)
    growth += (DECODE_WINDOWS + 1) * grid.decode_steps  # tokens a sequence may gain before the last window
    contexts = [c for c in grid.decode_contexts if c + growth + 64 < max_len]
    longest = max(contexts) + growth + 64
    num_blocks = max(batches) * cdiv(longest, BLOCK_SIZE) + 16
    loop = EngineLoop(new_engine(args, num_blocks, longest + 1, max_num_seqs=max(batches),
                                 max_num_batched_tokens=SETUP_BUDGET))  # fmt: skip
    points = []
    try:
        for context, batch in itertools.product(contexts, batches):
            seconds, ctx = loop.call(decode_step_seconds, loop.engine, batch, context, grid, tokens)
            points.append(Point("decode", f"batch {batch}, context {context}",
                                {"num_seqs": batch, "num_ctx_tokens": round(ctx)}, seconds))  # fmt: skip
    finally:
        loop.stop()
    return points


def interleaved(a: Callable[[], A], b: Callable[[], B], pairs: int) -> list[tuple[A, B]]:
    """`pairs` (a(), b()) results, each pair taken back to back, which goes first alternating, after one
    warm-up pair (connections, first shapes): drift in the machine's load falls on both sides alike."""
    runs = []
    for i in range(pairs + 1):
        if i % 2:
            first = a()
            pair = (first, b())
        else:
            second = b()
            pair = (a(), second)
        if i:
            runs.append(pair)
    return runs


class PrefillWorkers:
    """In-process prefill workers (one `PrefillService` per transport, on one engine's loop, each behind
    its own gRPC server) and a decode worker process on the same model to push KV to."""

    def __init__(self, engine: Engine, model: str, transfer_tokens: int) -> None:
        self.loop = EngineLoop(engine)
        self.services, self.servers, self.channels, self.stubs = [], [], [], {}
        for transport, option in TRANSPORTS.items():
            service = PrefillService(self.loop, kv_transport=option)
            server, port = make_server("127.0.0.1:0")
            workers_pb2_grpc.add_PrefillWorkerServicer_to_server(service, server)
            server.start()
            self.services.append(service)
            self.servers.append(server)
            self.channels.append(channel(f"127.0.0.1:{port}"))
            self.stubs[transport] = workers_pb2_grpc.PrefillWorkerStub(self.channels[-1])
        dtype = str(engine.dtype).removeprefix("torch.")  # the decode worker's KV layout must match
        num_blocks = cdiv(transfer_tokens, BLOCK_SIZE) + 8  # one transfer at a time, released after it
        self.decode_proc, self.decode_address = start_decode_worker(model, dtype, num_blocks)  # the last step
        self.channels.append(channel(self.decode_address))
        self.kv = kvtransfer_pb2_grpc.KVTransferStub(self.channels[-1])

    def prefill_rpc_seconds(self, tokens: Tokens, prompt_len: int, transport: str = "grpc",
                            push: bool = False) -> tuple[float, int]:  # fmt: skip
        """(seconds from the call to its last reply, KV bytes pushed) for a fresh prompt: the first token
        alone without `push`, else the transfer's end too; the decode worker's lease is then released."""
        request = workers_pb2.PrefillRequest(
            request_id=tokens.request_id("rpc"), prompt_token_ids=tokens(prompt_len),
            sampling=sampling_to_proto(GREEDY_ONE), decode_address=self.decode_address if push else "",
        )  # fmt: skip
        start = time.perf_counter()
        replies = list(self.stubs[transport].Prefill(request))
        elapsed = time.perf_counter() - start
        if not push:
            return elapsed, 0
        done = replies[-1]
        if not done.transfer_done or done.transport != transport:
            raise RuntimeError(f"{transport} transfer of {request.request_id}: done={done.transfer_done}, "
                               f"transport {done.transport!r}")  # fmt: skip
        self.kv.Release(kvtransfer_pb2.ReleaseRequest(lease_id=done.lease_id, reason="calibration"))
        return elapsed, done.bytes_sent

    def engine_seconds(self, tokens: Tokens, prompt_len: int) -> tuple[float, int]:
        """`prefill_seconds` of a fresh prompt, on the engine's loop thread."""
        prompt, request_id = tokens(prompt_len), tokens.request_id("engine")
        return self.loop.call(prefill_seconds, self.loop.engine, prompt, request_id)

    def rpc_overhead(self, pairs: int, tokens: Tokens, prompt_len: int = 16) -> dict[str, float]:
        """Medians over interleaved pairs, for a small prompt: RPC time, engine-only time (on the loop
        thread, as the grid), and the overhead: their difference, clamped at 0."""
        runs = interleaved(partial(self.prefill_rpc_seconds, tokens, prompt_len),
                           partial(self.engine_seconds, tokens, prompt_len), pairs)  # fmt: skip
        rpc, engine = [r for (r, _), _ in runs], [e for _, (e, _) in runs]
        overhead = statistics.median(r - e for r, e in zip(rpc, engine, strict=True))
        return {"rpc_s": statistics.median(rpc), "engine_s": statistics.median(engine),
                "overhead_s": max(0.0, overhead), "num_tokens": prompt_len}  # fmt: skip

    def transfer_points(self, grid: Grid, tokens: Tokens, max_len: int) -> list[Point]:
        points = []
        for transport, prompt_len in itertools.product(TRANSPORTS, grid.transfer_tokens):
            if prompt_len >= max_len:
                continue
            runs = interleaved(partial(self.prefill_rpc_seconds, tokens, prompt_len, transport, True),
                               partial(self.prefill_rpc_seconds, tokens, prompt_len, transport), grid.pairs)
            num_bytes = runs[-1][0][1]
            seconds = statistics.median(pushed - alone for (pushed, _), (alone, _) in runs)
            points.append(Point("transfer", f"{transport} {num_bytes / 1e6:.3f} MB ({prompt_len} tokens)",
                                {"num_bytes": num_bytes}, seconds, transport))  # fmt: skip
        return points

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        for server in self.servers:
            server.stop(0).wait()
        for service in self.services:
            service.close()
        self.loop.stop()
        stop_worker(self.decode_proc)


def measure_host_load(engine: Engine, num_tokens: int, repeats: int) -> dict[str, float]:
    """Host tier → KV memory for a `num_tokens` prompt's blocks, median of `repeats` loads after one warm-up
    (the engine idle: its loop stopped)."""
    num_blocks = min(cdiv(num_tokens, BLOCK_SIZE), engine.block_pool.num_usable_blocks)
    tier = HostKVTier(engine.kv_caches, num_blocks)
    block_ids = list(range(1, num_blocks + 1))
    hashes = [i.to_bytes(32, "big") for i in block_ids]
    tier.save(block_ids, hashes)
    times = []
    for _ in range(repeats + 1):
        sync(engine)
        start = time.perf_counter()
        tier.load(hashes, block_ids)
        sync(engine)
        times.append(time.perf_counter() - start)
    num_bytes = num_blocks * sum(c[:, 0].numel() * c.element_size() for c in engine.kv_caches)
    seconds = statistics.median(times[1:])
    return {"num_bytes": num_bytes, "seconds": seconds, "bytes_per_s": num_bytes / seconds}


def measure_prefill_side(args, grid: Grid, tokens: Tokens, max_len: int):
    """(prefill points, the Prefill RPC's overhead, transfer points, the host-tier load) on one prefill
    engine."""
    longest = min(max(max(grid.prefill_cached) + max(grid.prefill_new), max(grid.transfer_tokens)), max_len)
    engine = new_engine(args, 4 * cdiv(longest, BLOCK_SIZE) + 16, longest + BLOCK_SIZE, shared_memory=True)
    workers = PrefillWorkers(engine, args.model, min(max(grid.transfer_tokens), max_len))
    try:
        prefill = measure_prefill(workers.loop, grid, tokens, max_len)
        overhead = workers.rpc_overhead(grid.pairs, tokens)
        transfers = workers.transfer_points(grid, tokens, max_len)
    finally:
        workers.close()
    host_load = measure_host_load(engine, min(max(grid.transfer_tokens), max_len), grid.repeats)
    return prefill, overhead, transfers, host_load


def fit_model(points: list[Point], kv_bytes_per_token: int) -> tuple[CostModel, dict[str, bool]]:
    """The formulas fitted to the points (prefill: the engine alone, as measured), and for each transport
    whether its rate was resolved (see `fit_transfer`)."""
    transfers, resolved = {}, {}
    for name in TRANSPORTS:
        transfers[name], resolved[name] = fit_transfer([p for p in points if p.transport == name])
    prefill = fit_prefill([p for p in points if p.part == "prefill"])
    decode = fit_decode([p for p in points if p.part == "decode"])
    return CostModel(prefill, decode, transfers, kv_bytes_per_token), resolved


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def provenance(device: str, cfg: ModelConfig, dtype: torch.dtype) -> dict:
    cuda = torch.version.cuda if device == "cuda" else None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "grpcio": grpc.__version__,
                "numpy": np.__version__, "cuda": cuda}  # fmt: skip
    shape = {k: getattr(cfg, k) for k in ("family", "hidden_size", "intermediate_size", "num_layers",
                                          "num_heads", "num_kv_heads", "head_dim", "vocab_size")}  # fmt: skip
    return {"versions": versions, "model": {**shape, "dtype": str(dtype).removeprefix("torch.")}}


def report(model: CostModel, fitted: CostModel, points: list[Point], errors: dict) -> None:
    """Every point beside the fit's prediction, then the model as written and the fit errors."""
    print("\n| part | point | measured ms | fitted ms | rel. error |\n|---|---|---|---|---|")
    for p in points:
        predicted = predict(fitted, p)
        error = (predicted - p.seconds) / max(p.seconds, 1e-9)
        print(f"| {p.part} | {p.label} | {p.seconds * 1e3:.3f} | {predicted * 1e3:.3f} | {error:+.1%} |")
    rpc = model.extra["prefill_rpc"]
    ms = {k: f"{v * 1e3:.3f} ms" for k, v in rpc.items() if k.endswith("_s")}
    print(f"\nPrefill RPC of {rpc['num_tokens']} tokens {ms['rpc_s']}, engine alone {ms['engine_s']}: "
          f"overhead {ms['overhead_s']}, in prefill.fixed_s (the prefill rows above: the engine alone)")
    pf, dc = model.prefill, model.decode
    print(f"prefill: fixed {pf.fixed_s * 1e3:.3f} ms, {pf.per_token_s * 1e6:.3f} µs/token, "
          f"{pf.per_token_ctx_s * 1e9:.4f} ns/token/context token")  # fmt: skip
    print(f"decode: fixed {dc.fixed_s * 1e3:.3f} ms, {dc.per_seq_s * 1e6:.2f} µs/seq, "
          f"{dc.per_ctx_token_s * 1e9:.3f} ns/context token")  # fmt: skip
    for name, t in model.transfers.items():
        bound = "" if model.extra["transfer_rate_resolved"][name] else " (rate hidden by the noise: a bound)"
        print(f"transfer {name}: latency {t.latency_s * 1e3:.3f} ms, {t.bytes_per_s / 1e9:.3f} GB/s{bound}")
    load = model.extra["host_load"]
    print(f"host-tier load: {load['num_bytes'] / 1e6:.3f} MB in {load['seconds'] * 1e3:.3f} ms = "
          f"{load['bytes_per_s'] / 1e9:.3f} GB/s")
    for part, e in errors.items():
        print(f"fit error {part}: max {e['max']:.1%}, median {e['median']:.1%}")


def main(argv: list[str] | None = None) -> CostModel:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="calibration.json")
    parser.add_argument("--quick", action="store_true", help="a small grid (under a minute on a 2-core CPU)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tune_malloc_for_transfers()  # this process plays the prefill worker, which does the same
    if sys.flags.safe_path:  # run with -P (device_path.sh): so is the decode worker, or splitserve/ shadows
        os.environ["PYTHONSAFEPATH"] = "1"
    grid = GRIDS["quick" if args.quick else args.device]
    cfg = ModelConfig.from_pretrained(args.model)
    dtype = resolve_dtype(args.dtype, cfg, resolve_device(args.device))
    info = provenance(args.device, cfg, dtype)
    print(f"{machine(args.device)}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    print("model " + ", ".join(f"{k} {v}" for k, v in info["model"].items()), flush=True)
    max_len, tokens = cfg.max_position_embeddings, Tokens(cfg.vocab_size)
    decode = measure_decode(args, grid, tokens, max_len)
    print(f"decode: {len(decode)} points, {time.perf_counter() - started:.0f} s", flush=True)
    gc.collect()  # the decode engine's KV cache goes before the prefill side's are made
    if args.device == "cuda":
        torch.cuda.empty_cache()
    prefill, overhead, transfers, host_load = measure_prefill_side(args, grid, tokens, max_len)
    points = prefill + decode + transfers
    fitted, resolved = fit_model(points, kv_block_bytes(cfg, 1, dtype))
    errors = fit_errors(fitted, points)
    raw = [{"part": p.part, "transport": p.transport, "label": p.label, **p.inputs, "measured_s": p.seconds,
            "predicted_s": predict(fitted, p)} for p in points]  # fmt: skip
    source = f"benchmarks/calibrate.py --model {args.model} --device {args.device} --dtype {args.dtype}"
    served = dataclasses.replace(fitted.prefill, fixed_s=fitted.prefill.fixed_s + overhead["overhead_s"])
    model = dataclasses.replace(
        fitted, prefill=served, device=machine(args.device), source=source + " --quick" * args.quick,
        measured=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        host_load_bytes_per_s=host_load["bytes_per_s"],
        extra={**info, "grid": dataclasses.asdict(grid), "prefill_rpc": overhead, "host_load": host_load,
               "prefill_engine_fixed_s": fitted.prefill.fixed_s, "transfer_rate_resolved": resolved,
               "fit_errors": errors, "points": raw, "wall_s": round(time.perf_counter() - started, 1)},
    )  # fmt: skip
    report(model, fitted, points, errors)
    model.save(args.out)
    print(f"\nwrote {args.out}; {model.extra['wall_s']:.0f} s")
    return model


if __name__ == "__main__":
    main()
