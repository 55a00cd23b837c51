"""The decode worker's gRPC services: KVTransfer (receive a prompt's KV under a lease) and DecodeWorker
(generate, streaming tokens; abort; load).

Owns the leases of incoming transfers and the sinks writing their chunks into reserved blocks. The
engine is reached only through its `EngineLoop`. A lease ends exactly once: acknowledged when
`Generate` admits its request, released on a bad chunk, a broken stream or `Release`, expired when
neither pushes nor `Generate` come in time — released and expired leases free their blocks.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import grpc

from splitserve.engine.block_pool import OutOfKVBlocks
from splitserve.engine.errors import InvalidRequest
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.ahead import read_ahead
from splitserve.kvtransfer.chunks import check_layout
from splitserve.kvtransfer.errors import (
    CorruptChunk,
    LayoutMismatch,
    LeaseNotFound,
    MalformedChunk,
)
from splitserve.kvtransfer.fetch import Fetcher, FetchServer
from splitserve.kvtransfer.frames import decode_frame
from splitserve.kvtransfer.leases import Lease, LeaseTable, TransferState
from splitserve.kvtransfer.requests import queue_request, sampling_from_proto, worker_load
from splitserve.kvtransfer.same_host import SourceMaps, export_source, host_id
from splitserve.kvtransfer.stream import ChunkSink, kv_layout
from splitserve.kvtransfer.transport import channel
from splitserve.protos import common_pb2, kvtransfer_pb2, kvtransfer_pb2_grpc, workers_pb2, workers_pb2_grpc

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 0.5


class DecodeService(kvtransfer_pb2_grpc.KVTransferServicer, workers_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, loop: EngineLoop, lease_ttl_s: float = 10.0, max_queued_tokens: int | None = None):
        """`max_queued_tokens`: the bound on prompt tokens waiting to be computed here (local prefills);
        a request past it is refused with RESOURCE_EXHAUSTED. None: unbounded."""
        self.loop = loop
        self.max_queued_tokens = max_queued_tokens
        engine = loop.engine
        self.layout = kv_layout(engine.kv_caches, engine.model_id)
        self.lease_ttl_s = lease_ttl_s
        self._lock = threading.Lock()  # leases and sinks; never held while waiting on the network
        self._lease_changed = threading.Condition(self._lock)  # a lease completed or ended
        self.leases = LeaseTable(self._free_lease_blocks)
        self.sources = SourceMaps(self.layout, engine.device)
        self.host_id = host_id()
        self._channels: dict[str, grpc.Channel] = {}  # fetch holders' address → channel
        self.fetcher = Fetcher(loop, self.layout, self._channel, self.sources)
        source = export_source(engine.kv_caches, engine.kv_memfd)
        self.holder = FetchServer(loop, self.layout, source)
        self._sinks: dict[str, ChunkSink] = {}
        self._stopped = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="lease-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stopped.set()
        self._reaper.join()
        with self._lock:
            self.leases.release_all("worker stopping")
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
            check_layout(self.layout, request.layout)
            params = sampling_from_proto(request.sampling)
            salt = request.cache_salt if request.HasField("cache_salt") else None
            with self._lock:  # a retried prefill (another worker, same request) replaces its lease
                old = self.leases.open_lease_of(request.request_id)
                if old is not None:
                    self.leases.release(old.lease_id, "superseded by a new reservation", TransferState.FAILED)
            reservation = self.loop.call(
                self.loop.engine.reserve_kv, request.request_id, list(request.prompt_token_ids), params, salt
            )
        except (LayoutMismatch, InvalidRequest) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OutOfKVBlocks as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for the request's KV: {exc}")
        ttl_s = request.lease_ms / 1000 if request.lease_ms else self.lease_ttl_s
        with self._lock:
            lease = self.leases.grant(
                request.request_id, reservation.block_ids, reservation.num_cached_blocks, ttl_s
            )
            self._sinks[lease.lease_id] = ChunkSink(
                self.loop.engine.kv_caches, self.layout, reservation.block_ids,
                reservation.num_cached_blocks, self.sources,
            )  # fmt: skip
            # Every block already held (a full-block prompt, all cached): nothing will be pushed.
            lease.kv_complete = reservation.num_cached_blocks == len(reservation.block_ids)
        return kvtransfer_pb2.ReserveReply(
            lease_id=lease.lease_id, num_cached_blocks=reservation.num_cached_blocks,
            num_blocks=len(reservation.block_ids), lease_ms=int(ttl_s * 1000), host_id=self.host_id,
            same_host_devices=[self.loop.engine.device.type],
        )  # fmt: skip

    def Push(self, request_iterator, context: grpc.ServicerContext):
        """One lane of a transfer (all of it, unstriped): its chunks stored as they come; the reply once
        its last chunk is in, COMPLETE when every lane's is (the lease then waits for Generate)."""
        lease_id, sink, lane = "", None, None
        try:
            # Raw frames (see kvtransfer.frames), the next one read off the stream while this one is stored.
            for frame in read_ahead(request_iterator, name="kv-receive", wait=False):
                header, payload = decode_frame(frame)
                with self._lock:
                    lease = self.leases.get(header.lease_id)
                    lease_id, sink = lease.lease_id, self._sinks[lease.lease_id]
                if lane is None:
                    lane = header.lane
                elif header.lane != lane:
                    raise MalformedChunk(f"a Push stream of lane {lane} carries one of lane {header.lane}")
                # Outside the service lock, so transfers (and a transfer's lanes) are stored side by side;
                # the sink keeps the lease's blocks from being freed while a chunk is written into them.
                sink.accept(header, payload)
                with self._lock:
                    self.leases.renew(self.leases.get(lease_id))
        except LeaseNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (MalformedChunk, CorruptChunk) as exc:
            self._fail(lease_id, str(exc))
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(grpc.StatusCode.DATA_LOSS if isinstance(exc, CorruptChunk) else code, str(exc))
        if sink is None or not sink.validator.lane_done(lane):
            self._fail(lease_id, "the push ended before every block arrived")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the push ended before every block arrived")
        with self._lock:
            try:
                lease = self.leases.get(lease_id)
            except LeaseNotFound as exc:  # ended meanwhile (another lane failed, or it expired)
                context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            complete = sink.complete and not lease.kv_complete  # the last lane in completes the lease
            if complete:
                lease.kv_complete = True  # waits for Generate, under the same time-to-live
                self._lease_changed.notify_all()
            self.leases.renew(lease)
        return kvtransfer_pb2.PushReply(
            state=kvtransfer_pb2.COMPLETE if complete else kvtransfer_pb2.RECEIVING,
            chunks_received=sink.validator.next_seq, bytes_received=sink.validator.bytes_received,
        )  # fmt: skip

    def Release(self, request: kvtransfer_pb2.ReleaseRequest, context: grpc.ServicerContext):
        try:
            with self._lock:
                lease = self.leases.release(request.lease_id, request.reason or "released by the sender")
        except LeaseNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return kvtransfer_pb2.ReleaseReply(state=lease.state.value)

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
            out = outputs.get()
            reason = out.finish_reason.value if out.finished else ""
            tokens, cached = list(out.new_token_ids), out.num_cached_tokens
            chunk = workers_pb2.TokenChunk(token_ids=tokens, finish_reason=reason, num_cached_tokens=cached)
            if first and not request.lease_id:
                chunk.num_fetched_blocks, chunk.fetch_fallback = fetched.num_blocks, fetched.fallback
            first = False
            yield chunk
            if out.finished:
                finished.set()
                return

    def _claim(self, request: workers_pb2.GenerateRequest, context: grpc.ServicerContext) -> None:
        """Wait until the request's lease holds all its KV (the transfer may still be running: the
        caller starts Generate as soon as the prefill worker has the first token), then end the lease
        by acknowledgement: the blocks now belong to the request. Aborts the RPC when the lease ends
        otherwise (failed, released, expired: NOT_FOUND with the reason) or does not match the request,
        leaving a matching lease as it was."""
        if not request.HasField("first_token_id"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a request with pushed KV needs first_token_id")
        if request.prompt_token_ids or request.HasField("sampling") or request.HasField("cache_salt"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a request with pushed KV takes its prompt, "
                          "sampling and cache salt from its lease: send none")  # fmt: skip
        with self._lease_changed:
            while True:
                try:
                    lease = self.leases.get(request.lease_id)
                except LeaseNotFound as exc:
                    detail = f"the KV of {request.request_id!r} did not arrive: {exc}"
                    context.abort(grpc.StatusCode.NOT_FOUND, detail)
                if lease.request_id != request.request_id:
                    context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"lease {lease.lease_id!r} is not for request {request.request_id!r}",
                    )
                if lease.kv_complete:
                    break
                if not context.is_active():
                    context.abort(grpc.StatusCode.CANCELLED, "the caller went away")
                self._lease_changed.wait(timeout=REAP_INTERVAL_S)
            self.leases.acknowledge(lease.lease_id)
            del self._sinks[lease.lease_id]

    def Abort(self, request: workers_pb2.AbortRequest, context: grpc.ServicerContext):
        return workers_pb2.AbortReply(found=self.loop.abort(request.request_id))

    def Fetch(self, request: kvtransfer_pb2.FetchRequest, context: grpc.ServicerContext):
        """Serve blocks this worker holds to another (`kvtransfer.fetch`)."""
        yield from self.holder.fetch(request, context)

    def Load(self, request, context):
        return self.loop.call(worker_load, self.loop, self.fetcher)

    def ResetCache(self, request, context):
        evicted = self.loop.call(self.loop.engine.block_pool.reset_cache)
        return common_pb2.ResetCacheReply(num_evicted_blocks=evicted)

    # ------------------------------------------------------------------------------------------- leases

    def _fail(self, lease_id: str, reason: str) -> None:
        with self._lock, contextlib.suppress(LeaseNotFound):  # already ended
            self.leases.release(lease_id, reason, TransferState.FAILED)

    def _free_lease_blocks(self, lease: Lease) -> None:
        """LeaseTable callback (under self._lock): a released or expired lease gives its blocks back."""
        log.info("lease %s ended: %s (%s)", lease.lease_id, lease.state.name, lease.reason)
        sink = self._sinks.pop(lease.lease_id, None)
        if sink is not None:
            sink.close()  # waits for a chunk being written into these blocks
        self._lease_changed.notify_all()
        self.loop.call(self.loop.engine.cancel_kv, lease.request_id)

    def _reap(self) -> None:
        while not self._stopped.wait(REAP_INTERVAL_S):
            with self._lock:
                self.leases.expire_overdue()

