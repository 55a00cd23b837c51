"""The Redis prefix index end to end: a real redis-server, real publisher and mirror threads, no mocks.

Each test gets its own namespace on a shared embedded Redis; the outage tests start their own server.
Short leases and backoffs keep the whole file to a few seconds per scenario.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
import torch
from waiting import wait_until

from splitserve.engine.block_hash import BlockHash, HashContext, hash_blocks
from splitserve.engine.block_pool import BlockEvent, BlockEventKind, BlockPool, Holdings
from splitserve.engine.host_tier import HostKVTier
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.index.config import IndexConfig
from splitserve.index.mirror import IndexMirror
from splitserve.index.publisher import IndexPublisher
from splitserve.index.redis_server import EmbeddedRedis, EmbeddedRedisError
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
    encode_record,
    encode_registration,
    probe_hash,
)
from splitserve.index.table import PrefixMatch, PrefixTable

BLOCK_SIZE = 4


def chain(num_blocks: int, model: str = "m") -> list[BlockHash]:
    return hash_blocks(list(range(num_blocks * BLOCK_SIZE)), BLOCK_SIZE, HashContext(model))


class Worker:
    """A worker's prefix cache reduced to its hash sets (all held, host tier only), publishing its changes
    like a BlockPool does."""

    def __init__(self, config: IndexConfig, worker_id: str, role: str = "fresh") -> None:
        self.held: set[BlockHash] = set()
        self.host: set[BlockHash] = set()
        info = WorkerInfo(worker_id, role, f"127.0.0.1:{5000 + len(worker_id)}", "m", BLOCK_SIZE,
                          probe_hash("m", BLOCK_SIZE))
        self.publisher = IndexPublisher(config, info, snapshot=lambda: Holdings(list(self.held),
                                                                                list(self.host)))

    def store(self, hashes: list[BlockHash]) -> None:
        self.held.update(hashes)
        self.host.difference_update(hashes)
        self.publisher.on_block_event(BlockEvent(BlockEventKind.STORED, tuple(hashes)))

    def spill(self, hashes: list[BlockHash]) -> None:
        self.held.update(hashes)
        self.host.update(hashes)
        self.publisher.on_block_event(BlockEvent(BlockEventKind.SPILLED, tuple(hashes)))

    def evict(self, hashes: list[BlockHash]) -> None:
        self.held.difference_update(hashes)
        self.host.difference_update(hashes)
        self.publisher.on_block_event(BlockEvent(BlockEventKind.EVICTED, tuple(hashes)))

    def start(self) -> Worker:
        self.publisher.start()
        assert self.publisher.wait_registered(5.0)
        return self


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


def make_config(url: str, **overrides: float) -> IndexConfig:
    settings = {"lease_ttl_s": 3.0, "lease_check_s": 0.1, "socket_timeout_s": 0.3, "retry_backoff_s": 0.02,
                "retry_max_backoff_s": 0.2, **overrides}
    return IndexConfig(url, namespace=f"t{uuid.uuid4().hex[:8]}", **settings)


@pytest.fixture
def config(redis_server: EmbeddedRedis) -> IndexConfig:
    return make_config(redis_server.url)


@pytest.fixture
def started() -> Iterator[Callable]:
    """`started(obj)` starts a Worker or IndexMirror and stops it at teardown."""
    running: list[Worker | IndexMirror] = []

    def start(obj):
        if isinstance(obj, IndexMirror):
            assert obj.start()
        else:
            obj.start()
        running.append(obj)
        return obj

    yield start
    for obj in reversed(running):
        (obj.stop() if isinstance(obj, IndexMirror) else obj.publisher.stop())


def client_for(config: IndexConfig) -> redis.Redis:
    return redis.Redis.from_url(config.redis_url)


def last_record(config: IndexConfig, worker_id: str) -> Record:
    for _id, fields in client_for(config).xrevrange(Keys(config.namespace).events, count=100):
        rec = decode_record(fields[RECORD_FIELD])
        if rec.worker_id == worker_id:
            return rec
    raise AssertionError(f"no record of {worker_id}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- embedded Redis and schema ---------------------------------------------------------------------------


def test_embedded_redis_starts_answers_and_leaves_no_process():
    server = EmbeddedRedis().start()
    pid = server.pid
    assert pid is not None and pid_alive(pid)
    assert redis.Redis.from_url(server.url).ping()
    server.stop()
    assert not pid_alive(pid) and not server.running
    server.stop()  # idempotent


def test_embedded_redis_that_cannot_bind_reports_its_log():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedRedis(port=taken.getsockname()[1], start_timeout_s=5.0)
        with pytest.raises(EmbeddedRedisError, match=r"(?i)address already in use"):
            server.start()
        assert not server.running


def test_records_and_registrations_round_trip_and_bad_ones_are_rejected():
    rec = Record("w1", 7, 3, RecordKind.STORED, tuple(chain(2)))
    assert decode_record(encode_record(rec)) == rec
    info = WorkerInfo("w1", "warm", "h:1", "m", BLOCK_SIZE, probe_hash("m", BLOCK_SIZE), "cuda:GPU-1")
    assert decode_registration(encode_registration(Registration(info, 9))) == (info, 9)
    assert info.agrees_with("m", BLOCK_SIZE) and not info.agrees_with("other", BLOCK_SIZE)
    for bad in (b"", b"\xc1", encode_record(rec)[:-5], encode_record(rec._replace(seq=0)),
                encode_record(rec._replace(block_hashes=(b"short",)))):
        with pytest.raises(IndexRecordError):
            decode_record(bad)
    with pytest.raises(ValueError, match="role"):
        WorkerInfo("w1", "prefill", "h:1", "m", BLOCK_SIZE)


# -- consistency ---------------------------------------------------------------------------------------


def test_block_pool_events_reach_the_mirror_stored_and_evicted(config, started):
    pool = BlockPool(num_blocks=9)
    info = WorkerInfo("w1", "decode", "h:1", "m", BLOCK_SIZE)
    publisher = IndexPublisher(config, info, pool.holdings)
    pool.add_listener(publisher.on_block_event)
    publisher.start()
    assert publisher.wait_registered(5.0)
    mirror = started(IndexMirror(config))
    try:
        hashes = chain(6)
        blocks = pool.allocate(6)
        pool.cache(blocks, hashes)
        wait_until(lambda: mirror.match(hashes) == {"w1": 6})
        pool.free(blocks[::-1])  # tail first: the tail is evicted first
        pool.allocate(5)  # 2 never-used blocks, then evicts blocks 5, 4, 3 of the chain
        assert len(pool.lookup(hashes)) == 3
        wait_until(lambda: mirror.match(hashes) == {"w1": 3})
        keys = Keys(config.namespace)
        assert client_for(config).smembers(keys.blocks("w1")) == set(hashes[:3])
        assert mirror.stats["events_applied"] == 2 and mirror.stats["resyncs"] == 0  # in order: no reload
    finally:
        publisher.stop()


def test_the_index_records_the_tier_spilled_loaded_back_and_dropped(config, started):
    """A real pool with a real host tier: blocks evicted to the tier stay indexed as host-tier, loading
    them back makes them KV-memory blocks again, and what leaves the tier (dropped for room, a reset) is
    removed — in Redis's sets and in the mirror."""
    pool = BlockPool(num_blocks=9)
    pool.spill = HostKVTier([torch.zeros(2, 9, BLOCK_SIZE, 1, 2)], capacity=4)
    kv = KVCacheManager(pool, BLOCK_SIZE, "m")
    publisher = IndexPublisher(config, WorkerInfo("w1", "decode", "h:1", "m", BLOCK_SIZE), pool.holdings)
    pool.add_listener(publisher.on_block_event)
    publisher.start()
    assert publisher.wait_registered(5.0)
    mirror = started(IndexMirror(config))
    keys, r = Keys(config.namespace), client_for(config)
    try:
        hashes = chain(6)
        blocks = pool.allocate(6)
        pool.cache(blocks, hashes)
        pool.free(blocks[::-1])
        wait_until(lambda: mirror.match_tiers(hashes) == {"w1": PrefixMatch(6, 0)})
        other = pool.allocate(5)  # 2 never-used blocks, then blocks 5, 4, 3 of the chain: to the tier
        wait_until(lambda: mirror.match_tiers(hashes) == {"w1": PrefixMatch(6, 3)})
        assert mirror.match(hashes) == {"w1": 6}  # held, in either tier
        assert r.smembers(keys.blocks("w1")) == set(hashes) and r.smembers(keys.host("w1")) == set(hashes[3:])
        pool.free(other[::-1])
        found, num_loaded = kv.lookup(hashes)  # loads 2 back (at most half the tier per lookup)
        assert (len(found), num_loaded) == (5, 2)
        wait_until(lambda: mirror.match_tiers(hashes) == {"w1": PrefixMatch(6, 1)})
        assert r.smembers(keys.host("w1")) == {hashes[5]}
        spilled = pool.allocate(8)  # every block out of KV memory: the tier keeps the 4 spilled last
        wait_until(lambda: mirror.match_tiers(hashes) == {"w1": PrefixMatch(4, 4)})
        assert set(pool.spill.hashes()) == set(hashes[:4])  # 4 and 5 dropped for room: gone
        assert r.smembers(keys.blocks("w1")) == r.smembers(keys.host("w1")) == set(hashes[:4])
        pool.free(spilled)
        pool.reset_cache()  # the tier empties: gone everywhere
        wait_until(lambda: mirror.match_tiers(hashes) == {"w1": PrefixMatch(0, 0)})
        assert not r.exists(keys.blocks("w1"), keys.host("w1"))
    finally:
        publisher.stop()


