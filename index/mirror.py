"""The router side of the prefix index: an in-memory mirror of Redis, fed by the events stream.

`match`, `workers`, `stale` and `stats` are in-memory and thread-safe: a routing decision never waits on
the network. One thread keeps the mirror current: it rebuilds from Redis at start and after any error
(noting the stream's last id BEFORE reading the sets, so a change made during the rebuild is replayed, and
replaying set adds/removes in stream order onto a newer set converges), then tails the stream.

Per worker it tracks (epoch, seq): a new epoch, a seq gap or an "R" record reloads that worker from its
sets (its blocks, and which of them are in its host tier only).
Every `lease_check_s` it reconciles with the leases: a worker whose lease vanished is dropped, a live one
it does not know is loaded, and a changed server run id (a Redis restart hidden by a reconnect) forces a
rebuild. While Redis is slow or down the mirror keeps answering from its last state with `stale` True,
retries with backoff, and rebuilds on reconnect. A Redis that restarted comes back empty: the workers the
mirror knew are kept for one lease TTL, time for the live ones to re-register (their publishers notice
the lost lease), so a restart does not blank the index. It never writes to Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from splitserve.engine.block_hash import BlockHash
from splitserve.index.client import Backoff, open_client
from splitserve.index.config import IndexConfig
from splitserve.index.schema import (
    RECORD_FIELD,
    IndexRecordError,
    Keys,
    Record,
    RecordKind,
    Registration,
    WorkerInfo,
    decode_record,
    decode_registration,
)
from splitserve.index.table import PrefixMatch, PrefixTable

log = logging.getLogger(__name__)

WorkerListener = Callable[[str, WorkerInfo | None], None]  # (worker id, its info, or None: it left)

_READ_COUNT = 1000


@dataclass
class _Cursor:
    """Where a worker's records stand in this mirror. `seq` None: accept the next record as the baseline."""

    epoch: int
    seq: int | None
    live: bool


