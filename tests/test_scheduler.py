"""Exact scheduling decisions: chunking under the token budget, prefix hits, preemption, stops, aborts.

Runs the real scheduler, KV cache manager and block pool; the model is replaced by feeding back fixed
sampled tokens, since scheduling depends only on token counts.
"""

from __future__ import annotations

import pytest

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.config import SchedulerConfig
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.outputs import FinishReason
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import Sequence, SequenceStatus

EOS = 99


def make(num_blocks=16, budget=64, max_num_seqs=8, chunked=True, block_size=4):
    pool = BlockPool(num_blocks)
    kv = KVCacheManager(pool, block_size, "test-model")
    config = SchedulerConfig(max_num_seqs, budget, chunked)
    return Scheduler(config, kv, max_model_len=64, eos_token_ids=frozenset({EOS})), pool


def seq(rid, n, max_tokens=4, first=0, **params):
    return Sequence(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, **params))


def step(sched, token=7):
    batch = sched.schedule()
    plan = [(it.seq.request_id, it.start, it.num_new_tokens) for it in batch.items]
    outs = sched.update(batch, [token] * len(batch.sampling_items))
    return batch.phase, plan, outs


def test_chunked_prefill_then_decode_in_one_batch():
    sched, pool = make(budget=8)
    a, b = seq("a", 10), seq("b", 3)
    sched.add(a)
    sched.add(b)
    assert step(sched)[:2] == ("prefill", [("a", 0, 8)])
    phase, plan, outs = step(sched)
    assert (phase, plan) == ("prefill", [("a", 8, 2), ("b", 0, 3)])
    assert [(o.request_id, o.new_token_ids) for o in outs] == [("a", (7,)), ("b", (7,))]
    assert step(sched)[:2] == ("decode", [("a", 10, 1), ("b", 3, 1)])
    assert a.block_ids == [1, 2, 3] and b.block_ids == [4]
    assert pool.num_free_blocks == 15 - 4


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    sched, _ = make(budget=8, chunked=False)
    sched.add(seq("a", 6))
    sched.add(seq("b", 5, first=50))
    assert step(sched)[1] == [("a", 0, 6)]
    assert step(sched)[1] == [("a", 6, 1), ("b", 0, 5)]


def test_prefix_hit_skips_cached_blocks_and_reports_cached_tokens():
    sched, pool = make()
    first = seq("a", 10, max_tokens=1)
    sched.add(first)
    step(sched)  # prefill 10 tokens; blocks 0-1 (tokens 0-7) are full and cached
    assert first.is_finished and pool.num_cached_blocks == 2
    again = seq("b", 13, max_tokens=1)  # same first 10 tokens, then 3 more
    sched.add(again)
    assert step(sched)[1] == [("b", 8, 5)]
    assert again.num_cached_tokens == 8
    exact = seq("c", 8, max_tokens=1)  # fully cached prompt: the last block is recomputed for logits
    sched.add(exact)
    assert step(sched)[1] == [("c", 4, 4)]
    assert exact.num_cached_tokens == 4


def test_preemption_frees_the_newest_sequence_and_recomputes_it():
    sched, pool = make(num_blocks=5, budget=64)  # 4 usable blocks of 4 tokens
    a, b = seq("a", 7, max_tokens=3), seq("b", 7, max_tokens=8, first=50)
    sched.add(a)
    sched.add(b)
    step(sched)  # a: 8 tokens -> 2 blocks, b: 2 blocks; the pool is full
    assert pool.num_free_blocks == 0
    phase, plan, _ = step(sched)  # both decode into their 2nd blocks' last slot
    assert plan == [("a", 7, 1), ("b", 7, 1)]
    phase, plan, _ = step(sched)  # a needs a 3rd block: b is preempted; a then finishes
    assert plan == [("a", 8, 1)] and a.is_finished
    assert b.status is SequenceStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    # b comes back: a evicted b's tail block, b's head block is still cached; the rest is recomputed.
    phase, plan, _ = step(sched)
    assert phase == "prefill" and plan == [("b", 4, 5)]
    assert b.num_cached_tokens == 0  # cached tokens are reported for the first admission only


def test_stop_conditions():
    sched, pool = make()
    eos, stop_id, length, ignore = (
        seq("eos", 3),
        seq("stop", 3, stop_token_ids=(7,), ignore_eos=True),
        seq("len", 3, max_tokens=2, ignore_eos=True),
        seq("ign", 3, max_tokens=2, ignore_eos=True),
    )
    for s in (eos, stop_id, length, ignore):
        sched.add(s)
    outs = step(sched, token=EOS)[2]
    assert {o.request_id: o.finish_reason for o in outs} == {
        "eos": FinishReason.STOP, "stop": None, "len": None, "ign": None,
    }
    outs = step(sched, token=7)[2]
    assert {o.request_id: o.finish_reason for o in outs} == {
        "stop": FinishReason.STOP, "len": FinishReason.LENGTH, "ign": FinishReason.LENGTH,
    }
    assert not sched.has_unfinished() and pool.num_free_blocks == 15


