"""Request records that cross worker boundaries: protobuf messages to and from the engine's types."""

from __future__ import annotations

from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer.errors import Overloaded
from splitserve.protos import common_pb2


def sampling_from_proto(p: common_pb2.SamplingParams, **overrides) -> SamplingParams:
    """Raises `InvalidRequest` on out-of-range values (SamplingParams validates itself)."""
    fields = {
        "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p or 1.0,
        "top_k": p.top_k or None, "seed": p.seed if p.HasField("seed") else None,
        "stop_token_ids": tuple(p.stop_token_ids), "ignore_eos": p.ignore_eos,
    }  # fmt: skip
    return SamplingParams(**{**fields, **overrides})


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """Stop strings are not carried: workers deal in token ids (the detokenizing side applies them)."""
    return common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k or 0, seed=params.seed, stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )  # fmt: skip


def worker_load(engine: Engine) -> common_pb2.WorkerLoad:
    """An engine's live load. Run it on the engine's loop thread."""
    sched, pool = engine.scheduler, engine.block_pool
    return common_pb2.WorkerLoad(
        queued_tokens=sched.num_queued_tokens, running_requests=len(sched.running),
        waiting_requests=len(sched.waiting), kv_usage=pool.usage, free_blocks=pool.num_free_blocks,
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
