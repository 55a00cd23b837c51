"""The receiving end of KV pushes, transport-free: the handoff state machine of a disaggregated request on
the worker that decodes it.

    reserve ──► receiving (lanes' chunks stored as they come) ──► complete ──► claimed (admitted)
       │                │                                            │
       └────────────────┴──── released (sender or receiver abort) ───┴──── expired (no progress for
                              failed (bad chunk, short stream)              its time-to-live)

`reserve` takes room in the engine and grants a lease; `receive` stores one lane's frames (a whole
transfer when unstriped) and says whether that lane completed the lease; `claim` waits for the KV and
hands the blocks to the request by acknowledging the lease; `release` ends it early. Every way a lease
ends but a claim gives its blocks back (`Engine.cancel_kv`), exactly once (`LeaseTable`); a reaper
expires leases that make no progress. Errors are the typed `kvtransfer.errors` (and the engine's
`InvalidRequest` / `OutOfKVBlocks` from `reserve`): each backend maps them to its own (the gRPC service
to status codes); an in-process caller takes them as they are. Thread-safe: lanes and transfers are
stored side by side, outside the lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable

from splitserve.engine.loop import EngineLoop
from splitserve.kvtransfer.ahead import read_ahead
from splitserve.kvtransfer.chunks import check_layout
from splitserve.kvtransfer.errors import LeaseNotFound, MalformedChunk, TransferError
from splitserve.kvtransfer.frames import decode_frame
from splitserve.kvtransfer.leases import Lease, LeaseTable, TransferState
from splitserve.kvtransfer.requests import sampling_from_proto
from splitserve.kvtransfer.same_host import SourceMaps, host_id
from splitserve.kvtransfer.stream import ChunkSink, kv_layout
from splitserve.protos import kvtransfer_pb2

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 0.5


class WrongLease(TransferError):
    """A claim for one request naming another request's lease (the lease is left as it was)."""


class ClaimAbandoned(TransferError):
    """The claimer went away before the KV arrived (the lease is left to the reaper or the sender)."""


