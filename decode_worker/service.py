"""The decode worker's gRPC services: KVTransfer (receive a prompt's KV under a lease; serve blocks it holds
to others) and DecodeWorker (generate, streaming tokens; abort; load).

The handoff itself — leases, chunk sinks, claims, expiry — is `kvtransfer.receiver.KVReceiver`; this
module maps its calls to RPCs and its typed errors to status codes. The engine is reached only through
its `EngineLoop`. A request without a lease may name a `kv_holder`: its prompt's leading blocks are
fetched from there before it is prefilled here (`kvtransfer.fetch`).
"""

from __future__ import annotations

import threading

import grpc

from splitserve.engine.block_pool import OutOfKVBlocks
from splitserve.engine.errors import InvalidRequest
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.errors import CorruptChunk, LayoutMismatch, LeaseNotFound, MalformedChunk
from splitserve.kvtransfer.fetch import Fetcher, FetchServer
from splitserve.kvtransfer.receiver import ClaimAbandoned, KVReceiver, WrongLease
from splitserve.kvtransfer.requests import logprobs_to_proto, queue_request, worker_load
from splitserve.kvtransfer.same_host import export_source
from splitserve.kvtransfer.transport import channel
from splitserve.protos import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc, workers_pb2, workers_pb2_grpc


class DecodeService(kvtransfer_pb2_grpc.KVTransferServicer, workers_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, loop: EngineLoop, lease_ttl_s: float = 10.0, max_queued_tokens: int | None = None):
        """`max_queued_tokens`: the bound on prompt tokens waiting to be computed here (local prefills);
        a request past it is refused with RESOURCE_EXHAUSTED. None: unbounded."""
        self.loop = loop
        self.max_queued_tokens = max_queued_tokens
        self.receiver = KVReceiver(loop, lease_ttl_s)
        self.layout = self.receiver.layout
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}  # fetch holders' address → channel
        self.fetcher = Fetcher(loop, self.layout, self._channel, self.receiver.sources)
        source = export_source(loop.engine.kv_caches, loop.engine.kv_memfd)
        self.holder = FetchServer(loop, self.layout, source)

    @property
    def leases(self):
        return self.receiver.leases

    def close(self) -> None:
        self.receiver.close()
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = channel(address)
            return self._channels[address]

    # ---------------------------------------------------------------------------------------- KVTransfer

    def Reserve(self, request: kvtransfer_pb2.ReserveRequest, context: grpc.ServicerContext):
        try:
            return self.receiver.reserve(request)
        except (LayoutMismatch, InvalidRequest) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OutOfKVBlocks as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for the request's KV: {exc}")

    def Push(self, request_iterator, context: grpc.ServicerContext):
        """One lane of a transfer (raw frames, see kvtransfer.frames), stored by the receiver."""
        try:
            return self.receiver.receive(request_iterator)
        except LeaseNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except CorruptChunk as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        except MalformedChunk as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def Release(self, request: kvtransfer_pb2.ReleaseRequest, context: grpc.ServicerContext):
        try:
            lease = self.receiver.release(request.lease_id, request.reason or "released by the sender")
        except LeaseNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return kvtransfer_pb2.ReleaseReply(state=lease.state.value)

    def Fetch(self, request: kvtransfer_pb2.FetchRequest, context: grpc.ServicerContext):
        """Serve blocks this worker holds to another (`kvtransfer.fetch`)."""
        yield from self.holder.Fetch(request, context)

    # -------------------------------------------------------------------------------------- DecodeWorker

    def Generate(self, request: workers_pb2.GenerateRequest, context: grpc.ServicerContext):
        rid = request.request_id
        if request.lease_id:
            self._claim(request, context)
            outputs = self.loop.listen(rid)
            done = self.loop.call(self.loop.engine.admit_kv, rid, request.first_token_id)
            if done is not None:  # the first token already ended the request
                self.loop.forget(rid)
                yield workers_pb2.TokenChunk(finish_reason=done.finish_reason.value)
                return
        else:
            outputs, fetched = queue_request(self.loop, context, request, self.max_queued_tokens,
                                             fetcher=self.fetcher)  # fmt: skip
        finished = threading.Event()
        context.add_callback(lambda: finished.is_set() or self.loop.abort(rid))  # client went away
        first = True
        while True:
            out = self.loop.take(outputs)
            reason = out.finish_reason.value if out.finished else ""
            tokens, cached = list(out.new_token_ids), out.num_cached_tokens
            chunk = workers_pb2.TokenChunk(token_ids=tokens, finish_reason=reason, num_cached_tokens=cached,
                                           logprobs=logprobs_to_proto(out.logprobs))  # fmt: skip
            if first and not request.lease_id:
                chunk.num_fetched_blocks, chunk.fetch_fallback = fetched.num_blocks, fetched.fallback
            first = False
            yield chunk
            if out.finished:
                finished.set()
                return

    def _claim(self, request: workers_pb2.GenerateRequest, context: grpc.ServicerContext) -> None:
        """Wait for the request's KV and take its blocks (`KVReceiver.claim`; the transfer may still be
        running: the caller starts Generate as soon as the prefill worker has the first token)."""
        if not request.HasField("first_token_id"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a request with pushed KV needs first_token_id")
        if request.prompt_token_ids or request.HasField("sampling") or request.HasField("cache_salt"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a request with pushed KV takes its prompt, "
                          "sampling and cache salt from its lease: send none")  # fmt: skip
        try:
            self.receiver.claim(request.request_id, request.lease_id, context.is_active)
        except LeaseNotFound as exc:
            detail = f"the KV of {request.request_id!r} did not arrive: {exc}"
            context.abort(grpc.StatusCode.NOT_FOUND, detail)
        except WrongLease as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ClaimAbandoned as exc:
            context.abort(grpc.StatusCode.CANCELLED, str(exc))

    def Abort(self, request: workers_pb2.AbortRequest, context: grpc.ServicerContext):
        return workers_pb2.AbortReply(found=self.loop.abort(request.request_id))

    def Load(self, request, context):
        return self.loop.call(worker_load, self.loop, self.fetcher)

    def ResetCache(self, request, context):
        evicted = self.loop.call(self.loop.engine.block_pool.reset_cache)
        return common_pb2.ResetCacheReply(num_evicted_blocks=evicted)