def test_a_resync_and_a_late_mirror_restore_the_tiers_from_the_snapshot(config, started):
    hashes = chain(6)
    w = started(Worker(config, "w1"))
    w.store(hashes[:5])
    w.spill(hashes[3:5])
    w.store(hashes[4:5])  # loaded back
    wait_until(lambda: w.publisher.stats["events_sent"] == 3)
    mirror = started(IndexMirror(config))  # a rebuild: both sets
    assert mirror.match_tiers(hashes) == {"w1": PrefixMatch(5, 1)}
    keys, r = Keys(config.namespace), client_for(config)
    r.delete(keys.host("w1"))  # lost: only the publisher's resync can put it back
    w.publisher.stop(deregister=False)
    again = Worker(config, "w1")
    again.held, again.host = set(hashes[:6]), set(hashes[2:6])
    started(again)  # registers from its snapshot: an "R" the mirror reloads the worker on
    wait_until(lambda: mirror.match_tiers(hashes) == {"w1": PrefixMatch(6, 4)})
    assert r.smembers(keys.host("w1")) == set(hashes[2:6]) and r.pttl(keys.host("w1")) > 0
    again.evict(hashes[5:])
    wait_until(lambda: mirror.match_tiers(hashes) == {"w1": PrefixMatch(5, 3)})
    again.publisher.stop()
    assert not r.exists(keys.host("w1"))  # deregistered with the rest


