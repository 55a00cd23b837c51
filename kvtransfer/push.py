"""The sending side of one transfer: a prefill engine's layer-by-layer KV reports (`engine.kv_watch`)
become chunks on one Push stream while the prefill still computes, so that when the last layer of the
last prefill step is done only that layer's blocks remain to travel.

Two ways for the bytes: over the wire (each chunk's blocks gathered into a checksummed frame; on CUDA the
gather and the copy to the host run on a side stream once the layer's event has fired, never behind the
rest of the prefill), striped over one Push stream per lane (lane i carries the layers l with
l % lanes == i; each lane on its own channel, so its frames are prepared, sent, checked and stored beside
the others': grpcio keeps one message in flight per stream), or same-host on one stream (chunks name the
sender's block ids and the receiver copies them from the exported `KVSource`).

A transfer's tail is measured (`tail`): the bytes still to send when the engine reported its last layer
ready, and the time from then to the receiver's completing reply. That is the wire's own cost, whatever the
prefill's length: `PrefillService` fits the wire's rate per transport to its pushes' tails, for the
router's cost model (whose transfer tail is max(latency, bytes / rate − the prefill's compute)).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from splitserve.engine.kv_watch import KVReady
from splitserve.kvtransfer.ahead import read_ahead
from splitserve.kvtransfer.chunks import ChunkSpan, block_bytes, lane_of, plan_chunks, same_host_header
from splitserve.kvtransfer.stream import wire_frame
from splitserve.protos import common_pb2, kvtransfer_pb2

_END = object()  # the engine will report nothing more (the request ended early): close the stream
# What a lane meets when another lane's failure ended the transfer first.
_CONSEQUENCES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED)


class KVPush:
    """One request's KV, blocks [first_block, num_blocks) of every layer, to one receiver's lease.

    `pushes`: the Push callables of the lanes (one per channel to the receiver; the same-host path uses
    the first alone). `on_ready` is the request's `KVWatch` callback (engine thread). `run` (any other
    thread) performs the Push RPCs until every lane's last chunk is acknowledged and returns the
    receiver's completing `PushReply`, or raises the first lane's `grpc.RpcError`. `abort` ends the
    streams early (the prefill was aborted): the receiver then fails the lease. `pinned` lists the blocks
    the engine pinned for this transfer: the owner gives them back (`Engine.unpin_kv`) once the request
    has ended and `run` has returned. `lanes_pool`: the threads that run lanes 1.. of striped transfers
    (a worker's, shared by its transfers; None: this transfer starts its own)."""

    def __init__(
        self,
        pushes: Sequence[grpc.StreamUnaryMultiCallable],
        kv_caches: list[torch.Tensor],
        layout: common_pb2.KVLayout,
        lease_id: str,
        max_chunk_bytes: int,
        source: kvtransfer_pb2.KVSource | None = None,
        encoding: str = "",
        lanes_pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self.kv_caches = kv_caches
        self.layout = layout
        self.lease_id = lease_id
        self.max_chunk_bytes = max_chunk_bytes
        self.source = source  # None: over the wire
        self.encoding = encoding if source is None else ""  # the wire's (see KVChunk.encoding)
        self.transport = "grpc" if source is None else "same-host"
        lanes = 1 if source is not None else max(1, min(len(pushes), layout.num_layers))
        self._pushes = list(pushes[:lanes])
        self.num_lanes = lanes
        self.pinned: list[int] = []
        self._block_bytes = block_bytes(layout, self.encoding)  # as sent
        self._reports: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(lanes)]
        self._sent = [0] * lanes  # bytes per lane
        self._lock = threading.Lock()
        self._lanes_pool = lanes_pool  # runs lanes 1.. (None: a pool of this transfer's own)
        self._last_ready: tuple[float, int] | None = None  # (perf_counter, bytes sent): last report
        self.tail = (0, 0.0)  # (bytes, seconds) after the last layer's report, once `run` has returned

    @property
    def bytes_sent(self) -> int:
        return sum(self._sent)

    def on_ready(self, ready: KVReady) -> None:
        if ready.layer == 0:  # one pin per block, whatever the number of layers
            with self._lock:
                self.pinned.extend(ready.block_ids)
        if ready.last and ready.layer == self.layout.num_layers - 1:
            self._last_ready = (time.perf_counter(), self.bytes_sent)
        self._reports[lane_of(ready.layer, self.num_lanes)].put(ready)

    def abort(self) -> None:
        """End the streams where they are (the request ended early); the receiver fails the lease."""
        for reports in self._reports:
            reports.put(_END)

    def run(self) -> kvtransfer_pb2.PushReply:
        if self.num_lanes == 1:
            reply = self._pushes[0](self._chunks(0))
        elif self._lanes_pool is None:
            with ThreadPoolExecutor(self.num_lanes - 1, thread_name_prefix="kv-lane") as own:
                reply = self._striped(own)
        else:
            reply = self._striped(self._lanes_pool)
        if self._last_ready is not None:
            at, sent = self._last_ready
            self.tail = (self.bytes_sent - sent, time.perf_counter() - at)
        return reply

    def _striped(self, lanes: ThreadPoolExecutor) -> kvtransfer_pb2.PushReply:
        """Lane 0 on this thread, the others on `lanes`; every lane's result waited for."""
        others = [lanes.submit(self._pushes[i], self._chunks(i)) for i in range(1, self.num_lanes)]
        try:
            replies = [self._pushes[0](self._chunks(0))]
        except grpc.RpcError as exc:
            self.abort()  # the other lanes end too (the receiver fails the lease anyway)
            errors = [exc] + [e for f in others if isinstance(e := f.exception(), grpc.RpcError)]
            # The root cause, not a lane that found the lease already failed by another.
            raise next((e for e in errors if e.code() not in _CONSEQUENCES), exc) from None
        replies += [f.result() for f in others]
        return next((r for r in replies if r.state == kvtransfer_pb2.COMPLETE), replies[-1])

    def _chunks(self, lane: int) -> Iterator[bytes]:
        """A lane's messages. Wire frames are prepared on a helper thread, at most two ahead (the gather,
        the copy from the device and the checksum release the GIL), while gRPC sends."""
        if self.source is not None:
            yield from (self._same_host_chunk(*piece) for piece in self._pieces(lane))
            return
        frames = (self._wire_frame(*piece) for piece in self._pieces(lane))
        yield from read_ahead(frames, name=f"kv-frames-{lane}")

    def _pieces(self, lane: int) -> Iterator[tuple[int, ChunkSpan, tuple[int, ...], KVReady, bool]]:
        """(seq, span, block ids, report, last) of each chunk of a lane, in sending order, as the engine
        reports its layers. Wire chunks are bounded by `max_chunk_bytes`; a same-host chunk takes a whole
        report (it carries block ids, not bytes)."""
        seq, last_layer = 0, max(range(lane, self.layout.num_layers, self.num_lanes))
        while True:
            ready = self._reports[lane].get()
            if ready is _END:
                return
            final = ready.last and ready.layer == last_layer
            if self.source is None:
                spans = plan_chunks(
                    self.layout, ready.start, len(ready.block_ids), self.max_chunk_bytes,
                    layers=range(ready.layer, ready.layer + 1),
                )  # fmt: skip
            else:
                spans = [ChunkSpan(ready.layer, ready.start, len(ready.block_ids))]
            for i, span in enumerate(spans):
                offset = span.first_block - ready.start
                ids = ready.block_ids[offset : offset + span.num_blocks]
                yield seq, span, ids, ready, final and i == len(spans) - 1
                self._sent[lane] += span.num_blocks * self._block_bytes
                seq += 1
            if final:
                return

    def _wire_frame(self, seq: int, span: ChunkSpan, ids, ready: KVReady, last: bool) -> bytes:
        return wire_frame(self.kv_caches[span.layer], ids, self.lease_id, seq, span, last, ready.event,
                          self.num_lanes, self.encoding)  # fmt: skip

    def _same_host_chunk(self, seq: int, span: ChunkSpan, ids, ready: KVReady, last: bool) -> bytes:
        if ready.event is not None:
            ready.event.synchronize()  # the receiver reads these blocks as soon as it has the chunk
        source = self.source if seq == 0 else None
        return same_host_header(self.lease_id, seq, span, ids, last, source).SerializeToString()