def test_context_length_finishes_with_length():
    sched, _ = make(num_blocks=20, budget=128)
    s = seq("a", 62, max_tokens=10)
    sched.add(s)
    step(sched)
    outs = step(sched)[2]
    assert outs[0].finish_reason is FinishReason.LENGTH and s.num_tokens == 64


def test_abort_frees_blocks_wherever_the_request_is():
    sched, pool = make(max_num_seqs=1)
    sched.add(seq("run", 5))
    sched.add(seq("wait", 5))
    step(sched)
    assert sched.abort("wait").finish_reason is FinishReason.ABORT
    assert sched.abort("run").finish_reason is FinishReason.ABORT
    assert sched.abort("unknown") is None
    assert pool.num_free_blocks == 15 and not sched.has_unfinished()


def test_max_num_seqs_limits_admission():
    sched, _ = make(max_num_seqs=2)
    for rid in "abc":
        sched.add(seq(rid, 2))
    assert [p[0] for p in step(sched)[1]] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_load_signals_queued_tokens_and_kv_usage():
    sched, pool = make(budget=8)
    sched.add(seq("a", 10))
    sched.add(seq("b", 6, first=50))
    assert sched.num_queued_tokens == 16 and pool.usage == 0.0
    step(sched)  # a: 8 of 10 prompt tokens computed, 2 blocks
    assert sched.num_queued_tokens == 2 + 6
    assert pool.usage == pytest.approx(2 / 15)


# Lookahead: the engine schedules step N+1 before it reads step N's tokens.


def plan_of(batch):
    return [(it.seq.request_id, it.start, it.num_new_tokens, it.samples) for it in batch.items]


def test_lookahead_schedules_the_pending_token_and_keeps_order():
    sched, _ = make()
    a = seq("a", 5, max_tokens=3, ignore_eos=True)
    sched.add(a)
    first = sched.schedule()
    assert plan_of(first) == [("a", 0, 5, True)] and a.num_pending == 1
    second = sched.schedule()  # a's first token is not known yet: computed at position 5 anyway
    assert plan_of(second) == [("a", 5, 1, True)] and second.phase == "decode"
    assert a.num_pending == 2 and a.num_computed_tokens == 6 and sched.num_queued_tokens == 1
    assert [o.new_token_ids for o in sched.update(first, [11])] == [(11,)]
    # a's 3rd token would be its last: nothing is left to compute until the pending tokens land.
    third = sched.schedule()
    assert plan_of(third) == [("a", 6, 1, True)]
    assert sched.schedule() is None
    sched.update(second, [12])
    outs = sched.update(third, [13])
    assert outs[0].finish_reason is FinishReason.LENGTH and a.output_token_ids == [11, 12, 13]


def test_lookahead_row_of_a_sequence_stopped_meanwhile_is_ignored():
    sched, pool = make()
    a, b = seq("a", 4, max_tokens=8), seq("b", 4, max_tokens=8, first=50)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()
    second = sched.schedule()  # both scheduled again before their first tokens are known
    outs = sched.update(first, [EOS, 7])  # a stops: its row in `second` is wasted
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", FinishReason.STOP), ("b", None)]
    assert a.is_finished and a.block_ids == []
    outs = sched.update(second, [7, 7])
    assert [(o.request_id, o.new_token_ids) for o in outs] == [("b", (7,))]
    assert b.output_token_ids == [7, 7] and b.num_pending == 0
    sched.abort("b")
    assert pool.num_free_blocks == 15


def test_lookahead_preempted_sequence_keeps_its_pending_token():
    sched, pool = make(num_blocks=5, budget=64)  # 4 usable blocks of 4 tokens
    a, b = seq("a", 7, max_tokens=3), seq("b", 7, max_tokens=8, first=50)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()  # prefill both: 2 blocks each, the pool is full
    second = sched.schedule()  # decode both at position 7
    third = sched.schedule()  # a needs a 3rd block: b (with 2 tokens pending) is preempted
    assert plan_of(third) == [("a", 8, 1, True)]
    assert b.status is SequenceStatus.WAITING and b.num_pending == 2 and b.block_ids == []
    assert sched.schedule() is None  # a's next token is its last; b waits for its pending tokens
    sched.update(first, [7, 8])
    sched.update(second, [7, 9])
    assert b.output_token_ids == [8, 9] and b.num_pending == 0  # preempted, yet nothing is lost
    sched.update(third, [7])
    assert a.is_finished
    assert plan_of(sched.schedule()) == [("b", 4, 5, True)]  # recomputed with both tokens (head block cached)
    assert pool.num_free_blocks == 4 - 3


def test_lookahead_abort_while_in_flight():
    sched, pool = make()
    sched.add(seq("a", 5))
    batch = sched.schedule()
    sched.abort("a")
    assert sched.update(batch, [7]) == [] and pool.num_free_blocks == 15