def test_the_prefix_table_keeps_host_blocks_among_a_workers_blocks():
    table, hashes = PrefixTable(), chain(5)
    table.add_host("a", hashes[:2])  # held, host tier only
    table.add("a", hashes[1:4])  # hashes[1] back in KV memory
    assert table.match_tiers(hashes) == {"a": PrefixMatch(4, 1)}
    table.add_host("b", hashes[:3])
    table.remove("b", hashes[1:2])
    assert table.match_tiers(hashes) == {"a": PrefixMatch(4, 1), "b": PrefixMatch(1, 1)}
    assert table.host_blocks_of("b") == {hashes[0], hashes[2]}
    table.replace("a", set(hashes), host={hashes[4], chain(1, model="other")[0]})  # foreign host: ignored
    assert table.match_tiers(hashes)["a"] == PrefixMatch(5, 1) and table.host_blocks_of("a") == {hashes[4]}
    table.drop("a")
    assert table.match_tiers(hashes) == {"b": PrefixMatch(1, 1)} and table.host_blocks_of("a") == set()


def test_match_counts_each_workers_leading_blocks(config, started):
    mirror = started(IndexMirror(config))
    hashes = chain(8)
    a, b, c, d = (started(Worker(config, w)) for w in ("a", "b", "c", "d"))
    a.store(hashes[:6])
    b.store(hashes[:3])
    b.store(hashes[4:8])  # a hole at block 3
    c.store(hashes[1:5])  # lacks the first block
    d.store(chain(3, model="other"))
    expected = {"a": 6, "b": 3, "c": 0, "d": 0}
    wait_until(lambda: mirror.match(hashes) == expected)
    assert mirror.match(hashes[:2]) == {"a": 2, "b": 2, "c": 0, "d": 0}
    assert mirror.match([]) == dict.fromkeys("abcd", 0)
    a.evict([hashes[2]])
    wait_until(lambda: mirror.match(hashes)["a"] == 2)
    assert set(mirror.workers()) == set("abcd") and mirror.workers()["a"].role == "fresh"


