"""The worker side of the prefix index: registers the worker under a lease and publishes its block events.

`on_block_event` is a BlockPool listener, called on the engine thread: it only enqueues (bounded, never
blocks, never touches the network). A sender thread writes queued events to Redis, one MULTI/EXEC per
batch (each event's set changes together with its stream record); a heartbeat thread renews the lease.

Each event's tier goes with it: a block stored in KV memory is in the worker's blocks set and not in its
host set; one spilled to the host tier is in both; one evicted is in neither.

Recovery is one mechanism, the resync: rewrite the worker's block and host sets from `snapshot()` and
publish an "R" record, in one transaction, together with (re-)registration. It runs at start, after any Redis
error (a failed EXEC may or may not have applied, and a restarted Redis has lost everything), after the
queue overflowed (events were dropped), and when the heartbeat finds the lease gone. Events queued before
the snapshot is taken are discarded (the snapshot already reflects them); later ones are applied on top.
This module owns no engine state: the snapshot callback is the engine's to make thread-safe.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from itertools import islice

import redis

from splitserve.engine.block_hash import BlockHash
from splitserve.engine.block_pool import BlockEvent, BlockEventKind, Holdings
from splitserve.index.client import Backoff, open_client
from splitserve.index.config import IndexConfig
from splitserve.index.schema import (
    RECORD_FIELD,
    Keys,
    Record,
    RecordKind,
    Registration,
    WorkerInfo,
    encode_record,
    encode_registration,
)

log = logging.getLogger(__name__)

Snapshot = Callable[[], Holdings]

_SADD_CHUNK = 10_000
_KINDS = {BlockEventKind.STORED: RecordKind.STORED, BlockEventKind.SPILLED: RecordKind.HOST,
          BlockEventKind.EVICTED: RecordKind.EVICTED}
# Registration drops ids whose lease is gone from the worker list, atomically (a worker re-registering
# at the same moment cannot lose its entry). KEYS[1]: the list; ARGV[1]: the lease key prefix.
_PRUNE_DEAD = """
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then redis.call('SREM', KEYS[1], id) end
end
return 0
"""


class IndexPublisher:
    """Publishes one worker's registration, lease and block events. `start()` once, `stop()` once.

    `snapshot()` returns every hash the worker's prefix cache holds now, those in its host tier only
    named (`BlockPool.holdings`); it is called on the sender thread, concurrently with the engine, and
    must be safe to call there. Redis being down never raises out of this class nor blocks its caller:
    errors are counted in `stats` and logged once per outage.
    """

    def __init__(self, config: IndexConfig, info: WorkerInfo, snapshot: Snapshot) -> None:
        self.config = config
        self.info = info
        self.epoch = secrets.randbits(62)  # new per publisher: a restarted worker reads as a new epoch
        self._snapshot = snapshot
        self._keys = Keys(config.namespace)
        self._client = open_client(config)
        self._queue: queue.Queue[BlockEvent] = queue.Queue(config.max_queued_events)
        self._seq = 0  # last seq handed to a record; touched by the sender thread only (and stop())
        self._needs_resync = threading.Event()
        self._registered = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards _stats and _down_since; never held across I/O
        self._stats = {"events_sent": 0, "resyncs": 0, "failures": 0, "overflows": 0}
        self._down_since: float | None = None

    # -- engine thread ---------------------------------------------------------------------------------

    def on_block_event(self, event: BlockEvent) -> None:
        """BlockPool listener: enqueue without blocking; on overflow, schedule a resync instead."""
        if self._stop.is_set() or not event.block_hashes:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._needs_resync.set()
            with self._lock:
                self._stats["overflows"] += 1

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("IndexPublisher.start() called twice")
        self._needs_resync.set()  # the first resync is the registration
        for target, name in ((self._run_sender, "sender"), (self._run_heartbeat, "heartbeat")):
            thread = threading.Thread(target=target, name=f"index-{name}-{self.info.worker_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, deregister: bool = True) -> None:
        """Stop both threads. `deregister` deletes the worker's keys and tells mirrors at once; without
        it the worker vanishes only when its lease expires (what a crash looks like). Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.config.socket_timeout_s + 1)
        if deregister and self._threads:
            try:
                self._deregister()
            except redis.RedisError as e:
                log.warning("index: could not deregister %s (%s); its lease expires in %.1f s",
                            self.info.worker_id, e, self.config.lease_ttl_s)
        self._registered.clear()
        self._client.close()

    def wait_registered(self, timeout_s: float) -> bool:
        """Whether the worker is registered with its current block set (False after `timeout_s`)."""
        return self._registered.wait(timeout_s)

    @property
    def stats(self) -> dict[str, float | None]:
        with self._lock:
            return {**self._stats, "queued": self._queue.qsize(), "down_since": self._down_since}

    # -- sender thread ---------------------------------------------------------------------------------

    def _run_sender(self) -> None:
        backoff = Backoff(self.config.retry_backoff_s, self.config.retry_max_backoff_s)
        while not self._stop.is_set():
            try:
                if self._needs_resync.is_set():
                    self._resync()
                    self._on_success()
                batch = self._take_batch(timeout_s=0.1)
                if batch:
                    self._send(batch)
                    self._on_success()
                backoff.reset()
            except Exception as e:  # the sender must outlive any error: Redis's, or a failing snapshot
                self._registered.clear()
                self._needs_resync.set()
                self._on_failure(e)
                self._stop.wait(backoff.next_delay())

    def _take_batch(self, timeout_s: float) -> list[BlockEvent]:
        try:
            batch = [self._queue.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while len(batch) < self.config.max_batch_events:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _next_record(self, kind: RecordKind, hashes: tuple[BlockHash, ...] = ()) -> bytes:
        # A seq is never reused in an epoch, even when its EXEC fails: a reader that saw it applied
        # detects the jump and resyncs, instead of trusting a duplicate.
        self._seq += 1
        return encode_record(Record(self.info.worker_id, self.epoch, self._seq, kind, hashes))

    def _xadd(self, pipe: redis.client.Pipeline, record: bytes) -> None:
        pipe.xadd(self._keys.events, {RECORD_FIELD: record}, maxlen=self.config.stream_maxlen,
                  approximate=True)

    def _send(self, batch: list[BlockEvent]) -> None:
        worker_id, ttl_ms = self.info.worker_id, self.config.lease_ttl_ms
        blocks, host = self._keys.blocks(worker_id), self._keys.host(worker_id)
        pipe = self._client.pipeline(transaction=True)
        for event in batch:
            hashes = event.block_hashes
            if event.kind is BlockEventKind.EVICTED:
                pipe.srem(blocks, *hashes)
            else:
                pipe.sadd(blocks, *hashes)
            if event.kind is BlockEventKind.SPILLED:
                pipe.sadd(host, *hashes)
            else:
                pipe.srem(host, *hashes)
            self._xadd(pipe, self._next_record(_KINDS[event.kind], hashes))
        pipe.pexpire(blocks, ttl_ms)  # SADD re-creates an expired set without a TTL
        pipe.pexpire(host, ttl_ms)
        pipe.pexpire(self._keys.lease(worker_id), ttl_ms)
        if not pipe.execute()[-1]:
            self._lease_lost()
        with self._lock:
            self._stats["events_sent"] += len(batch)

    def _resync(self) -> None:
        """Register and rewrite the whole block and host sets from a fresh snapshot, with an "R" record."""
        self._needs_resync.clear()
        while True:  # queued events are older than the snapshot below, which reflects them
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        holdings = self._snapshot()
        worker_id, ttl_ms = self.info.worker_id, self.config.lease_ttl_ms
        pipe = self._client.pipeline(transaction=True)
        pipe.eval(_PRUNE_DEAD, 1, self._keys.workers, self._keys.lease(""))
        pipe.set(self._keys.lease(worker_id), encode_registration(Registration(self.info, self.epoch)),
                 px=ttl_ms)
        pipe.sadd(self._keys.workers, worker_id)
        for key, hashes in ((self._keys.blocks(worker_id), holdings.hashes),
                            (self._keys.host(worker_id), holdings.host)):  # fmt: skip
            pipe.delete(key)
            it = iter(hashes)
            while chunk := list(islice(it, _SADD_CHUNK)):
                pipe.sadd(key, *chunk)
            pipe.pexpire(key, ttl_ms)
        self._xadd(pipe, self._next_record(RecordKind.RESET))
        pipe.execute()
        self._registered.set()
        with self._lock:
            self._stats["resyncs"] += 1

    def _deregister(self) -> None:
        worker_id = self.info.worker_id
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._keys.lease(worker_id), self._keys.blocks(worker_id), self._keys.host(worker_id))
        pipe.srem(self._keys.workers, worker_id)
        self._xadd(pipe, self._next_record(RecordKind.RESET))  # mirrors reload it, find no lease, drop it
        pipe.execute()

    # -- heartbeat thread ------------------------------------------------------------------------------

    def _run_heartbeat(self) -> None:
        worker_id, ttl_ms = self.info.worker_id, self.config.lease_ttl_ms
        while not self._stop.wait(self.config.heartbeat_interval_s):
            if not self._registered.is_set():
                continue  # the sender is (re-)registering
            try:
                pipe = self._client.pipeline(transaction=True)
                pipe.pexpire(self._keys.lease(worker_id), ttl_ms)
                pipe.pexpire(self._keys.blocks(worker_id), ttl_ms)
                pipe.pexpire(self._keys.host(worker_id), ttl_ms)
                pipe.sadd(self._keys.workers, worker_id)
                lease_alive = pipe.execute()[0]
            except redis.RedisError as e:
                self._needs_resync.set()  # Redis may come back empty
                self._on_failure(e)
                continue
            self._on_success()
            if not lease_alive:
                self._lease_lost()

    def _lease_lost(self) -> None:
        log.warning("index: lease of %s was gone (expired or Redis restarted); re-registering",
                    self.info.worker_id)
        self._registered.clear()
        self._needs_resync.set()

    # -- outage bookkeeping (both threads) -------------------------------------------------------------

    def _on_failure(self, error: Exception) -> None:
        with self._lock:
            self._stats["failures"] += 1
            first = self._down_since is None
            if first:
                self._down_since = time.time()
        if first:
            log.warning("index: cannot publish for %s (%s: %s); retrying, up to %d events queue meanwhile",
                        self.info.worker_id, type(error).__name__, error, self.config.max_queued_events)

    def _on_success(self) -> None:
        with self._lock:
            down_since, self._down_since = self._down_since, None
        if down_since is not None:
            log.info("index: Redis reachable again for %s after %.1f s", self.info.worker_id,
                     time.time() - down_since)
