"""The client SDK: `Client` (blocking) and `AsyncClient` (asyncio) for a splitserve router over gRPC.

    from splitserve import Client
    client = Client("127.0.0.1:50051")
    out = client.generate("Hello", max_tokens=32, temperature=0.0)
    print(out.text, out.finish_reason, out.usage.cached_tokens, out.ttft_ms)
    for chunk in client.stream("Tell me a story", max_tokens=64):
        print(chunk.text, end="")

A prompt is a string, a list of token ids, or chat messages (`messages=[{"role": ..., "content": ...}]`).
Errors are typed (`SplitserveError` and its subclasses). A call is retried only while nothing has been
received (the router or every worker briefly unavailable): never after the first token. Leaving a
stream early cancels the call, which aborts the request on every worker it reached. Torch-free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format

from splitserve.protos import common_pb2, router_pb2, router_pb2_grpc


class SplitserveError(Exception):
    """A request failed; `code` is the gRPC status name."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class InvalidRequestError(SplitserveError, ValueError):
    """The request can never run as given (empty or too long prompt, bad parameters)."""


class OverloadedError(SplitserveError):
    """The cluster refused the request for now (queues full): retry later or elsewhere."""


class UnavailableError(SplitserveError):
    """No worker could run the request (or the router is unreachable); a transfer failed."""


class DeadlineExceededError(SplitserveError, TimeoutError):
    """The request's deadline passed."""


class AuthenticationError(SplitserveError, PermissionError):
    """The router wants an API key (`api_key=`) and got none, or one it does not know."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
}


def _error(exc: grpc.RpcError) -> SplitserveError:
    return _ERRORS.get(exc.code(), SplitserveError)(exc.details() or str(exc.code()), exc.code().name)


def _retry_delay(exc: grpc.RpcError, received: bool, attempt: int, retries: int) -> float:
    """Seconds to wait before trying a failed call again; raises its typed error when it must not be
    retried: something was already received, the failure is not UNAVAILABLE, or no tries are left."""
    if received or exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= retries:
        raise _error(exc) from None
    return 0.05 * 2**attempt


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob (the model's raw distribution), its rank there (1: the most likely) and
    the `logprobs` most likely tokens as (token id, logprob), descending."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # on the last chunk: "stop", "length" or "abort"
    usage: Usage | None = None  # on the last chunk
    ttft_ms: float | None = None  # on the first chunk
    route: dict | None = None  # on the first chunk: arm, pool, workers, score terms
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for (`logprobs=N`)


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    ttft_ms: float | None = None  # as the router measured it (receipt to first token)
    total_ms: float = 0.0  # as this client measured it
    route: dict = field(default_factory=dict)  # arm, pool, workers, score terms
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for (`logprobs=N`)


def build_request(
    prompt: str | Sequence[int] | None = None,
    *,
    max_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logprobs: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    session_id: str | None = None,
    messages: list[dict[str, str]] | None = None,
    request_id: str | None = None,
) -> router_pb2.RouterRequest:
    """The request the clients' `generate` and `stream` send; their keyword arguments are these."""
    sampling = common_pb2.SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k or 0, max_tokens=max_tokens,
        stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )  # fmt: skip
    if seed is not None:
        sampling.seed = seed
    if logprobs is not None:
        sampling.logprobs = logprobs
    stops = [stop] if isinstance(stop, str) else list(stop)
    request = router_pb2.RouterRequest(sampling=sampling, session_id=session_id or "", stop=stops,
                                       request_id=request_id or "")  # fmt: skip
    if messages is not None:
        request.messages.extend(router_pb2.ChatMessage(role=m["role"], content=m["content"])
                                for m in messages)  # fmt: skip
    elif isinstance(prompt, str):
        request.prompt = prompt
    elif prompt is not None:
        request.prompt_token_ids.extend(int(t) for t in prompt)
    return request


def _chunk(msg: router_pb2.RouterChunk) -> Chunk:
    usage = None
    if msg.HasField("usage"):
        u = msg.usage
        usage = Usage(u.prompt_tokens, u.cached_tokens, u.completion_tokens)
    first = msg.HasField("route")
    logprobs = [TokenLogprob(lp.token_id, lp.logprob, lp.rank,
                             tuple(zip(lp.top_ids, lp.top_logprobs, strict=True)))
                for lp in msg.logprobs] or None  # fmt: skip
    return Chunk(msg.text, list(msg.token_ids), msg.finish_reason or None, usage,
                 msg.ttft_ms if first else None, _route(msg) if first else None, logprobs)  # fmt: skip


def _route(msg: router_pb2.RouterChunk) -> dict:
    r = msg.route
    return {"arm": r.arm, "pool": r.pool, "prefill_worker": r.prefill_worker,
            "decode_worker": r.decode_worker, "terms": dict(r.terms)}  # fmt: skip


def _add(out: Completion, msg: router_pb2.RouterChunk) -> None:
    chunk = _chunk(msg)
    out.text += chunk.text
    out.token_ids.extend(chunk.token_ids)
    if chunk.logprobs:
        out.logprobs = (out.logprobs or []) + chunk.logprobs
    if chunk.ttft_ms is not None:
        out.ttft_ms, out.route = chunk.ttft_ms, _route(msg)
    if chunk.finish_reason:
        out.finish_reason, out.usage = chunk.finish_reason, chunk.usage or Usage()