def test_a_mirror_started_late_rebuilds_from_redis(config, started):
    hashes = chain(5)
    w = started(Worker(config, "w1"))
    w.store(hashes)
    w.evict(hashes[3:])
    wait_until(lambda: w.publisher.stats["events_sent"] == 2)
    mirror = started(IndexMirror(config))
    assert mirror.match(hashes) == {"w1": 3} and not mirror.stale
    w.store(hashes[3:4])
    wait_until(lambda: mirror.match(hashes) == {"w1": 4})


# -- gaps and epochs -----------------------------------------------------------------------------------


def test_a_seq_gap_reloads_that_worker_from_its_set(config, started):
    mirror = started(IndexMirror(config))
    w = started(Worker(config, "w1"))
    hashes = chain(6)
    w.store(hashes[:2])
    wait_until(lambda: mirror.match(hashes) == {"w1": 2})
    rec = last_record(config, "w1")
    keys, r = Keys(config.namespace), client_for(config)
    r.sadd(keys.blocks("w1"), hashes[2])  # a change whose record was lost: only a reload can see it
    skipped = Record("w1", rec.epoch, rec.seq + 2, RecordKind.STORED, (hashes[3],))
    r.sadd(keys.blocks("w1"), hashes[3])
    r.xadd(keys.events, {RECORD_FIELD: encode_record(skipped)})
    wait_until(lambda: mirror.match(hashes) == {"w1": 4})
    assert mirror.stats["resyncs"] >= 2
    w.store(hashes[4:5])  # the publisher's own next seq now reads as out of order too: reloaded again
    wait_until(lambda: mirror.match(hashes) == {"w1": 5})


def test_a_restarted_worker_with_a_new_epoch_replaces_its_old_blocks(config, started):
    mirror = started(IndexMirror(config))
    hashes = chain(4)
    old = Worker(config, "w1").start()
    old.store(hashes)
    wait_until(lambda: mirror.match(hashes) == {"w1": 4})
    old.publisher.stop(deregister=False)  # a crash: keys stay until the lease expires
    new = Worker(config, "w1")
    new.held = set(hashes[:1])  # came back with less in its cache
    started(new)
    assert new.publisher.epoch != old.publisher.epoch
    wait_until(lambda: mirror.match(hashes) == {"w1": 1})


def test_bad_stream_records_are_counted_and_ignored(config, started):
    mirror = started(IndexMirror(config))
    w = started(Worker(config, "w1"))
    client_for(config).xadd(Keys(config.namespace).events, {RECORD_FIELD: b"\x93garbage"})
    w.store(chain(2))
    wait_until(lambda: mirror.match(chain(2)) == {"w1": 2})
    assert mirror.stats["bad_records"] == 1 and not mirror.stale


# -- leases --------------------------------------------------------------------------------------------


def test_a_worker_whose_heartbeat_stops_disappears_after_its_lease(redis_server, started):
    config = make_config(redis_server.url, lease_ttl_s=1.0)
    changes: list[tuple[str, bool]] = []
    on_change = lambda w, info: changes.append((w, info is not None))  # noqa: E731
    mirror = started(IndexMirror(config, on_worker_change=on_change))
    hashes = chain(3)
    dead, alive = Worker(config, "dead").start(), started(Worker(config, "alive"))
    for w in (dead, alive):
        w.store(hashes)
    dead.spill(hashes[2:])
    wait_until(lambda: mirror.match_tiers(hashes) == {"dead": PrefixMatch(3, 1), "alive": PrefixMatch(3)})
    dead.publisher.stop(deregister=False)
    t0 = time.monotonic()
    wait_until(lambda: mirror.match(hashes) == {"alive": 3}, timeout_s=3.0)
    assert time.monotonic() - t0 > 0.5  # it counted until its lease ran out, not beyond
    keys = Keys(config.namespace)
    assert not client_for(config).exists(keys.blocks("dead"), keys.host("dead"))  # expired with the lease
    assert ("dead", False) in changes and ("alive", True) in changes