class KVReceiver:
    def __init__(self, loop: EngineLoop, lease_ttl_s: float = 10.0) -> None:
        self.loop = loop
        engine = loop.engine
        self.layout = kv_layout(engine.kv_caches, engine.model_id)
        self.lease_ttl_s = lease_ttl_s
        self.sources = SourceMaps(self.layout, engine.device)
        self.host_id = host_id()
        self._lock = threading.Lock()  # leases and sinks; never held while waiting on the network
        self._changed = threading.Condition(self._lock)  # a lease completed or ended
        self.leases = LeaseTable(self._free_blocks)
        self._sinks: dict[str, ChunkSink] = {}
        self._stopped = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="lease-reaper", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stopped.set()
        self._reaper.join()
        with self._lock:
            self.leases.release_all("worker stopping")

    def reserve(self, request: kvtransfer_pb2.ReserveRequest) -> kvtransfer_pb2.ReserveReply:
        """Room for a request's prompt KV under a new lease (a retried prefill's reservation replaces the
        request's open one). Raises `LayoutMismatch`, the engine's `InvalidRequest` or `OutOfKVBlocks`."""
        check_layout(self.layout, request.layout)
        params = sampling_from_proto(request.sampling)
        salt = request.cache_salt if request.HasField("cache_salt") else None
        with self._lock:
            old = self.leases.open_lease_of(request.request_id)
            if old is not None:
                self.leases.release(old.lease_id, "superseded by a new reservation", TransferState.FAILED)
        engine = self.loop.engine
        reservation = self.loop.call(engine.reserve_kv, request.request_id, list(request.prompt_token_ids),
                                     params, salt)  # fmt: skip
        ttl_s = request.lease_ms / 1000 if request.lease_ms else self.lease_ttl_s
        with self._lock:
            lease = self.leases.grant(request.request_id, reservation.block_ids,
                                      reservation.num_cached_blocks, ttl_s)  # fmt: skip
            self._sinks[lease.lease_id] = ChunkSink(engine.kv_caches, self.layout, reservation.block_ids,
                                                    reservation.num_cached_blocks, self.sources)  # fmt: skip
            # Every block already held (a full-block prompt, all cached): nothing will be pushed.
            lease.kv_complete = reservation.num_cached_blocks == len(reservation.block_ids)
        return kvtransfer_pb2.ReserveReply(
            lease_id=lease.lease_id, num_cached_blocks=reservation.num_cached_blocks,
            num_blocks=len(reservation.block_ids), lease_ms=int(ttl_s * 1000), host_id=self.host_id,
            same_host_devices=[engine.device.type],
        )  # fmt: skip

    def receive(self, frames: Iterable[bytes]) -> kvtransfer_pb2.PushReply:
        """Store one lane's frames as they come (the next read off `frames` while one is stored). The reply
        once its last chunk is in: COMPLETE when every lane's is. A bad chunk or a stream that ends short
        fails the lease (`MalformedChunk`, `CorruptChunk`); `LeaseNotFound` when it has ended (another
        lane failed it, it expired, it was released)."""
        lease_id, sink, lane = "", None, None
        try:
            for frame in read_ahead(frames, name="kv-receive", wait=False):
                header, payload = decode_frame(frame)
                with self._lock:
                    lease = self.leases.get(header.lease_id)
                    lease_id, sink = lease.lease_id, self._sinks[lease.lease_id]
                if lane is None:
                    lane = header.lane
                elif header.lane != lane:
                    raise MalformedChunk(f"a Push stream of lane {lane} carries one of lane {header.lane}")
                sink.accept(header, payload)  # outside the lock; the sink keeps the blocks from being freed
                with self._lock:
                    self.leases.renew(self.leases.get(lease_id))
            if sink is None or not sink.validator.lane_done(lane):
                raise MalformedChunk("the push ended before every block arrived")
        except LeaseNotFound:
            raise
        except TransferError as exc:
            self.fail(lease_id, str(exc))
            raise
        except BaseException:  # the sender went away mid-stream (the transport's error): the lease fails
            self.fail(lease_id, "the push stream broke")
            raise
        with self._lock:
            lease = self.leases.get(lease_id)  # LeaseNotFound: ended meanwhile
            complete = sink.complete and not lease.kv_complete  # the last lane in completes the lease
            if complete:
                lease.kv_complete = True  # waits for its claim, under the same time-to-live
                self._changed.notify_all()
            self.leases.renew(lease)
        return kvtransfer_pb2.PushReply(
            state=kvtransfer_pb2.COMPLETE if complete else kvtransfer_pb2.RECEIVING,
            chunks_received=sink.validator.next_seq, bytes_received=sink.validator.bytes_received,
        )  # fmt: skip

    def release(self, lease_id: str, reason: str) -> Lease:
        """End an open lease early (the sender aborted); raises `LeaseNotFound`."""
        with self._lock:
            return self.leases.release(lease_id, reason)

    def claim(self, request_id: str, lease_id: str, active: Callable[[], bool] = lambda: True) -> Lease:
        """Wait until the lease holds all the request's KV, then end it by acknowledgement: the blocks now
        belong to the request (admit it next). Raises `LeaseNotFound` (with why it ended) when it ends
        otherwise, `WrongLease` for another request's lease and `ClaimAbandoned` once `active()` is False,
        both leaving the lease as it was."""
        with self._changed:
            while True:
                lease = self.leases.get(lease_id)
                if lease.request_id != request_id:
                    raise WrongLease(f"lease {lease_id!r} is not for request {request_id!r}")
                if lease.kv_complete:
                    break
                if not active():
                    raise ClaimAbandoned("the caller went away")
                self._changed.wait(timeout=REAP_INTERVAL_S)
            self.leases.acknowledge(lease_id)
            del self._sinks[lease_id]
            return lease

    def state(self, lease_id: str) -> tuple[TransferState, str]:
        """A lease's state and, once ended, why (for diagnostics and tests); raises `LeaseNotFound` for
        one unknown or ended long ago."""
        with self._lock:
            return self.leases.state(lease_id)

    def fail(self, lease_id: str, reason: str) -> None:
        with self._lock, contextlib.suppress(LeaseNotFound):  # already ended
            self.leases.release(lease_id, reason, TransferState.FAILED)

    def _free_blocks(self, lease: Lease) -> None:
        """LeaseTable callback (under the lock): a released or expired lease gives its blocks back."""
        log.info("lease %s ended: %s (%s)", lease.lease_id, lease.state.name, lease.reason)
        sink = self._sinks.pop(lease.lease_id, None)
        if sink is not None:
            sink.close()  # waits for a chunk being written into these blocks
        self._changed.notify_all()
        self.loop.call(self.loop.engine.cancel_kv, lease.request_id)

    def _reap(self) -> None:
        while not self._stopped.wait(REAP_INTERVAL_S):
            with self._lock:
                self.leases.expire_overdue()
