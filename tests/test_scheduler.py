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
