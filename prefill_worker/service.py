"""The prefill worker's gRPC service: prefill a prompt's uncached suffix, return its first token at once,
and push the KV blocks the named decode worker lacks while the prefill computes.

With a decode target, a request first reserves room there (no room: an early RESOURCE_EXHAUSTED, before
any compute), then runs with a `KVWatch`: each layer's finished blocks go out on the Push stream while
the next layer computes (`kvtransfer.push`), over gRPC or, when the target shares this host, as block ids
the target copies from this worker's exported cache (`kvtransfer.same_host`). The engine pins what it
reports until the transfer is over; the blocks are given back whatever the outcome. The engine is
reached only through its `EngineLoop`; its prefix cache makes repeated prefixes cheap. A request whose
route names a `kv_holder` first fetches the leading blocks that worker holds and this one lacks
(`kvtransfer.fetch`); this worker serves its own blocks to others the same way (KVTransfer/Fetch).
The wire's rate its completed pushes' tails measured, by transport, is published with its load (`push_rates`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from splitserve.engine.kv_watch import KVWatch
from splitserve.engine.loop import EngineLoop
from splitserve.engine.rates import LineFit
from splitserve.kvtransfer.chunks import DEFAULT_CHUNK_BYTES
from splitserve.kvtransfer.fetch import Fetched, Fetcher, FetchServer
from splitserve.kvtransfer.push import KVPush
from splitserve.kvtransfer.requests import logprobs_to_proto, queue_request, worker_load
from splitserve.kvtransfer.same_host import SourceMaps, export_source, host_id
from splitserve.kvtransfer.stream import kv_layout
from splitserve.kvtransfer.transport import channel, push_stub
from splitserve.protos import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc, workers_pb2, workers_pb2_grpc
from splitserve.worker.options import KVOptions

WIRE_ENCODINGS = {"auto": "", "fp8": "fp8_e4m3"}  # --kv-wire-dtype → KVChunk.encoding


class PrefillService(workers_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        loop: EngineLoop,
        pool: str = "fresh",
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_queued_tokens: int | None = None,
        kv_transport: str = "auto",
        kv_lanes: int = KVOptions.lanes,
        kv_wire_dtype: str = "auto",
    ) -> None:
        """`max_queued_tokens`: the bound on prompt tokens waiting to be computed; a request past it is
        refused with RESOURCE_EXHAUSTED. None: unbounded. The kv_ options: see `KVOptions` (on CPU the
        same-host path needs the engine's caches in shared memory, `CacheConfig.shared_memory`).
        `kv_lanes`: the Push streams (each on its own connection) a transfer over gRPC is striped over
        (0: by device, `KVOptions.lanes_for`);
        `kv_wire_dtype`: "auto" sends the cache's dtype; "fp8" sends FP8 e4m3
        with per-block scales over gRPC (half the bytes of bf16; the same-host path copies the cache)."""
        if pool not in ("fresh", "warm"):
            raise ValueError(f"pool must be 'fresh' or 'warm', got {pool!r}")
        options = KVOptions(kv_transport, kv_lanes, kv_wire_dtype)  # raises ValueError for one out of range
        self.kv_encoding = WIRE_ENCODINGS[kv_wire_dtype]
        self.kv_lanes = options.lanes_for(loop.engine.device.type)
        self.max_queued_tokens = max_queued_tokens
        self.loop = loop
        self.pool = pool
        self.max_chunk_bytes = max_chunk_bytes
        engine = loop.engine
        self.layout = kv_layout(engine.kv_caches, engine.model_id)
        same_host = kv_transport == "auto"
        self.source = export_source(engine.kv_caches, engine.kv_memfd) if same_host else None
        self.host_id = host_id()
        self._channels: dict[tuple[str, int], grpc.Channel] = {}  # (address, lane) → channel
        sources = SourceMaps(self.layout, engine.device) if same_host else None
        self.fetcher = Fetcher(loop, self.layout, self._channel, sources)
        self.holder = FetchServer(loop, self.layout, self.source, max_chunk_bytes)
        self._lock = threading.Lock()
        self.push_rates = {transport: LineFit() for transport in ("grpc", "same-host")}  # wire bytes/s
        self._pushes = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kv-push")
        self._lanes = ThreadPoolExecutor(max_workers=256, thread_name_prefix="kv-lane")  # striped lanes 1..

    def close(self) -> None:
        self._pushes.shutdown(wait=True)
        self._lanes.shutdown(wait=True)
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()

    def Prefill(self, request: workers_pb2.PrefillRequest, context: grpc.ServicerContext):
        start = time.perf_counter()
        if not request.decode_address:
            outputs, fetched = queue_request(self.loop, context, request, self.max_queued_tokens,
                                             fetcher=self.fetcher, max_tokens=1)  # fmt: skip
            yield self._first_reply(self._first_token(context, outputs), start, fetched)
            return
        target = self._channel(request.decode_address)
        stub = kvtransfer_pb2_grpc.KVTransferStub(target)
        try:
            lease = stub.Reserve(self._reserve_request(request))
        except grpc.RpcError as exc:
            context.abort(exc.code(), f"decode worker {request.decode_address}: {exc.details()}")
        push = None
        if lease.num_cached_blocks < lease.num_blocks:
            push = self._new_push(request.decode_address, lease)
        try:
            yield from self._prefill_and_push(request, context, lease, push, start)
        finally:
            if push is not None and push.pinned:
                self.loop.call(self.loop.engine.unpin_kv, push.pinned)

    def _new_push(self, address: str, lease: kvtransfer_pb2.ReserveReply) -> KVPush:
        source = self.source if self._same_host(lease) else None
        kv_caches = self.loop.engine.kv_caches
        lanes = 1 if source is not None else self.kv_lanes
        pushes = [push_stub(self._channel(address, lane)) for lane in range(lanes)]
        return KVPush(pushes, kv_caches, self.layout, lease.lease_id, self.max_chunk_bytes, source,
                      self.kv_encoding, self._lanes)  # fmt: skip

    def _prefill_and_push(self, request, context, lease, push: KVPush | None, start: float):
        """Run the prefill with its transfer; reply with the first token, then with the transfer's end.
        Every way out but a completed transfer releases the decode worker's lease."""
        rid = request.request_id
        watch = KVWatch(push.on_ready, lease.num_cached_blocks) if push is not None else None
        transfer, completed = None, False
        try:
            outputs, fetched = queue_request(self.loop, context, request, self.max_queued_tokens, watch,
                                             self.fetcher, max_tokens=1)  # fmt: skip
            if push is not None:
                transfer = self._pushes.submit(push.run)
            context.add_callback(lambda: self.loop.abort(rid))  # no-op once finished; frees work if cancelled
            first = self._first_reply(self._first_token(context, outputs), start, fetched)
            first.lease_id = lease.lease_id
            yield first
            reply = workers_pb2.PrefillReply(
                first_token_id=first.first_token_id, num_cached_tokens=first.num_cached_tokens,
                lease_id=lease.lease_id, num_blocks_skipped=lease.num_cached_blocks,
                num_blocks_sent=lease.num_blocks - lease.num_cached_blocks, transfer_done=True,
                transport="none" if push is None else push.transport,
            )  # fmt: skip
            if transfer is not None:
                transfer.result()
                reply.bytes_sent = push.bytes_sent
                self.push_rates[push.transport].observe(*push.tail)
            completed = True
            reply.transfer_tail_ms = (time.perf_counter() - start) * 1e3 - first.first_token_ms
            yield reply
        except grpc.RpcError as exc:
            if transfer is not None and transfer.done() and transfer.exception() is exc:
                # UNAVAILABLE: the caller may recompute on another prefill worker (its failure policy)
                target = request.decode_address
                detail = f"KV transfer to {target} failed ({exc.code().name}): {exc.details()}"
                context.abort(grpc.StatusCode.UNAVAILABLE, detail)
            raise
        finally:
            if push is not None:
                push.abort()  # no-op after the last chunk; else the stream ends short and the lease fails
            if transfer is not None:
                with contextlib.suppress(grpc.RpcError):
                    transfer.result()
            if not completed:
                self._release(request.decode_address, lease.lease_id, f"prefill of {rid!r} did not complete")

    @staticmethod
    def _first_token(context, outputs):
        out = outputs.get()
        while not out.finished:
            out = outputs.get()
        if not out.new_token_ids:
            context.abort(grpc.StatusCode.ABORTED, f"request {out.request_id!r} was aborted during prefill")
        return out

    @staticmethod
    def _first_reply(out, start: float, fetched: Fetched) -> workers_pb2.PrefillReply:
        reply = workers_pb2.PrefillReply(
            first_token_id=out.new_token_ids[0], num_cached_tokens=out.num_cached_tokens,
            first_token_ms=(time.perf_counter() - start) * 1e3, num_fetched_blocks=fetched.num_blocks,
            fetch_fallback=fetched.fallback,
        )  # fmt: skip
        if out.logprobs:
            reply.first_token_logprob.CopyFrom(logprobs_to_proto(out.logprobs)[0])
        return reply

    def _reserve_request(self, request: workers_pb2.PrefillRequest) -> kvtransfer_pb2.ReserveRequest:
        salt = request.cache_salt if request.HasField("cache_salt") else None
        return kvtransfer_pb2.ReserveRequest(
            request_id=request.request_id, layout=self.layout, prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling, cache_salt=salt, lease_ms=request.lease_ms,
        )  # fmt: skip

    def _same_host(self, lease: kvtransfer_pb2.ReserveReply) -> bool:
        device = self.loop.engine.device.type
        return self.source is not None and lease.host_id == self.host_id and device in lease.same_host_devices

    def _release(self, address: str, lease_id: str, reason: str) -> None:
        """Give the decode worker's lease up (best effort: an unreachable worker's lease expires)."""
        stub = kvtransfer_pb2_grpc.KVTransferStub(self._channel(address))
        with contextlib.suppress(grpc.RpcError):
            stub.Release(kvtransfer_pb2.ReleaseRequest(lease_id=lease_id, reason=reason), timeout=5.0)

    def Fetch(self, request: kvtransfer_pb2.FetchRequest, context: grpc.ServicerContext):
        """KVTransfer/Fetch: serve blocks this worker holds to another (`kvtransfer.fetch`)."""
        yield from self.holder.Fetch(request, context)

    def Load(self, request, context):
        return self.loop.call(worker_load, self.loop, self.fetcher, self.push_rates)

    def ResetCache(self, request, context):
        evicted = self.loop.call(self.loop.engine.block_pool.reset_cache)
        return common_pb2.ResetCacheReply(num_evicted_blocks=evicted)

    def _channel(self, address: str, lane: int = 0) -> grpc.Channel:
        with self._lock:
            if (address, lane) not in self._channels:
                self._channels[address, lane] = channel(address, lane)
            return self._channels[address, lane]
