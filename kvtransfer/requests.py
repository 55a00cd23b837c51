"""Requests that cross worker boundaries: protobuf messages to and from the engine's types, the queue
bound, and queueing a worker request on its engine with the errors mapped to gRPC statuses."""

from __future__ import annotations

import queue

import grpc

from splitserve.engine.engine import Engine
from splitserve.engine.errors import InvalidRequest
from splitserve.engine.kv_watch import KVWatch
from splitserve.engine.loop import EngineLoop
from splitserve.engine.outputs import StepOutput
from splitserve.engine.rates import LineFit
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer.errors import Overloaded
from splitserve.kvtransfer.fetch import Fetched, Fetcher
from splitserve.protos import common_pb2, workers_pb2


def sampling_from_proto(p: common_pb2.SamplingParams, **overrides) -> SamplingParams:
    """Raises `InvalidRequest` on out-of-range values (SamplingParams validates itself)."""
    fields = {
        "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p or 1.0,
        "top_k": p.top_k or None, "seed": p.seed if p.HasField("seed") else None,
        "stop_token_ids": tuple(p.stop_token_ids), "ignore_eos": p.ignore_eos, "min_p": p.min_p,
        "repetition_penalty": p.repetition_penalty or 1.0, "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty, "logprobs": p.logprobs if p.HasField("logprobs") else None,
    }  # fmt: skip
    return SamplingParams(**{**fields, **overrides})


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """Stop strings are not carried: workers deal in token ids (the detokenizing side applies them)."""
    return common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k or 0, seed=params.seed, stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        logprobs=params.logprobs,
    )  # fmt: skip


def logprobs_to_proto(logprobs) -> list[common_pb2.TokenLogprob]:
    """A step output's `TokenLogprob`s (None: none asked) as they travel."""
    return [common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
                                    top_ids=[t for t, _ in lp.top], top_logprobs=[v for _, v in lp.top])
            for lp in logprobs or ()]  # fmt: skip


def worker_load(
    loop: EngineLoop, fetcher: Fetcher | None = None, push_rates: dict[str, LineFit] | None = None
) -> common_pb2.WorkerLoad:
    """The live load of a loop's engine, with its prefix hits by tier, what `fetcher` fetched, and what
    its work costs as measured (prefill rate by cached context, host-tier loads, and `push_rates`: the
    wire bytes/s its KV pushes' tails measured, by transport). Run it on the loop thread."""
    sched, pool, hits = loop.engine.scheduler, loop.engine.block_pool, loop.engine.scheduler.prefix_stats
    tiers = common_pb2.KVTierStats(
        prompt_tokens=hits.prompt_tokens, gpu_hit_tokens=hits.memory_hit_tokens,
        host_hit_tokens=hits.host_hit_tokens, fetched_tokens=hits.fetched_tokens,
    )  # fmt: skip
    costs = common_pb2.MeasuredCosts(prefill=[
        common_pb2.PrefillRate(min_cached_tokens=start, tokens_per_s=rate)
        for start, rate in loop.engine.prefill_rate.buckets()
    ])  # fmt: skip
    for transport, meter in (push_rates or {}).items():
        if meter.per_s:
            costs.push_bytes_per_s[transport] = meter.per_s
    host = loop.engine.host_tier
    if host is not None:
        tiers.host_tier_blocks, tiers.host_tier_capacity = len(host), host.capacity
        costs.host_load_bytes_per_s = host.load_bytes_per_s
    if fetcher is not None:
        tiers.fetched_bytes = fetcher.fetched_bytes
        tiers.fetch_fallbacks.update(fetcher.fallbacks)
        tiers.fetch_ms, tiers.fetch_mb = fetcher.mean_s * 1e3, fetcher.mean_bytes / 1e6
    return common_pb2.WorkerLoad(
        queued_tokens=sched.num_queued_tokens, running_requests=len(sched.running),
        waiting_requests=len(sched.waiting), kv_usage=pool.usage, free_blocks=pool.num_free_blocks,
        max_running_requests=sched.config.max_num_seqs, step_ms=loop.step_s * 1e3,
        step_tokens=sched.config.max_num_batched_tokens, tiers=tiers, costs=costs,
    )  # fmt: skip


def check_room(engine: Engine, num_new_tokens: int, max_queued_tokens: int | None) -> None:
    """Raise `Overloaded` when taking `num_new_tokens` more would exceed the worker's queue bound (tokens
    waiting to be computed). Run it on the engine's loop thread, in the same call that adds the request."""
    queued = engine.scheduler.num_queued_tokens
    if max_queued_tokens is not None and queued + num_new_tokens > max_queued_tokens:
        raise Overloaded(
            f"worker overloaded: {queued} tokens queued, {num_new_tokens} more would pass the bound of "
            f"{max_queued_tokens}"
        )


def queue_request(
    loop: EngineLoop,
    context: grpc.ServicerContext,
    request: workers_pb2.PrefillRequest | workers_pb2.GenerateRequest,
    max_queued_tokens: int | None,
    kv_watch: KVWatch | None = None,
    fetcher: Fetcher | None = None,
    **sampling_overrides,
) -> tuple[queue.Queue[StepOutput], Fetched]:
    """Queue a worker request on its engine and return the queue of its outputs, and what was fetched for
    it: with a `fetcher` and a `kv_holder` in the request, the prompt's leading blocks that holder has
    and this engine lacks are fetched first (a failed fetch: recomputed). A request the engine rejects
    ends the RPC with INVALID_ARGUMENT, one past the queue bound with RESOURCE_EXHAUSTED (raised as the
    `grpc.RpcError` that `context.abort` raises, with nothing left queued)."""
    rid, prompt = request.request_id, list(request.prompt_token_ids)
    salt = request.cache_salt if request.HasField("cache_salt") else None
    fetched = Fetched(None)

    def add() -> None:  # on the loop thread: the fetched blocks, the bound and the add are one step
        fetched_tokens = fetcher.fill(fetched) if fetcher is not None else 0
        check_room(loop.engine, len(prompt), max_queued_tokens)
        loop.engine.add_request(rid, prompt, params, salt, kv_watch=kv_watch, fetched_tokens=fetched_tokens)

    outputs = loop.listen(rid)
    try:
        params = sampling_from_proto(request.sampling, **sampling_overrides)
        if fetcher is not None and request.kv_holder.address:
            fetched = fetcher.fetch(request)
        loop.call(add)
    except InvalidRequest as exc:
        loop.forget(rid)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Overloaded as exc:
        loop.forget(rid)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    return outputs, fetched
