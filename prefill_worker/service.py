"""The prefill worker's gRPC service: prefill a prompt's uncached suffix, return its first token, and push
the KV blocks the named decode worker lacks.

The engine is reached only through its `EngineLoop`; its prefix cache makes repeated prefixes cheap.
The request's blocks are held from the end of its prefill until the push is over (acknowledged or
failed), then released, so a failed transfer never leaks them. The push starts after the prefill step
(layer-wise overlap with compute is not done yet).
"""

from __future__ import annotations

import threading
import time

import grpc

from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.chunks import DEFAULT_CHUNK_BYTES
from splitserve.kvtransfer.events import EventHub, serve_events
from splitserve.kvtransfer.requests import queue_request, worker_load
from splitserve.kvtransfer.stream import kv_layout, send_frames
from splitserve.kvtransfer.transport import channel, push_stub
from splitserve.protos import kvtransfer_pb2, kvtransfer_pb2_grpc, workers_pb2, workers_pb2_grpc


class PrefillService(workers_pb2_grpc.PrefillWorkerServicer):
    def __init__(
        self,
        loop: EngineLoop,
        pool: str = "fresh",
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_queued_tokens: int | None = None,
    ) -> None:
        """`max_queued_tokens`: the bound on prompt tokens waiting to be computed; a request past it is
        refused with RESOURCE_EXHAUSTED. None: unbounded."""
        self.max_queued_tokens = max_queued_tokens
        if pool not in ("fresh", "warm"):
            raise ValueError(f"pool must be 'fresh' or 'warm', got {pool!r}")
        self.loop = loop
        self.pool = pool
        self.max_chunk_bytes = max_chunk_bytes
        self.layout = kv_layout(loop.engine.runner.kv_caches, loop.engine.model_id)
        self.events = EventHub()
        loop.call(loop.engine.block_pool.add_listener, self.events.publish)
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def Prefill(self, request: workers_pb2.PrefillRequest, context: grpc.ServicerContext):
        start = time.perf_counter()
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        push = bool(request.decode_address)
        outputs = queue_request(
            self.loop, context, request, self.max_queued_tokens, hold_kv=push, max_tokens=1
        )  # the first token only
        context.add_callback(lambda: self.loop.abort(rid))  # no-op once finished; frees work if cancelled
        out = outputs.get()
        while not out.finished:
            out = outputs.get()
        if not out.new_token_ids:
            context.abort(grpc.StatusCode.ABORTED, f"request {rid!r} was aborted during prefill")
        first_ms = (time.perf_counter() - start) * 1e3
        reply = workers_pb2.PrefillReply(
            first_token_id=out.new_token_ids[0], num_cached_tokens=out.num_cached_tokens,
            first_token_ms=first_ms,
        )  # fmt: skip
        if push:
            try:
                self._push(request, prompt, reply)
            except grpc.RpcError as exc:
                context.abort(exc.code(), f"KV transfer to {request.decode_address} failed: {exc.details()}")
            finally:
                self.loop.call(self.loop.engine.release_kv, rid)
            reply.transfer_tail_ms = (time.perf_counter() - start) * 1e3 - first_ms
        return reply

    def _push(self, request: workers_pb2.PrefillRequest, prompt: list[int], reply: workers_pb2.PrefillReply):
        """Reserve on the decode worker, then stream the blocks it lacks."""
        stub = kvtransfer_pb2_grpc.KVTransferStub(self._channel(request.decode_address))
        salt = request.cache_salt if request.HasField("cache_salt") else None
        reservation = stub.Reserve(kvtransfer_pb2.ReserveRequest(
            request_id=request.request_id, layout=self.layout, prompt_token_ids=prompt,
            sampling=request.sampling, cache_salt=salt, lease_ms=request.lease_ms,
        ))  # fmt: skip
        block_ids = self.loop.call(self.loop.engine.held_kv, request.request_id)
        first = reservation.num_cached_blocks
        if first < len(block_ids):
            kv_caches = self.loop.engine.runner.kv_caches
            lease = reservation.lease_id
            push = push_stub(self._channel(request.decode_address))
            push(send_frames(kv_caches, self.layout, block_ids, first, lease, self.max_chunk_bytes))
        reply.lease_id = reservation.lease_id
        reply.num_blocks_sent = len(block_ids) - first
        reply.num_blocks_skipped = first

    def Events(self, request, context):
        return serve_events(self.events, context)

    def Load(self, request, context):
        return self.loop.call(worker_load, self.loop.engine)

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = channel(address)
            return self._channels[address]