def test_stop_deregisters_at_once(config, started):
    mirror = started(IndexMirror(config))
    w = Worker(config, "w1").start()
    w.store(chain(2))
    wait_until(lambda: mirror.match(chain(2)) == {"w1": 2})
    w.publisher.stop()
    wait_until(lambda: mirror.workers() == {}, timeout_s=1.0)  # well before the 3 s lease
    keys, r = Keys(config.namespace), client_for(config)
    assert not r.exists(keys.lease("w1"), keys.blocks("w1")) and not r.sismember(keys.workers, "w1")


# -- outages -------------------------------------------------------------------------------------------


def test_redis_restart_mirror_serves_last_state_publisher_never_blocks(started):
    with EmbeddedRedis() as server:
        config = make_config(server.url, max_queued_events=8, lease_ttl_s=1.5)
        mirror = started(IndexMirror(config))
        w, crashed = started(Worker(config, "w1")), Worker(config, "crashed").start()
        hashes = chain(40)
        w.store(hashes[:10])
        crashed.store(hashes[:1])
        wait_until(lambda: mirror.match(hashes) == {"w1": 10, "crashed": 1})
        crashed.publisher.stop(deregister=False)
        server.stop()
        wait_until(lambda: mirror.stale)
        assert mirror.match(hashes) == {"w1": 10, "crashed": 1}  # the last known state
        slowest = 0.0
        for i in range(10, 40):  # more events than the queue holds: it overflows, nothing blocks
            t0 = time.perf_counter()
            w.store(hashes[i : i + 1])
            slowest = max(slowest, time.perf_counter() - t0)
        w.evict(hashes[30:])
        assert slowest < 0.005 and w.publisher.stats["overflows"] > 0
        wait_until(lambda: w.publisher.stats["down_since"] is not None)
        server.restart()  # empty: the publisher re-registers from its snapshot
        seen: list[dict[str, int]] = []
        wait_until(lambda: seen.append(mirror.match(hashes)) or not mirror.stale)
        assert "crashed" in mirror.workers()  # rebuilt from an empty Redis, yet kept: it may re-register
        wait_until(lambda: seen.append(mirror.match(hashes)) or seen[-1].get("w1") == 30)
        assert all("w1" in m for m in seen)  # the live worker never vanished while re-registering
        wait_until(lambda: set(mirror.workers()) == {"w1"})  # the one that does not come back: dropped
        w.store(hashes[30:35])
        wait_until(lambda: mirror.match(hashes) == {"w1": 35})
        assert mirror.stats["failures"] > 0 and mirror.stats["stale_since"] is None
        assert w.publisher.stats["down_since"] is None


def test_a_frozen_redis_reads_as_stale_until_it_answers(started):
    with EmbeddedRedis() as server:
        config = make_config(server.url, lease_ttl_s=5.0)
        mirror = started(IndexMirror(config))
        w = started(Worker(config, "w1"))
        hashes = chain(4)
        w.store(hashes[:2])
        wait_until(lambda: mirror.match(hashes) == {"w1": 2})
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: mirror.stale, timeout_s=3.0)
            w.store(hashes[2:3])  # queued while Redis does not answer
            assert mirror.match(hashes) == {"w1": 2}
        finally:
            os.kill(server.pid, signal.SIGCONT)
        wait_until(lambda: not mirror.stale and mirror.match(hashes) == {"w1": 3})
        w.store(hashes[3:4])
        wait_until(lambda: mirror.match(hashes) == {"w1": 4})


def test_a_mirror_started_before_redis_catches_up_when_it_comes(started):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(f"redis://127.0.0.1:{port}/0")
    mirror = IndexMirror(config)
    assert not mirror.start()  # no Redis yet: it keeps trying, routing sees an empty, stale index
    try:
        assert mirror.stale and mirror.match(chain(2)) == {}
        with EmbeddedRedis(port=port) as server:
            assert server.url == config.redis_url
            w = Worker(config, "w1").start()
            w.store(chain(2))
            wait_until(lambda: not mirror.stale and mirror.match(chain(2)) == {"w1": 2})
            w.publisher.stop()
    finally:
        mirror.stop()
