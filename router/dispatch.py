"""Running one request across a prefill worker and a decode worker, with the transfer failure policy.

`run_disaggregated` asks a prefill worker for the first token (the decode worker named in the request
reserves room and receives the KV while the prefill computes), starts `Generate` on the decode worker
as soon as that token is known — the decode worker waits for the KV — and streams the tokens.

When the prefill worker or the transfer fails, the policy decides: `FAIL` ends the request with a
`TransferFailed` naming the worker and the cause; `RECOMPUTE` runs the prefill again on the next
prefill worker offered (the decode worker's new reservation replaces the failed one). A first token
already sent to the caller stays: the retry's KV continues from it. The decode worker never recomputes
a failed transfer by itself. Errors that another prefill worker would hit too (a bad request, no room
on the decode worker) are raised as they are. Imports protos and grpc only (no torch).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import grpc

from splitserve.protos import workers_pb2, workers_pb2_grpc

log = logging.getLogger(__name__)

# What a prefill worker's death or a failed transfer looks like; anything else is about the request.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL,
                       grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED})  # fmt: skip


class FailurePolicy(Enum):
    FAIL = "fail"
    RECOMPUTE = "recompute"


class TransferFailed(Exception):
    """The prefill or its KV transfer failed and the policy does not (or can no longer) retry."""


@dataclass(frozen=True)
class PrefillTarget:
    name: str  # for errors and logs (an address or worker id)
    stub: workers_pb2_grpc.PrefillWorkerStub


@dataclass
class Emitted:
    """What `run_disaggregated` yields: new token ids, and the finish reason on the last one."""

    token_ids: list[int]
    finish_reason: str = ""
    prefill: str = ""  # the prefill worker that produced the KV (on the first output)
    num_cached_tokens: int = 0  # prompt tokens the prefill worker found cached (on the first output)
    logprobs: list = field(default_factory=list)  # common_pb2.TokenLogprob per token, when asked for


def run_disaggregated(
    request: workers_pb2.PrefillRequest,
    prefills: Sequence[PrefillTarget],
    decoder: workers_pb2_grpc.DecodeWorkerStub,
    policy: FailurePolicy = FailurePolicy.FAIL,
    timeout_s: float | None = None,
    aborted: threading.Event | None = None,
) -> Iterator[Emitted]:
    """Run `request` (its `decode_address` is the decode worker behind `decoder`), trying `prefills` in
    order as the policy allows. Yields the first token as soon as it is known, then the rest. Once
    `aborted` is set (the caller aborted the request on the decode worker), a failure ends the request
    with finish reason "abort" instead of a retry or an error."""
    if not request.decode_address:
        raise ValueError("a disaggregated request names its decode worker (decode_address)")
    if not prefills:
        raise ValueError("no prefill worker to run the request on")
    tries = list(prefills if policy is FailurePolicy.RECOMPUTE else prefills[:1])
    first_token: int | None = None
    for attempt, target in enumerate(tries):
        stream = replies = None
        try:
            replies = target.stub.Prefill(request, timeout=timeout_s)
            first = next(replies)
            if first_token is None:
                first_token = first.first_token_id
                logprobs = [first.first_token_logprob] if first.HasField("first_token_logprob") else []
                yield Emitted([first_token], prefill=target.name, num_cached_tokens=first.num_cached_tokens,
                              logprobs=logprobs)  # fmt: skip
            generate = _generate_request(request, first.lease_id, first_token)
            stream = decoder.Generate(generate, timeout=timeout_s)
            next(replies)  # the transfer's end; the decode worker starts by itself once the KV is in
        except GeneratorExit:  # the caller went away after the first token: both workers abort
            for call in (replies, stream):
                if call is not None:
                    call.cancel()
            raise
        except grpc.RpcError as exc:
            if stream is not None:
                stream.cancel()
            if aborted is not None and aborted.is_set():
                yield Emitted([], "abort")
                return
            if exc.code() not in RETRYABLE:
                raise
            cause = f"prefill worker {target.name}: {exc.code().name}: {exc.details()}"
            if attempt + 1 == len(tries):
                message = f"request {request.request_id!r} failed ({policy.value} policy): {cause}"
                raise TransferFailed(message) from exc
            log.warning("request %s: %s; recomputing on %s", request.request_id, cause,
                        tries[attempt + 1].name)
            continue
        try:
            for chunk in stream:
                yield Emitted(list(chunk.token_ids), chunk.finish_reason, logprobs=list(chunk.logprobs))
        finally:
            stream.cancel()  # no-op once finished; if the caller went away, the decode worker aborts
        return


def _generate_request(request: workers_pb2.PrefillRequest, lease_id: str, first_token: int):
    """The decode side of a disaggregated request: the lease identifies it (prompt, sampling and salt
    reached the decode worker with the reservation), so they are not sent again."""
    return workers_pb2.GenerateRequest(request_id=request.request_id, lease_id=lease_id,
                                       first_token_id=first_token)
