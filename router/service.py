"""The router's gRPC front door (`protos/router.proto`): Generate, GenerateStream, Health, Status.

Requests arrive as token ids (the SDK and the HTTP front tokenize); each is routed by `core.Router` and
its outputs relayed, with its route, usage and time to first token. Errors are typed: a bad request is
INVALID_ARGUMENT, no worker to run it UNAVAILABLE, a failed transfer under the `fail` policy UNAVAILABLE
with the cause; a worker's own status is passed through. A client that cancels a stream aborts the
request on the workers it reached. Per-arm counters feed Status (and the A/B reports).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from splitserve.engine.errors import InvalidRequest
from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos import common_pb2, router_pb2, router_pb2_grpc, workers_pb2
from splitserve.router.core import Routed, RoutedRequest, Router
from splitserve.router.dispatch import TransferFailed
from splitserve.router.policies import NoWorker
from splitserve.router.tenants import Tenants, Unauthenticated
from splitserve.router.text import Detokenizer, TextCodec


@dataclass
class _ArmCounters:
    requests: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms_sum: float = 0.0


class RequestError(Exception):
    """A request the router ends with a status (a gRPC code; the HTTP front maps it to HTTP)."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        router: Router,
        codec: TextCodec | None = None,
        index_stale: Callable[[], bool] = lambda: False,
        tenants: Tenants | None = None,
    ) -> None:
        """`codec`: the checkpoint's tokenizer, for text and chat prompts and text output (None: token
        ids only). `tenants`: API keys → tenants, whose names salt the requests' block hashes (None: one
        anonymous tenant, keys unchecked)."""
        self.router = router
        self.codec = codec
        self.index_stale = index_stale
        self.tenants = tenants
        # Ids this router makes are unique across routers and restarts (workers key requests by id).
        self._id_prefix = f"req-{secrets.token_hex(4)}-"
        self._ids = itertools.count()
        self._arms: dict[str, _ArmCounters] = {}
        # request id → (its tenant, aborted, its decode worker)
        self._running: dict[str, tuple[str | None, threading.Event, list[str]]] = {}
        self._lock = threading.Lock()

    def Generate(self, request: router_pb2.RouterRequest, context: grpc.ServicerContext):
        start = time.perf_counter()
        rid = request.request_id or self.new_request_id()
        reply = router_pb2.RouterReply(request_id=rid)
        for chunk in self._grpc(request, context, rid):
            reply.text += chunk.text
            reply.logprobs.extend(chunk.logprobs)
            reply.token_ids.extend(chunk.token_ids)
            if chunk.HasField("route"):
                reply.route.CopyFrom(chunk.route)
                reply.ttft_ms = chunk.ttft_ms
            if chunk.finish_reason:
                reply.finish_reason = chunk.finish_reason
                reply.usage.CopyFrom(chunk.usage)
        reply.total_ms = (time.perf_counter() - start) * 1e3
        return reply

    def GenerateStream(self, request: router_pb2.RouterRequest, context: grpc.ServicerContext):
        return self._grpc(request, context, request.request_id or self.new_request_id())

    def _grpc(self, request, context: grpc.ServicerContext, rid: str):
        try:
            yield from self.run(request, rid, _authorization(context))
        except RequestError as exc:
            context.abort(exc.code, exc.detail)

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def run(self, request: router_pb2.RouterRequest, rid: str, authorization: str | None = None):
        """The request's chunks (the first with its route and TTFT, the last with its finish reason and
        usage); raises `RequestError`. Closing the iterator early aborts the request on the workers.
        `authorization`: the caller's "Bearer KEY", which names its tenant."""
        start = time.perf_counter()
        tenant = self._tenant(authorization)
        prompt, detok = self._prompt(request)
        if request.sampling.max_tokens <= 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens must be positive")
        aborted, decode = threading.Event(), []
        with self._lock:
            if rid in self._running:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is running")
            self._running[rid] = (tenant, aborted, decode)
        routed = RoutedRequest(rid, prompt, request.sampling, session_id=request.session_id or None,
                               tenant_salt=tenant, aborted=aborted)  # fmt: skip
        counters, completion, cached = None, 0, 0
        outputs = self.router.generate(routed)
        try:
            for out in outputs:
                if isinstance(out, Routed):
                    counters = self._counters(out.arm)
                    route = _route(out)
                    decode.append(out.decision.decode)
                    continue
                chunk = router_pb2.RouterChunk(token_ids=out.token_ids, finish_reason=out.finish_reason,
                                               logprobs=out.logprobs)  # fmt: skip
                if detok is not None:
                    seen = len(detok.text)
                    if detok.add(out.token_ids, final=bool(out.finish_reason)):
                        chunk.finish_reason = "stop"  # a stop string: the workers stop when we hang up
                    chunk.text = detok.text[seen:]
                if completion == 0 and out.token_ids:  # the first token
                    cached = out.num_cached_tokens
                    chunk.route.CopyFrom(route)
                    chunk.ttft_ms = (time.perf_counter() - start) * 1e3
                    with self._lock:
                        counters.ttft_ms_sum += chunk.ttft_ms
                completion += len(out.token_ids)
                if chunk.finish_reason:
                    chunk.usage.CopyFrom(router_pb2.Usage(
                        prompt_tokens=len(routed.prompt_token_ids), cached_tokens=cached,
                        completion_tokens=completion,
                    ))  # fmt: skip
                yield chunk
                if chunk.finish_reason:
                    break
        except (NoWorker, TransferFailed) as exc:
            self._fail(counters, grpc.StatusCode.UNAVAILABLE, str(exc))
        except grpc.RpcError as exc:  # a worker's verdict (e.g. the prompt is too long), or its death
            where = f"decode worker {decode[0]}" if decode else "worker"
            self._fail(counters, exc.code(), f"{where}, after {completion} tokens: {exc.details()}")
        finally:
            outputs.close()  # after a stop string or a cancelled call: the workers abort the request
            with self._lock:
                self._running.pop(rid, None)
        with self._lock:
            counters.requests += 1
            counters.prompt_tokens += len(routed.prompt_token_ids)
            counters.cached_tokens += cached

    def _tenant(self, authorization: str | None) -> str | None:
        if self.tenants is None:
            return None
        try:
            return self.tenants.tenant_for(authorization)
        except Unauthenticated as exc:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None

    def _prompt(self, request: router_pb2.RouterRequest) -> tuple[list[int], Detokenizer | None]:
        """The prompt's token ids and, with a tokenizer, the output's detokenizer (stop strings)."""
        def bad(detail: str) -> RequestError:
            return RequestError(grpc.StatusCode.INVALID_ARGUMENT, detail)

        if sum(map(bool, (request.prompt_token_ids, request.prompt, request.messages))) != 1:
            raise bad("give exactly one of prompt_token_ids, prompt, messages")
        if self.codec is None:
            if not request.prompt_token_ids or request.stop:
                raise bad("this router has no tokenizer: token ids only, no stop strings")
            return list(request.prompt_token_ids), None
        try:
            if request.messages:
                messages = [{"role": m.role, "content": m.content} for m in request.messages]
                ids = self.codec.encode(self.codec.apply_chat_template(messages))
            else:
                ids = list(request.prompt_token_ids) or self.codec.encode(request.prompt)
            detok = Detokenizer(self.codec, SamplingParams(stop=tuple(request.stop)))
        except InvalidRequest as exc:
            raise bad(str(exc)) from None
        if not ids:
            raise bad("the prompt is empty")
        return ids, detok

    def Abort(self, request: router_pb2.RouterAbortRequest, context=None):
        """Abort on the decode worker (which holds the request's reservation or runs it): its stream then
        ends with "abort", and a transfer that fails because of it is not retried. Only the request's own
        tenant can abort it (another's request is "not found")."""
        try:
            tenant = self._tenant(_authorization(context))
        except RequestError as exc:
            context.abort(exc.code, exc.detail)
        with self._lock:
            running = self._running.get(request.request_id)
        if running is None or running[0] != tenant:
            return router_pb2.RouterAbortReply(found=False)
        _, aborted, decode = running
        aborted.set()
        if decode:
            with contextlib.suppress(grpc.RpcError, NoWorker):
                self.router.workers.get(decode[0]).stub.Abort(
                    workers_pb2.AbortRequest(request_id=request.request_id), timeout=5.0)
        return router_pb2.RouterAbortReply(found=True)

    def Health(self, request=None, context=None):
        serving = any(h.role == "decode" for h in self.router.workers.healthy())
        return router_pb2.HealthReply(serving=serving, index_stale=self.index_stale())

    def Status(self, request=None, context=None):
        reply = router_pb2.StatusReply(index_stale=self.index_stale())
        for h in self.router.workers.all():
            reply.workers.add(worker_id=h.worker_id, role=h.role, address=h.address, healthy=h.healthy,
                              load=h.load)  # fmt: skip
        with self._lock:
            for arm, c in sorted(self._arms.items()):
                reply.arms.add(arm=arm, requests=c.requests, failures=c.failures,
                               prompt_tokens=c.prompt_tokens, cached_tokens=c.cached_tokens,
                               ttft_ms_sum=c.ttft_ms_sum)  # fmt: skip
        return reply

    def ResetCache(self, request=None, context=None):
        """Empty every registered worker's prefix cache (their evictions reach the index as events). With
        tenants, only a caller with a key may. UNAVAILABLE names the workers that did not answer."""
        try:
            self._tenant(_authorization(context))
            total, failed = 0, []
            for h in self.router.workers.all():
                try:
                    reply = h.stub.ResetCache(common_pb2.ResetCacheRequest(), timeout=10.0)
                    total += reply.num_evicted_blocks
                except grpc.RpcError as exc:
                    failed.append(f"{h.worker_id} ({exc.code().name})")
            if failed:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"cache not reset on {', '.join(failed)}")
        except RequestError as exc:
            if context is None:
                raise
            context.abort(exc.code, exc.detail)
        return common_pb2.ResetCacheReply(num_evicted_blocks=total)

    def _counters(self, arm: str) -> _ArmCounters:
        with self._lock:
            return self._arms.setdefault(arm, _ArmCounters())

    def _fail(self, counters: _ArmCounters | None, code: grpc.StatusCode, detail: str) -> None:
        if counters is not None:
            with self._lock:
                counters.failures += 1
        raise RequestError(code, detail)


def _authorization(context: grpc.ServicerContext | None) -> str | None:
    return dict(context.invocation_metadata()).get("authorization") if context is not None else None


def _route(routed: Routed) -> router_pb2.Route:
    d = routed.decision
    return router_pb2.Route(arm=routed.arm, pool=d.pool, prefill_worker=d.prefill or "",
                            decode_worker=d.decode, terms=d.terms)  # fmt: skip

