"""Routing policies decide exactly as documented, from per-worker prefix matches and reported load."""

from __future__ import annotations

import pytest

from splitserve.router.policies import (
    DECODE,
    FRESH,
    LOCAL,
    WARM,
    NoWorker,
    RequestShape,
    WorkerView,
    make_policy,
)

REQ = RequestShape(num_prompt_tokens=1000, block_size=16)  # 62 full blocks


def cluster(**overrides):
    """f1, f2 fresh; w1, w2 warm; d1, d2 decode — idle and holding nothing unless overridden."""
    roles = {"f1": FRESH, "f2": FRESH, "w1": WARM, "w2": WARM, "d1": DECODE, "d2": DECODE}
    return [WorkerView(wid, role, **overrides.get(wid, {})) for wid, role in roles.items()]


def test_round_robin_cycles_over_prefill_and_decode_workers():
    policy = make_policy("round_robin")
    picks = [(d.prefill, d.decode) for d in (policy.route(REQ, cluster()) for _ in range(5))]
    assert picks == [("f1", "d1"), ("f2", "d2"), ("w1", "d1"), ("w2", "d2"), ("f1", "d1")]


def test_least_loaded_uses_the_workers_reported_queues():
    workers = cluster(f1={"queued_tokens": 500}, f2={"queued_tokens": 100}, w1={"queued_tokens": 300},
                      w2={"queued_tokens": 100, "running_requests": 2}, d1={"queued_tokens": 7})
    decision = make_policy("least_loaded").route(REQ, workers)
    assert (decision.prefill, decision.decode, decision.pool) == ("f2", "d2", FRESH)
    assert decision.terms == {"prefill_queued_tokens": 100.0, "decode_queued_tokens": 0.0}


def test_prefix_affinity_prefers_cached_tokens_net_of_load_and_guards_hot_spots():
    policy = make_policy("prefix_affinity", max_queue_gap_tokens=1000)
    workers = cluster(w1={"matched_blocks": 50, "queued_tokens": 300}, w2={"matched_blocks": 40})
    decision = policy.route(REQ, workers)  # w1: 800 - 300 = 500 beats w2: 640
    assert decision.prefill == "w2" and decision.terms["score"] == 640.0
    workers = cluster(w1={"matched_blocks": 60, "queued_tokens": 100})  # 960 - 100 = 860: w1
    assert policy.route(REQ, workers).prefill == "w1"
    # w1 holds 3840 of 4000 tokens: still the best score (3840 - 2000) with a 2000-token queue, but that
    # queue is more than 1000 tokens longer than the idlest worker's: the least loaded one takes it.
    hot = cluster(w1={"matched_blocks": 240, "queued_tokens": 2000}, f1={"queued_tokens": 150})
    decision = policy.route(RequestShape(4000, 16), hot)
    assert (decision.prefill, decision.terms["hot_spot_guard"]) == ("f2", 1.0)
    assert make_policy("prefix_affinity").route(RequestShape(4000, 16), hot).prefill == "w1"  # gap 8192


def test_cpd_prefills_a_short_suffix_on_the_decode_worker_that_holds_the_context():
    workers = cluster(d2={"matched_blocks": 50}, w1={"matched_blocks": 50})  # suffix 1000 - 800 = 200
    decision = make_policy("cpd").route(REQ, workers)
    assert (decision.pool, decision.prefill, decision.decode) == (LOCAL, None, "d2")
    assert decision.terms["decode_uncached_tokens"] == 200.0


def test_cpd_sends_mostly_cached_prompts_to_the_warm_pool_and_new_ones_to_the_fresh_pool():
    policy = make_policy("cpd")
    warm = cluster(w2={"matched_blocks": 40}, w1={"matched_blocks": 10})  # hit ratio 0.64
    decision = policy.route(REQ, warm)
    assert (decision.pool, decision.prefill) == (WARM, "w2") and decision.terms["hit_ratio"] == 0.64
    fresh = cluster(w2={"matched_blocks": 20}, f1={"queued_tokens": 50})  # hit ratio 0.32
    decision = policy.route(REQ, fresh)
    assert (decision.pool, decision.prefill) == (FRESH, "f2")
    no_fresh = [w for w in fresh if w.role != FRESH]  # an empty pool falls back to the other
    assert policy.route(REQ, no_fresh).prefill == "w2"


def test_cpd_picks_the_decode_worker_by_cached_context_net_of_load():
    workers = cluster(d1={"matched_blocks": 10, "queued_tokens": 400}, d2={"matched_blocks": 5})
    assert make_policy("cpd").route(REQ, workers).decode == "d2"  # 160 - 400 < 80


def test_unknown_policies_and_missing_workers_fail_clearly():
    with pytest.raises(ValueError, match="known: cpd, least_loaded"):
        make_policy("fastest")
    with pytest.raises(NoWorker, match="decode"):
        make_policy("least_loaded").route(REQ, [w for w in cluster() if w.role != DECODE])
    only_decode = [w for w in cluster() if w.role == DECODE]
    with pytest.raises(NoWorker, match="prefill"):
        make_policy("prefix_affinity").route(REQ, only_decode)
    assert make_policy("cpd").route(REQ, only_decode).pool == LOCAL  # cpd prefills on the decode worker
