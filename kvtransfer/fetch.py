"""Fetching a prompt's leading blocks from the worker that holds them, instead of recomputing them.

Any worker serves blocks it holds (`FetchServer`, the KVTransfer/Fetch RPC): it pins the longest run of
the asked block hashes it holds, streams them as KV frames (over the wire, checksummed; or, when the
receiver shares its host and device, as block ids the receiver copies from its exported cache) and
unpins them when the stream ends, however it ends. The receiver (`fetch_prefix`) reserves room for the
blocks it lacks (`Engine.prefix_room`), checks and stores the frames with the same `ChunkSink` a push
uses, and on success the blocks join its prefix cache just before its request is queued
(`Engine.fill_prefix`): the request then finds them as prefix hits. Delta only: the receiver asks for
the blocks after those it holds. A failure of any kind (holder gone, holds none, stalled past the
deadline, a bad frame) gives the room back and leaves the request to recompute, with the reason counted.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from splitserve.engine.block_pool import OutOfKVBlocks
from splitserve.engine.config import average_step_time
from splitserve.engine.engine import PrefixRoom
from splitserve.engine.errors import InvalidRequest
from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.ahead import read_ahead
from splitserve.kvtransfer.chunks import (
    DEFAULT_CHUNK_BYTES,
    ChunkSpan,
    check_layout,
    chunk_header,
    plan_chunks,
    same_host_header,
)
from splitserve.kvtransfer.errors import CorruptChunk, LayoutMismatch, MalformedChunk
from splitserve.kvtransfer.frames import decode_frame, encode_frame
from splitserve.kvtransfer.same_host import SourceMaps, host_id
from splitserve.kvtransfer.stream import ChunkSink
from splitserve.kvtransfer.tensors import wire_payload
from splitserve.protos import common_pb2, kvtransfer_pb2, workers_pb2

log = logging.getLogger(__name__)
_FETCH = "/splitserve.v1.KVTransfer/Fetch"
DEFAULT_FETCH_TIMEOUT_S = 10.0


def fetch_stub(ch: grpc.Channel) -> grpc.UnaryStreamMultiCallable:
    """Fetch returning frames (bytes) as they come: `fetch_stub(ch)(FetchRequest) -> iter of frames`."""
    return ch.unary_stream(_FETCH, request_serializer=kvtransfer_pb2.FetchRequest.SerializeToString,
                           response_deserializer=None)  # fmt: skip


class FetchServer:
    """The holder's side: serves the blocks of its engine's prefix cache that a Fetch asks for. `source`:
    this worker's exported cache (`same_host.export_source`) for receivers on its host, None: wire only."""

    def __init__(
        self,
        loop: EngineLoop,
        layout: common_pb2.KVLayout,
        source: kvtransfer_pb2.KVSource | None = None,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.loop = loop
        self.layout = layout
        self.source = source
        self.max_chunk_bytes = max_chunk_bytes
        self.host_id = host_id()

    def Fetch(self, request: kvtransfer_pb2.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """KVTransfer/Fetch (a servicer method: `transport.add_kvtransfer_servicer` registers it)."""
        try:
            check_layout(self.layout, request.layout)
        except LayoutMismatch as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        engine = self.loop.engine
        block_ids, written = self.loop.call(self._pin, list(request.block_hashes))
        if not block_ids:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this worker holds none of the blocks asked")
        pinned = threading.Lock()  # held while pinned: the blocks are given back once, however the RPC ends

        def unpin() -> None:
            if pinned.acquire(blocking=False):
                self.loop.call(engine.unpin_kv, block_ids)

        context.add_callback(unpin)  # a cancelled stream's generator may be closed only much later
        try:
            same_host = (self.source is not None and request.host_id == self.host_id
                         and engine.device.type in request.same_host_devices)  # fmt: skip
            frames = self._frames(request, block_ids, written, same_host)
            yield from read_ahead(frames, name="kv-fetch-frames")
        finally:
            unpin()

    def _pin(self, block_hashes: list) -> tuple[list[int], torch.cuda.Event | None]:
        """(On the loop thread.) The blocks, pinned, and on CUDA an event after every launched step: a
        block committed to the prefix cache may still be being written by the step in flight."""
        block_ids = self.loop.engine.pin_prefix(block_hashes)
        if self.loop.engine.device.type != "cuda":
            return block_ids, None
        event = torch.cuda.Event()
        event.record()
        return block_ids, event

    def _frames(self, request, block_ids: list[int], written, same_host: bool) -> Iterator[bytes]:
        """Every layer's blocks in sending order (wire chunks bounded by `max_chunk_bytes`; a same-host
        chunk is a whole layer's ids). Chunk 0 says how many blocks come; the last is marked."""
        first, count = request.first_block, len(block_ids)
        if same_host:
            if written is not None:
                written.synchronize()  # the receiver copies the blocks as soon as it has the chunk
            spans = [ChunkSpan(layer, first, count) for layer in range(self.layout.num_layers)]
        else:
            spans = plan_chunks(self.layout, first, count, self.max_chunk_bytes)
        caches = self.loop.engine.kv_caches
        for seq, span in enumerate(spans):
            ids = block_ids[span.first_block - first : span.first_block - first + span.num_blocks]
            last = seq == len(spans) - 1
            total = count if seq == 0 else 0
            if same_host:
                header = same_host_header(request.request_id, seq, span, ids, last,
                                          self.source if seq == 0 else None)  # fmt: skip
                header.total_blocks = total
                yield header.SerializeToString()
                continue
            with wire_payload(caches[span.layer], ids, written) as (payload, fletcher):
                header = chunk_header(request.request_id, seq, span, payload, last, fletcher=fletcher)
                header.total_blocks = total
                frame = encode_frame(header, payload)
            yield frame


@dataclass(frozen=True)
class Fetched:
    """What `fetch_prefix` did. `room` (None when nothing was fetched) holds the received blocks: pass it
    to `Engine.fill_prefix` with `num_blocks` in the call that queues the request."""

    room: PrefixRoom | None
    num_blocks: int = 0  # blocks received
    nbytes: int = 0
    seconds: float = 0.0
    fallback: str = ""  # why a planned fetch was not used ("" when it was, or none was planned)


class Fetcher:
    """A worker's receiving side of fetches: `channel(address)` gives its channel to a holder (shared with
    its other traffic), `sources` maps same-host holders' caches (None: over the wire only). Counts what
    it fetched and why planned fetches fell back (thread-safe)."""

    def __init__(
        self,
        loop: EngineLoop,
        layout: common_pb2.KVLayout,
        channel: Callable[[str], grpc.Channel],
        sources: SourceMaps | None,
        timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
    ) -> None:
        self.loop = loop
        self.layout = layout
        self.sources = sources
        self.timeout_s = timeout_s
        self._channel = channel
        self._lock = threading.Lock()
        self.fetched_bytes = 0
        self.fallbacks: collections.Counter[str] = collections.Counter()
        # What a fetch costs here, as measured (moving averages of the successful ones; 0: none yet).
        self.mean_s = 0.0
        self.mean_bytes = 0.0

    def fetch(self, request: workers_pb2.PrefillRequest | workers_pb2.GenerateRequest) -> Fetched:
        """The blocks of `request`'s prompt its `kv_holder` holds and this engine lacks (`fetch_prefix`)."""
        salt = request.cache_salt if request.HasField("cache_salt") else None
        fetched = fetch_prefix(
            self.loop, request.kv_holder, lambda address: fetch_stub(self._channel(address)),
            request.request_id, list(request.prompt_token_ids), salt, self.layout, self.sources,
            self.timeout_s,
        )  # fmt: skip
        with self._lock:
            self.fetched_bytes += fetched.nbytes
            if fetched.fallback:
                self.fallbacks[fetched.fallback] += 1
            if fetched.num_blocks:
                self.mean_s = average_step_time(self.mean_s, fetched.seconds)
                self.mean_bytes = average_step_time(self.mean_bytes, fetched.nbytes)
        return fetched

    def fill(self, fetched: Fetched) -> int:
        """(On the loop thread, in the call that queues the request.) Put the fetched blocks in the prefix
        cache; returns the prompt tokens they hold."""
        if fetched.room is None:
            return 0
        self.loop.engine.fill_prefix(fetched.room, fetched.num_blocks)
        return fetched.num_blocks * self.loop.engine.kv.block_size


def fetch_prefix(
    loop: EngineLoop,
    holder: workers_pb2.KVHolder,
    fetch: Callable[[str], grpc.UnaryStreamMultiCallable],
    request_id: str,
    prompt_token_ids: list[int],
    cache_salt: str | None,
    layout: common_pb2.KVLayout,
    sources: SourceMaps | None,
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
) -> Fetched:
    """Receive the prompt's leading blocks this engine lacks from `holder` (at most the blocks that leave
    its last token to compute: it gives the first token). `fetch(address)` gives the Fetch callable for
    an address. Never raises for a failed fetch: the reason is in `fallback` and the room is returned."""
    engine = loop.engine
    bs = engine.kv.block_size
    wanted = min(holder.num_blocks, (len(prompt_token_ids) - 1) // bs)
    if not holder.address or wanted <= 0 or not engine.block_pool.enable_caching:
        return Fetched(None)
    start = time.perf_counter()
    try:
        room = loop.call(engine.prefix_room, prompt_token_ids, cache_salt, wanted)
    except InvalidRequest:
        return Fetched(None)  # queueing the request raises it again, with its own status
    except OutOfKVBlocks:
        return Fetched(None, fallback="no_room")
    if room.num_missing == 0:  # it holds them all already (the index lagged)
        loop.call(engine.fill_prefix, room, 0)
        return Fetched(None)
    try:
        num, nbytes = _receive(room, holder, fetch, request_id, layout, sources, timeout_s, engine)
    except grpc.RpcError as exc:
        reason = (
            "holds_none" if exc.code() is grpc.StatusCode.FAILED_PRECONDITION else exc.code().name.lower()
        )
        return _fallback(loop, room, reason, f"{exc.code().name}: {exc.details()}", holder, request_id)
    except (MalformedChunk, CorruptChunk) as exc:
        reason = "corrupt" if isinstance(exc, CorruptChunk) else "malformed"
        return _fallback(loop, room, reason, str(exc), holder, request_id)
    except Exception as exc:  # anything else: still the room back, and the request recomputes
        return _fallback(loop, room, "error", f"{type(exc).__name__}: {exc}", holder, request_id)
    return Fetched(room, num, nbytes, time.perf_counter() - start)


def _receive(room, holder, fetch, request_id, layout, sources, timeout_s, engine) -> tuple[int, int]:
    """Blocks and bytes stored from the holder's stream; raises on a failed or short stream."""
    request = kvtransfer_pb2.FetchRequest(
        request_id=request_id, layout=layout, block_hashes=room.block_hashes[room.num_held :],
        first_block=room.num_held, host_id=host_id(),
        same_host_devices=[engine.device.type] if sources is not None else [],
    )  # fmt: skip
    call = fetch(holder.address)(request, timeout=timeout_s)
    sink = None
    try:
        for frame in read_ahead(call, name="kv-fetch-receive", wait=False):
            header, payload = decode_frame(frame)
            if sink is None:
                total = header.total_blocks
                if header.seq != 0 or not 0 < total <= room.num_missing:
                    raise MalformedChunk(
                        f"a fetch's first chunk announces {total} of {room.num_missing} blocks"
                    )
                sink = ChunkSink(engine.kv_caches, layout, room.block_ids[: room.num_held + total],
                                 room.num_held, sources)  # fmt: skip
            sink.accept(header, payload)
    finally:
        call.cancel()  # no-op once finished
    if sink is None or not sink.complete:
        raise MalformedChunk("the fetch ended before every block arrived")
    return sink.validator.num_blocks, sink.validator.bytes_received


def _fallback(loop, room: PrefixRoom, reason: str, detail: str, holder, request_id: str) -> Fetched:
    loop.call(loop.engine.fill_prefix, room, 0)
    log.warning("request %s: fetch from %s failed (%s): %s; recomputing", request_id,
                holder.worker_id or holder.address, reason, detail)  # fmt: skip
    return Fetched(None, fallback=reason)