class IndexMirror:
    """`start()` once (returns whether the first rebuild succeeded; the mirror keeps trying either way),
    `stop()` once. `on_worker_change` is called on the mirror's thread, outside its lock, when a worker
    appears, re-registers or leaves; it must not block for long."""

    def __init__(self, config: IndexConfig, on_worker_change: WorkerListener | None = None) -> None:
        self.config = config
        self._on_worker_change = on_worker_change
        self._keys = Keys(config.namespace)
        self._block_s = min(0.2, config.lease_check_s)
        self._client = open_client(config, extra_read_timeout_s=self._block_s)
        self._lock = threading.Lock()  # guards _table, _infos, _stats, _stale_since; never held across I/O
        self._table = PrefixTable()
        self._infos: dict[str, WorkerInfo] = {}
        self._stale_since: float | None = time.time()  # stale until the first rebuild
        self._stats = {"events_applied": 0, "resyncs": 0, "rebuilds": 0, "failures": 0, "bad_records": 0}
        # Mirror thread only (and start(), before the thread exists):
        self._cursors: dict[str, _Cursor] = {}
        self._last_id: bytes = b"0-0"
        self._run_id: str | None = None
        self._grace: dict[str, float] = {}  # worker → monotonic deadline to re-register after a restart
        self._failing = False  # the last Redis call failed (logs once per outage)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- queries (any thread, no I/O) ------------------------------------------------------------------

    def match(self, block_hashes: Sequence[BlockHash]) -> dict[str, int]:
        """Live worker id → how many leading blocks of `block_hashes` it holds, either tier (0 for none)."""
        with self._lock:
            return self._table.match(block_hashes)

    def match_tiers(self, block_hashes: Sequence[BlockHash]) -> dict[str, PrefixMatch]:
        """`match`, with how many of those blocks each worker holds in its host tier only."""
        with self._lock:
            return self._table.match_tiers(block_hashes)

    def workers(self) -> dict[str, WorkerInfo]:
        with self._lock:
            return dict(self._infos)

    @property
    def stale(self) -> bool:
        """True until the first rebuild and while Redis is failing; the answers are then the last known."""
        with self._lock:
            return self._stale_since is not None

    @property
    def stats(self) -> dict[str, float | None]:
        with self._lock:
            return {**self._stats, "stale_since": self._stale_since}

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> bool:
        if self._thread is not None:
            raise RuntimeError("IndexMirror.start() called twice")
        try:
            self._rebuild()
            self._on_success()
            built = True
        except redis.RedisError as e:
            self._on_failure(e)
            built = False
        self._thread = threading.Thread(target=self._run, args=(not built,), name="index-mirror", daemon=True)
        self._thread.start()
        return built

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.socket_timeout_s + self._block_s + 1)
        self._client.close()

    # -- mirror thread ---------------------------------------------------------------------------------

    def _run(self, needs_rebuild: bool) -> None:
        backoff = Backoff(self.config.retry_backoff_s, self.config.retry_max_backoff_s)
        next_check = time.monotonic() + self.config.lease_check_s
        while not self._stop.is_set():
            try:
                if needs_rebuild:
                    self._rebuild()
                    needs_rebuild = False
                self._tail()
                if time.monotonic() >= next_check:
                    needs_rebuild = self._reconcile()
                    next_check = time.monotonic() + self.config.lease_check_s
                self._on_success()
                backoff.reset()
            except Exception as e:  # the mirror must outlive any error; a rebuild repairs whatever it was
                if not isinstance(e, redis.RedisError):
                    log.exception("index mirror: unexpected error; rebuilding")
                self._on_failure(e)
                needs_rebuild = True
                self._stop.wait(backoff.next_delay())

    def _rebuild(self) -> None:
        """Replace the whole mirror with what Redis holds now."""
        client, keys = self._client, self._keys
        run_id = client.info("server")["run_id"]
        newest = client.xrevrange(keys.events, count=1)  # before the sets: nothing after it is missed
        last_id = newest[0][0] if newest else b"0-0"
        worker_ids = sorted(w.decode() for w in client.smembers(keys.workers))
        leases = client.mget([keys.lease(w) for w in worker_ids]) if worker_ids else []
        table, infos, cursors = PrefixTable(), {}, {}
        regs = [(w, _decode_lease(w, lease)) for w, lease in zip(worker_ids, leases, strict=True)]
        live = [(w, reg) for w, reg in regs if reg is not None]
        pipe = client.pipeline(transaction=False)
        for w, _ in live:
            pipe.smembers(keys.blocks(w))
            pipe.smembers(keys.host(w))
        replies = pipe.execute()
        for (w, reg), members, host in zip(live, replies[::2], replies[1::2], strict=True):
            table.replace(w, members, host)
            infos[w] = reg.info
            cursors[w] = _Cursor(reg.epoch, None, live=True)
        restarted = self._run_id is not None and run_id != self._run_id
        grace: dict[str, float] = {}
        now = time.monotonic()
        with self._lock:
            # An empty new Redis: keep the old workers until they re-register or their time runs out.
            for w in self._infos.keys() - infos.keys():
                deadline = now + self.config.lease_ttl_s if restarted else self._grace.get(w, 0.0)
                if deadline > now:
                    table.replace(w, self._table.blocks_of(w), self._table.host_blocks_of(w))
                    infos[w], grace[w] = self._infos[w], deadline
            old_infos, self._table, self._infos = self._infos, table, infos
            self._stats["rebuilds"] += 1
        self._cursors, self._last_id, self._run_id, self._grace = cursors, last_id, run_id, grace
        log.info("index mirror: rebuilt from Redis: %d live workers (%d carried over a restart)",
                 len(infos) - len(grace), len(grace))
        for w in old_infos.keys() - infos.keys():
            self._notify(w, None)
        for w, info in infos.items():
            if old_infos.get(w) != info:
                self._notify(w, info)

    def _tail(self) -> None:
        reply = self._client.xread({self._keys.events: self._last_id}, count=_READ_COUNT,
                                   block=max(1, round(self._block_s * 1000)))
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._apply(fields.get(RECORD_FIELD, b""))
                self._last_id = entry_id

    def _apply(self, data: bytes) -> None:
        try:
            rec = decode_record(data)
        except IndexRecordError as e:
            log.warning("index mirror: ignoring a bad stream record: %s", e)
            self._count("bad_records")
            return
        cur = self._cursors.get(rec.worker_id)
        in_order = (cur is not None and cur.epoch == rec.epoch
                    and (cur.seq is None or rec.seq == cur.seq + 1))
        if rec.kind is RecordKind.RESET or not in_order:
            if cur is not None and rec.kind is not RecordKind.RESET:
                log.info("index mirror: %s jumped from (%x, %s) to (%x, %d); reloading it", rec.worker_id,
                         cur.epoch, cur.seq, rec.epoch, rec.seq)
            self._resync_worker(rec.worker_id, rec)
            return
        assert cur is not None
        cur.seq = rec.seq
        if not cur.live:
            return  # a dead worker's trailing records; its next "R" brings it back
        with self._lock:
            if rec.kind is RecordKind.STORED:
                self._table.add(rec.worker_id, rec.block_hashes)
            elif rec.kind is RecordKind.HOST:
                self._table.add_host(rec.worker_id, rec.block_hashes)
            else:
                self._table.remove(rec.worker_id, rec.block_hashes)
            self._stats["events_applied"] += 1

    def _resync_worker(self, worker_id: str, rec: Record | None = None) -> None:
        """Reload one worker from its lease and sets. After it, the worker's records continue from `rec`
        (or, without one, from whatever comes next in its registered epoch)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.get(self._keys.lease(worker_id))
        pipe.smembers(self._keys.blocks(worker_id))
        pipe.smembers(self._keys.host(worker_id))
        lease, members, host = pipe.execute()
        reg = _decode_lease(worker_id, lease)
        if reg is not None:
            self._grace.pop(worker_id, None)
        if rec is not None:
            self._cursors[worker_id] = _Cursor(rec.epoch, rec.seq, live=reg is not None)
        elif reg is not None:
            self._cursors[worker_id] = _Cursor(reg.epoch, None, live=True)
        self._count("resyncs")
        if reg is None:
            if not self._in_grace(worker_id):
                self._drop(worker_id)
            return
        with self._lock:
            self._table.replace(worker_id, members, host)
            changed = self._infos.get(worker_id) != reg.info
            self._infos[worker_id] = reg.info
        if changed:
            self._notify(worker_id, reg.info)

    def _reconcile(self) -> bool:
        """Drop workers whose lease is gone, load live ones not known. True: Redis restarted, rebuild."""
        if self._client.info("server")["run_id"] != self._run_id:
            log.warning("index mirror: Redis restarted; rebuilding")
            return True
        keys = self._keys
        with self._lock:
            known = set(self._infos)
        worker_ids = sorted(known | {w.decode() for w in self._client.smembers(keys.workers)})
        leases = self._client.mget([keys.lease(w) for w in worker_ids]) if worker_ids else []
        for w, lease in zip(worker_ids, leases, strict=True):
            cur = self._cursors.get(w)
            reg = _decode_lease(w, lease)
            if reg is None:
                if self._in_grace(w):
                    continue
                if w in known:
                    log.info("index mirror: lease of %s expired; dropping it", w)
                    self._drop(w)
                if cur is not None:
                    cur.live = False
            elif w not in known or cur is None or cur.epoch != reg.epoch:
                self._resync_worker(w)
        return False

    def _in_grace(self, worker_id: str) -> bool:
        """Carried over a Redis restart, and still within the time its lease would have lasted."""
        return self._grace.get(worker_id, 0.0) > time.monotonic()

    def _drop(self, worker_id: str) -> None:
        with self._lock:
            present = self._infos.pop(worker_id, None) is not None
            self._table.drop(worker_id)
        if present:
            self._notify(worker_id, None)

    # -- bookkeeping -----------------------------------------------------------------------------------

    def _notify(self, worker_id: str, info: WorkerInfo | None) -> None:
        if self._on_worker_change is None:
            return
        try:
            self._on_worker_change(worker_id, info)
        except Exception:
            log.exception("index mirror: on_worker_change failed for %s", worker_id)

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def _on_failure(self, error: Exception) -> None:
        with self._lock:
            self._stats["failures"] += 1
            self._stale_since = self._stale_since or time.time()
        if not self._failing:
            self._failing = True
            log.warning("index mirror: Redis unavailable (%s: %s); routing on the last known index",
                        type(error).__name__, error)

    def _on_success(self) -> None:
        with self._lock:
            stale_since, self._stale_since = self._stale_since, None
        if self._failing:
            self._failing = False
            stale_s = time.time() - (stale_since or time.time())
            log.info("index mirror: Redis reachable again; the index was stale for %.1f s", stale_s)


def _decode_lease(worker_id: str, lease: bytes | None) -> Registration | None:
    """A lease's registration, or None for no lease or one this version cannot read (warned, not live)."""
    if lease is None:
        return None
    try:
        return decode_registration(lease)
    except IndexRecordError as e:
        log.warning("index mirror: ignoring the unreadable registration of %s: %s", worker_id, e)
        return None