def _as_dict(reply) -> dict:
    return json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)  # fmt: skip


class Client:
    """A blocking client. `timeout` (seconds) is each request's deadline unless a call gives its own;
    `retries`: attempts after the first while nothing has been received."""

    def __init__(
        self, address: str, timeout: float | None = 600.0, retries: int = 2, api_key: str | None = None
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self._channel = grpc.insecure_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    def close(self) -> None:
        self._channel.close()

    def abort(self, request_id: str) -> bool:
        """Stop a running request started with this `request_id`; True if it was running."""
        request = router_pb2.RouterAbortRequest(request_id=request_id)
        return self._unary(self._stub.Abort, request)["found"]

    def health(self) -> dict:
        """{"serving": a decode worker answers, "index_stale": routing on the last index mirror}."""
        return self._unary(self._stub.Health, router_pb2.HealthRequest())

    def status(self) -> dict:
        """The router's view: "workers" (id, role, address, healthy, load), per-arm "arms" counters,
        "index_stale"."""
        return self._unary(self._stub.Status, router_pb2.StatusRequest())

    def reset_cache(self) -> int:
        """Empty every worker's prefix cache (e.g. between the arms of an experiment); returns the cached
        blocks forgotten. Raises `UnavailableError` naming workers that did not answer."""
        return int(self._unary(self._stub.ResetCache, common_pb2.ResetCacheRequest())["num_evicted_blocks"])

    def _unary(self, method, request) -> dict:
        try:
            return _as_dict(method(request, timeout=self.timeout, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt=None, *, timeout: float | None = None, **params) -> Completion:
        """Run a request to completion (`params`: see `build_request`)."""
        start = time.perf_counter()
        out = Completion()
        for msg in self._calls(build_request(prompt, **params), timeout):
            _add(out, msg)
        out.total_ms = (time.perf_counter() - start) * 1e3
        return out

    def stream(self, prompt=None, *, timeout: float | None = None, **params) -> Iterator[Chunk]:
        """The request's output as it comes; leaving the loop early aborts the request."""
        yield from (_chunk(msg) for msg in self._calls(build_request(prompt, **params), timeout))

    def _calls(self, request, timeout: float | None) -> Iterator[router_pb2.RouterChunk]:
        deadline = timeout if timeout is not None else self.timeout
        for attempt in range(self.retries + 1):
            call = self._stub.GenerateStream(request, timeout=deadline, metadata=self._metadata)
            received = False
            try:
                for msg in call:
                    received = True
                    yield msg
                return
            except grpc.RpcError as exc:
                time.sleep(_retry_delay(exc, received, attempt, self.retries))
            finally:
                call.cancel()  # no-op when finished; a caller leaving early aborts the request


class AsyncClient:
    """The asyncio client: `await generate(...)`, `async for chunk in stream(...)`; same arguments."""

    def __init__(
        self, address: str, timeout: float | None = 600.0, retries: int = 2, api_key: str | None = None
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    async def close(self) -> None:
        await self._channel.close()

    async def abort(self, request_id: str) -> bool:
        """Stop a running request started with this `request_id`; True if it was running."""
        request = router_pb2.RouterAbortRequest(request_id=request_id)
        return (await self._unary(self._stub.Abort, request))["found"]

    async def health(self) -> dict:
        """As `Client.health`."""
        return await self._unary(self._stub.Health, router_pb2.HealthRequest())

    async def status(self) -> dict:
        """As `Client.status`."""
        return await self._unary(self._stub.Status, router_pb2.StatusRequest())

    async def reset_cache(self) -> int:
        """As `Client.reset_cache`."""
        reply = await self._unary(self._stub.ResetCache, common_pb2.ResetCacheRequest())
        return int(reply["num_evicted_blocks"])

    async def _unary(self, method, request) -> dict:
        try:
            return _as_dict(await method(request, timeout=self.timeout, metadata=self._metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt=None, *, timeout: float | None = None, **params) -> Completion:
        start = time.perf_counter()
        out = Completion()
        async for msg in self._calls(build_request(prompt, **params), timeout):
            _add(out, msg)
        out.total_ms = (time.perf_counter() - start) * 1e3
        return out

    async def stream(self, prompt=None, *, timeout: float | None = None, **params) -> AsyncIterator[Chunk]:
        async for msg in self._calls(build_request(prompt, **params), timeout):
            yield _chunk(msg)

    async def _calls(self, request, timeout: float | None) -> AsyncIterator[router_pb2.RouterChunk]:
        deadline = timeout if timeout is not None else self.timeout
        for attempt in range(self.retries + 1):
            call = self._stub.GenerateStream(request, timeout=deadline, metadata=self._metadata)
            received = False
            try:
                async for msg in call:
                    received = True
                    yield msg
                return
            except grpc.RpcError as exc:
                await asyncio.sleep(_retry_delay(exc, received, attempt, self.retries))
            finally:
                call.cancel()
