"""Exact state of the block pool: ids handed out, reference counts, eviction order, events."""

from __future__ import annotations

import pytest

from splitserve.engine.block_hash import BlockHash
from splitserve.engine.block_pool import BlockEvent, BlockEventKind, BlockPool, OutOfKVBlocks


def h(i: int) -> BlockHash:
    return BlockHash(bytes([i]) * 32)


@pytest.fixture
def pool_and_events():
    pool = BlockPool(6)
    events: list[BlockEvent] = []
    pool.add_listener(events.append)
    return pool, events


def test_allocation_order_and_ref_counts(pool_and_events):
    pool, _ = pool_and_events
    assert pool.num_free_blocks == 5  # block 0 is the null block
    assert pool.allocate(2) == [1, 2]
    assert [pool.ref_count(b) for b in range(6)] == [0, 1, 1, 0, 0, 0]
    pool.touch([2])
    assert pool.ref_count(2) == 2
    pool.free([2])
    assert pool.ref_count(2) == 1 and pool.num_free_blocks == 3
    with pytest.raises(OutOfKVBlocks):
        pool.allocate(4)
    assert pool.num_free_blocks == 3  # a refused allocation changes nothing


def test_cached_blocks_are_evicted_least_recently_freed_first(pool_and_events):
    pool, events = pool_and_events
    a = pool.allocate(3)  # [1, 2, 3]
    pool.cache(a, [h(1), h(2), h(3)])
    assert events == [BlockEvent(BlockEventKind.STORED, (h(1), h(2), h(3)))]
    pool.free(reversed(a))  # tail first
    assert pool.free_block_ids() == [4, 5, 3, 2, 1]
    assert pool.lookup([h(1), h(2), h(3), h(4)]) == [1, 2, 3]
    # Two fresh blocks come from the never-cached ones; the third evicts block 3 (the chain's tail).
    assert pool.allocate(3) == [4, 5, 3]
    assert events[-1] == BlockEvent(BlockEventKind.EVICTED, (h(3),))
    assert pool.lookup([h(1), h(2), h(3)]) == [1, 2]
    assert pool.block_hash(3) is None and pool.num_cached_blocks == 2


def test_touching_a_free_cached_block_takes_it_out_of_the_lru(pool_and_events):
    pool, _ = pool_and_events
    a = pool.allocate(2)
    pool.cache(a, [h(1), h(2)])
    pool.free(reversed(a))
    pool.touch([1])
    assert pool.ref_count(1) == 1
    assert pool.free_block_ids() == [3, 4, 5, 2]
    assert pool.allocate(4) == [3, 4, 5, 2]  # block 1 is in use and stays cached
    assert pool.lookup([h(1)]) == [1]


def test_duplicate_hash_keeps_the_first_block(pool_and_events):
    pool, events = pool_and_events
    first, second = pool.allocate(2)
    pool.cache([first], [h(9)])
    pool.cache([second], [h(9)])
    assert pool.lookup([h(9)]) == [first]
    assert pool.block_hash(second) is None
    assert len(events) == 1  # the duplicate was not announced
    pool.free([second])
    assert pool.allocate(1) == [3]  # the uncached duplicate waits behind never-used blocks


def test_caching_disabled_stores_nothing():
    pool = BlockPool(4, enable_caching=False)
    blocks = pool.allocate(2)
    pool.cache(blocks, [h(1), h(2)])
    assert pool.lookup([h(1)]) == [] and pool.num_cached_blocks == 0


def test_double_free_is_caught(pool_and_events):
    pool, _ = pool_and_events
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(AssertionError):
        pool.free([b])
