"""Routing policies decide exactly as documented, from per-worker prefix matches and reported load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from splitserve.router.cost_model import (
    H200_HOST_LOAD_BYTES_PER_S,
    UNMEASURED,
    CalibrationError,
    CostModel,
    DecodeCost,
    Measured,
    PrefillCost,
    TransferCost,
    cost_model_from_json,
    load_calibration,
)
from splitserve.router.fetch_plan import plan_fetch
from splitserve.router.policies import (
    DECODE,
    FRESH,
    LOCAL,
    WARM,
    NoWorker,
    RequestShape,
    WorkerView,
    check_policy_options,
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


def test_cpd_threshold_prefills_a_short_suffix_on_the_decode_worker_that_holds_the_context():
    workers = cluster(d2={"matched_blocks": 50}, w1={"matched_blocks": 50})  # suffix 1000 - 800 = 200
    decision = make_policy("cpd_threshold").route(REQ, workers)
    assert (decision.pool, decision.prefill, decision.decode) == (LOCAL, None, "d2")
    assert decision.terms["decode_uncached_tokens"] == 200.0


def test_cpd_threshold_sends_mostly_cached_prompts_to_the_warm_pool_and_new_ones_to_the_fresh_pool():
    policy = make_policy("cpd_threshold")
    warm = cluster(w2={"matched_blocks": 40}, w1={"matched_blocks": 10})  # hit ratio 0.64
    decision = policy.route(REQ, warm)
    assert (decision.pool, decision.prefill) == (WARM, "w2") and decision.terms["hit_ratio"] == 0.64
    fresh = cluster(w2={"matched_blocks": 20}, f1={"queued_tokens": 50})  # hit ratio 0.32
    decision = policy.route(REQ, fresh)
    assert (decision.pool, decision.prefill) == (FRESH, "f2")
    no_fresh = [w for w in fresh if w.role != FRESH]  # an empty pool falls back to the other
    assert policy.route(REQ, no_fresh).prefill == "w2"


def test_cpd_threshold_picks_the_decode_worker_by_cached_context_net_of_load():
    workers = cluster(d1={"matched_blocks": 10, "queued_tokens": 400}, d2={"matched_blocks": 5})
    assert make_policy("cpd_threshold").route(REQ, workers).decode == "d2"  # 160 - 400 < 80


def test_unknown_policies_and_missing_workers_fail_clearly():
    with pytest.raises(ValueError, match="known: colocated, cpd, cpd_threshold, least_loaded"):
        make_policy("fastest")
    with pytest.raises(NoWorker, match="decode"):
        make_policy("least_loaded").route(REQ, [w for w in cluster() if w.role != DECODE])
    only_decode = [w for w in cluster() if w.role == DECODE]
    with pytest.raises(NoWorker, match="prefill"):
        make_policy("prefix_affinity").route(REQ, only_decode)
    for name in ("cpd", "cpd_threshold"):  # cpd prefills on the decode worker
        assert make_policy(name).route(REQ, only_decode).pool == LOCAL
    with pytest.raises(ValueError, match=r"policy cpd has no option no_such_option; its options: "
                                         r"warm_min_hit_ratio, local_prefill_max_tokens"):
        make_policy("cpd", no_such_option=1.0)
    with pytest.raises(ValueError, match="its options: none"):
        make_policy("least_loaded", load_weight=2.0)
    check_policy_options(["cpd", "least_loaded"], {"miss_weight": 4.0})  # one arm takes it: fine
    with pytest.raises(ValueError, match="takes the option loca_prefill"):
        check_policy_options(["cpd", "least_loaded"], {"loca_prefill": 4.0})


# Round numbers, so each cost below is checked by hand: prefill 1 ms per new token, a decode step 10 ms
# plus 1 ms per sequence, KV 100 bytes per token moved at 1 MB/s (0.1 ms per token).
COSTS = CostModel(prefill=PrefillCost(0.0, 1e-3, 0.0), decode=DecodeCost(0.01, 1e-3, 0.0),
                  transfers={"grpc": TransferCost(0.0, 1e6)}, kv_bytes_per_token=100)  # fmt: skip


def cpd(**options):
    """cpd on COSTS (unless given others); without the miss penalty or fetches unless asked (the checks
    below are of the other terms)."""
    return make_policy("cpd", **{"costs": COSTS, "miss_weight": 0.0, "fetch": False, **options})


def test_cpd_sends_a_warm_turn_to_the_worker_that_holds_its_context():
    # d2 holds the conversation (60 blocks = 960 tokens) and runs nothing: it prefills the 40-token suffix
    # itself: TTFT 0.040 + one decode step 0.011 = 0.051, against 0.2 + 0.011 on f1 (which holds 800).
    workers = cluster(d2={"matched_blocks": 60}, f1={"matched_blocks": 50}, w1={"matched_blocks": 10})
    decision = cpd().route(REQ, workers)
    assert (decision.pool, decision.decode) == (LOCAL, "d2")
    assert decision.terms["cost_s"] == pytest.approx(0.051) and decision.terms["interference_s"] == 0.0
    # With 40 sequences running on d2 a local prefill would stall each of them 40 ms (1.6 s in all): the
    # prefill worker holding most of the prompt (f1, the one that computed the earlier turn, not the warm
    # pool's w1) computes 200 tokens, and the idle d1 decodes (the 0.1 s transfer hides under the prefill).
    workers = cluster(d2={"matched_blocks": 60, "running_requests": 40}, f1={"matched_blocks": 50},
                      w1={"matched_blocks": 10})  # fmt: skip
    decision = cpd().route(REQ, workers)
    assert (decision.pool, decision.prefill, decision.decode) == (FRESH, "f1", "d1")
    assert decision.terms["ttft_s"] == pytest.approx(0.2) and decision.terms["cost_s"] == pytest.approx(0.211)
    assert decision.terms["transfer_tail_s"] == 0.0 and decision.terms["cached_tokens"] == 800.0


def test_cpd_prices_fetching_the_context_from_its_holder():
    # d2 holds the conversation (60 blocks) but runs 40 sequences: with fetches, the idle d1 fetches d2's
    # 60 blocks (960 tokens × 100 bytes at 1 MB/s: 0.096 s) and computes 40 tokens (0.040 s) itself,
    # instead of computing 1000 (1 s); through a prefill worker the same would add a 0.06 s transfer tail.
    workers = cluster(d2={"matched_blocks": 60, "running_requests": 40})
    decision = cpd(fetch=True).route(REQ, workers)
    assert (decision.pool, decision.decode, decision.fetch_from, decision.fetch_blocks) == (
        LOCAL, "d1", "d2", 60)  # fmt: skip
    assert decision.terms["fetch_s"] == pytest.approx(0.096)
    assert decision.terms["ttft_s"] == pytest.approx(0.136)
    assert decision.terms["cached_tokens"] == 960.0
    # Moving KV 100× slower than computing it: recomputing wins, no fetch (f1 holds 50 of the blocks).
    slow = CostModel(prefill=COSTS.prefill, decode=COSTS.decode, transfers={"grpc": TransferCost(0.0, 1e4)},
                     kv_bytes_per_token=100)  # fmt: skip
    workers = cluster(d2={"matched_blocks": 60, "running_requests": 40}, f1={"matched_blocks": 50})
    decision = make_policy("cpd", costs=slow, miss_weight=0.0).route(REQ, workers)
    assert (decision.prefill, decision.fetch_from, decision.terms["fetch_s"]) == ("f1", None, 0.0)


def test_the_fetch_plan_takes_the_largest_holder_and_only_what_the_target_lacks():
    workers = cluster(d1={"matched_blocks": 70}, d2={"matched_blocks": 40}, w1={"matched_blocks": 20})
    target = workers[2]  # w1
    plan = plan_fetch(REQ, target, workers, COSTS)
    # d1's 70 are capped at the 62 usable blocks (the last prompt token is computed): 42 more than w1 has.
    assert (plan.holder, plan.num_blocks, plan.num_tokens) == ("d1", 62, 42 * 16)
    assert plan.seconds == pytest.approx(42 * 16 * 100 / 1e6) and plan.saved_s == pytest.approx(0.672)
    assert plan_fetch(REQ, workers[0], [workers[0]], COSTS) is None  # nobody holds more
    # w1's fetches measured 0.5 s for 10 kB (the model says 0.01 s): 0.49 s of overhead each, and the
    # 42 blocks' 67 kB at 1 MB/s on top: 0.557 s, still under the 0.672 s of compute saved; at 0.7 s, not.
    slow = dataclasses.replace(target, fetch_s=0.5, fetch_bytes=1e4)
    plan = plan_fetch(REQ, slow, [slow, *workers[3:]], COSTS)
    assert plan.seconds == pytest.approx(0.49 + 42 * 16 * 100 / 1e6)
    slower = dataclasses.replace(target, fetch_s=0.7, fetch_bytes=1e4)
    assert plan_fetch(REQ, slower, [slower, *workers[3:]], COSTS) is None


def test_cpd_spreads_warm_turns_by_queue_and_keeps_fresh_ones_in_the_fresh_pool():
    # Both warm workers hold the prompt's first 40 blocks; w2's queue of 300 tokens costs 0.3 s: w1.
    workers = cluster(w1={"matched_blocks": 40}, w2={"matched_blocks": 40, "queued_tokens": 300},
                      d1={"running_requests": 3}, f1={"queued_tokens": 5000},
                      f2={"queued_tokens": 5000})  # fmt: skip
    decision = cpd(local_prefill_max_tokens=0).route(REQ, workers)
    assert (decision.prefill, decision.decode) == ("w1", "d2")
    # Mostly new (hit ratio 0.32 < 0.5): the fresh pool, even with both warm workers idle.
    workers = cluster(w1={"matched_blocks": 20}, f1={"queued_tokens": 50})
    decision = cpd(local_prefill_max_tokens=0).route(REQ, workers)
    assert (decision.pool, decision.prefill) == (FRESH, "f2") and decision.terms["hit_ratio"] == 0.32


def test_cpd_skips_a_decode_worker_without_room_for_the_kv():
    # 1000 prompt + 100 output tokens = 69 blocks; d2 holds 60 of them but has 5 free: d1 (idle, 100 free).
    request = RequestShape(1000, 16, max_tokens=100)
    workers = cluster(d2={"matched_blocks": 60, "free_blocks": 5}, d1={"free_blocks": 100})
    assert cpd().route(request, workers).decode == "d1"
    # No decode worker has room: the best one is still chosen (it refuses with a clear error).
    workers = cluster(d2={"matched_blocks": 60, "free_blocks": 5}, d1={"free_blocks": 6})
    assert cpd().route(request, workers).decode == "d2"


def test_colocated_prefills_everything_on_the_decode_worker_holding_most_net_of_load():
    workers = cluster(d1={"matched_blocks": 10, "queued_tokens": 100}, d2={"matched_blocks": 5})
    decision = make_policy("colocated").route(REQ, workers)  # 160 - 100 = 60 < 80
    assert (decision.pool, decision.prefill, decision.decode) == (LOCAL, None, "d2")
    busy = cluster(d1={"running_requests": 3})  # equal scores: the one running fewer requests
    assert make_policy("colocated").route(REQ, busy).decode == "d2"


def test_cpd_knows_that_workers_sharing_a_device_are_not_isolated():
    # The case above, but every worker on one GPU: prefilling on f1 would stall d2's 40 sequences for its
    # 0.2 s compute just as surely (8 s of stalls), so the 40-token local prefill (1.6 s of stalls) wins.
    def one_gpu(**overrides):
        return [WorkerView(**{**w.__dict__, "device": "cuda:gpu-0"}) for w in cluster(**overrides)]

    workers = one_gpu(d2={"matched_blocks": 60, "running_requests": 40}, f1={"matched_blocks": 50})
    decision = cpd().route(REQ, workers)
    assert (decision.pool, decision.decode) == (LOCAL, "d2")
    assert decision.terms["interference_s"] == pytest.approx(1.6)


def test_cpd_counts_a_queue_by_its_requests_fixed_costs_too():
    # 10 ms per prefill request before its tokens (and 10 µs per token): a queue of 3 requests waits 30 ms
    # even when their tokens are few.
    costs = CostModel(PrefillCost(0.01, 1e-5, 0.0), DecodeCost(0.01, 1e-3, 0.0),
                      {"grpc": TransferCost(0.0, 1e9)}, kv_bytes_per_token=100)  # fmt: skip
    policy = make_policy("cpd", costs=costs, local_prefill_max_tokens=0)
    # w1 and w2 hold the same 50 blocks; w1 has 3 requests queued (0.03 s of fixed costs): w2.
    workers = cluster(w1={"matched_blocks": 50, "running_requests": 3}, w2={"matched_blocks": 50})
    assert policy.route(REQ, workers).prefill == "w2"


def test_cpd_miss_penalty_keeps_a_conversation_on_the_worker_that_holds_it():
    # 10 ms per request, 10 µs per token. w1 holds 800 of the 1000 tokens but has 2 requests queued (20 ms);
    # w2 is idle and holds nothing. By TTFT alone w2 is sooner (20 ms against 32 ms) ... (without fetches:
    # w2 would fetch w1's blocks)
    costs = CostModel(PrefillCost(0.01, 1e-5, 0.0), DecodeCost(0.01, 1e-3, 0.0),
                      {"grpc": TransferCost(0.0, 1e9)}, kv_bytes_per_token=100)  # fmt: skip
    workers = [w for w in cluster(w1={"matched_blocks": 50, "running_requests": 2}) if w.role != FRESH]
    by_ttft = make_policy("cpd", costs=costs, local_prefill_max_tokens=0, miss_weight=0.0, fetch=False)
    assert by_ttft.route(REQ, workers).prefill == "w2"
    # ... but recomputing 1000 tokens (not 200) at 32 × their compute costs 0.32 s against 0.064 s: w1.
    decision = make_policy("cpd", costs=costs, local_prefill_max_tokens=0, fetch=False).route(REQ, workers)
    assert decision.prefill == "w1" and decision.terms["cached_tokens"] == 800.0


def test_cpd_prices_the_wait_for_a_slot_in_a_full_decode_batch():
    # d1 holds the conversation but runs 10 sequences (2 waiting) at a cap of 8, a step measured at 50 ms;
    # with 20 tokens each, one finishes every 20 × 0.05 / 8 s: this request, third past the cap, waits
    # 0.375 s. Prefilled locally it waits before it starts (TTFT 0.375 + one 50 ms step for its 40
    # tokens); on f1 (200 tokens to compute, 0.2 s) the first token comes first and the rest waits
    # 0.175 s, weighed at half: f1. Interference is left out here (weight 0), the test is of the wait.
    request = RequestShape(1000, 16, max_tokens=20)
    full = {"matched_blocks": 60, "running_requests": 10, "max_running": 8, "step_s": 0.05}
    workers = [w for w in cluster(d1=full, f1={"matched_blocks": 50}) if w.worker_id != "d2"]
    decision = cpd(interference_weight=0.0).route(request, workers)
    assert (decision.pool, decision.prefill, decision.decode) == (FRESH, "f1", "d1")
    assert decision.terms["slot_wait_s"] == pytest.approx(0.375)
    assert decision.terms["stall_s"] == pytest.approx(0.5 * 0.175)
    local = cpd(interference_weight=0.0)
    only_local = [w for w in workers if w.role == DECODE]
    assert local.route(request, only_local).terms["ttft_s"] == pytest.approx(0.425)
    # Below its cap there is no wait: the local prefill (one measured step, 0.05 s) wins.
    roomy = {**full, "max_running": 16}
    workers = [w for w in cluster(d1=roomy, f1={"matched_blocks": 50}) if w.worker_id != "d2"]
    decision = cpd(interference_weight=0.0).route(request, workers)
    assert (decision.pool, decision.terms["slot_wait_s"]) == (LOCAL, 0.0)


def test_cpd_prices_a_queue_by_the_step_time_the_worker_measures_when_longer():
    # w1 and w2 hold the same 50 blocks (200 tokens to compute, 0.2 s by the model). w1 has 2 prefills
    # queued and measures 0.1 s steps: 3 steps, 0.3 s; w2 is idle: w2.
    busy = {"matched_blocks": 50, "running_requests": 2, "step_s": 0.1}
    workers = cluster(w1=busy, w2={"matched_blocks": 50})
    policy = cpd(local_prefill_max_tokens=0)
    assert policy.route(REQ, workers).prefill == "w2"
    # A worker that reports its token budget is counted in steps of it: 150 queued + 200 tokens at 100 a
    # step is 4 steps, 0.4 s (more than the model's 0.35 s).
    w1 = {"matched_blocks": 50, "queued_tokens": 150, "step_s": 0.1, "step_tokens": 100}
    workers = [w for w in cluster(w1=w1) if w.worker_id != "w2" and w.role != FRESH]
    assert policy.route(REQ, workers).terms["ttft_s"] == pytest.approx(0.4)


# COSTS with a host tier that loads KV back at 10 MB/s: 10 µs a token, a hundredth of computing it.
HOST_COSTS = dataclasses.replace(COSTS, host_load_bytes_per_s=1e7)


def test_cpd_prices_a_host_tier_hit_as_a_load_far_cheaper_than_recompute_but_not_free():
    # d2 holds the conversation's 60 blocks in KV memory, d1 the same in its host tier only: both prefill
    # the 40-token suffix (0.040 s), d1 after loading 960 tokens back (96 kB at 10 MB/s: 0.0096 s). (Were
    # the load free, the tie would go to d1, the first by id.)
    workers = cluster(d1={"matched_blocks": 60, "matched_host_blocks": 60}, d2={"matched_blocks": 60})
    decision = cpd(costs=HOST_COSTS).route(REQ, workers)
    assert (decision.pool, decision.decode, decision.terms["host_load_s"]) == (LOCAL, "d2", 0.0)
    # Only d2 holds it: loading (0.0096 s) beats recomputing 1000 tokens on d1 (1 s) by far.
    workers = cluster(d2={"matched_blocks": 60, "matched_host_blocks": 60})
    decision = cpd(costs=HOST_COSTS).route(REQ, workers)
    assert (decision.pool, decision.decode) == (LOCAL, "d2")
    assert decision.terms["host_load_s"] == pytest.approx(0.0096)
    assert decision.terms["ttft_s"] == pytest.approx(0.0496) and decision.terms["cached_tokens"] == 960.0
    # 20 of its 60 in the host tier (the tail of the match): 320 tokens loaded, 0.0032 s.
    workers = cluster(d2={"matched_blocks": 60, "matched_host_blocks": 20})
    assert cpd(costs=HOST_COSTS).route(REQ, workers).terms["host_load_s"] == pytest.approx(0.0032)


def test_cpd_uses_what_a_worker_measured_in_place_of_the_calibration():
    fast = Measured(prefill_tokens_per_s=((0, 2000.0), (1024, 500.0)))  # twice COSTS' 1000 tokens/s at first
    # The fresh pool only (nothing cached anywhere): f1 measured 2000 tokens/s, f2 nothing (the model's 1000).
    workers = cluster(f1={"measured": fast})
    decision = cpd(local_prefill_max_tokens=0).route(REQ, workers)
    assert decision.prefill == "f1" and decision.terms["ttft_s"] == pytest.approx(0.5)
    # Past 1024 cached tokens its measured bucket says 500 tokens/s: 1400 new tokens take 2.8 s (not 1.4).
    request = RequestShape(num_prompt_tokens=3000, block_size=16)
    workers = [w for w in cluster(w1={"matched_blocks": 100, "measured": fast}) if w.worker_id != "w2"]
    decision = cpd(local_prefill_max_tokens=0).route(request, workers)
    assert decision.prefill == "w1" and decision.terms["ttft_s"] == pytest.approx(2.8)
    # Its pushes measured 100 kB/s (the model says 1 MB/s): the 1000 tokens' 100 kB take 1 s, 0.5 s of it
    # after its 0.5 s prefill.
    pushes = dataclasses.replace(fast, push_bytes_per_s=(("grpc", 1e5),))
    decision = cpd(local_prefill_max_tokens=0).route(REQ, cluster(f1={"measured": pushes}))
    assert decision.prefill == "f1" and decision.terms["transfer_tail_s"] == pytest.approx(0.5)
    # A host tier it measured at 1 MB/s: 960 tokens back in 0.096 s (the model's 10 MB/s: 0.0096).
    slow_tier = cluster(d2={"matched_blocks": 60, "matched_host_blocks": 60,
                            "measured": Measured(host_load_bytes_per_s=1e6)})  # fmt: skip
    assert cpd(costs=HOST_COSTS).route(REQ, slow_tier).terms["host_load_s"] == pytest.approx(0.096)


def test_the_cost_model_formulas_fall_back_to_the_calibration_bucket_by_bucket():
    m = Measured(host_load_bytes_per_s=0.0, prefill_tokens_per_s=((0, 0.0), (1024, 500.0)),
                 push_bytes_per_s=(("same-host", 5e6),))  # fmt: skip
    assert COSTS.prefill_seconds(100, 10, m) == COSTS.prefill.seconds(100, 10)  # its bucket: unmeasured
    assert COSTS.prefill_seconds(100, 2000, m) == pytest.approx(0.2)  # fixed 0 + 100 / 500
    assert COSTS.prefill_seconds(0, 2000, m) == 0.0
    assert COSTS.host_load_seconds(1000, m) == 1000 * 100 / COSTS.host_load_bytes_per_s
    assert COSTS.push(m) == COSTS.transfer("grpc")  # measured over another transport only
    assert COSTS.push(m, "grpc") == COSTS.push(UNMEASURED)


def test_a_fetch_from_a_host_tier_holder_pays_its_load_and_saves_at_the_targets_measured_rate():
    workers = cluster(d1={"matched_blocks": 70, "matched_host_blocks": 70}, w1={"matched_blocks": 20,
                      "measured": Measured(prefill_tokens_per_s=((0, 2000.0),))})  # fmt: skip
    plan = plan_fetch(REQ, workers[2], workers, HOST_COSTS)
    # 42 blocks (672 tokens, 67.2 kB): 0.0672 s on the wire, 0.00672 s out of d1's host tier first; they
    # save 672 tokens of w1's compute at the 2000 tokens/s it measured: 0.336 s.
    assert (plan.holder, plan.num_tokens) == ("d1", 672)
    assert plan.seconds == pytest.approx(0.0672 + 0.00672) and plan.saved_s == pytest.approx(0.336)


def test_a_calibration_carries_its_host_load_rate_or_assumes_the_h200s():
    written = cost_model_from_json(HOST_COSTS.to_json())
    assert written.host_load_bytes_per_s == 1e7 and written == HOST_COSTS
    older = {k: v for k, v in HOST_COSTS.to_json().items() if k != "host_load_bytes_per_s"}
    assert cost_model_from_json(older).host_load_bytes_per_s == H200_HOST_LOAD_BYTES_PER_S == 52e9
    with pytest.raises(CalibrationError, match=r"calibration\.host_load_bytes_per_s: must be positive"):
        cost_model_from_json(HOST_COSTS.to_json() | {"host_load_bytes_per_s": 0})
    docs = Path(__file__).resolve().parents[1] / "docs"
    assert load_calibration(docs / "calibration-cpu.json").host_load_bytes_per_s == 5.06e9  # measured there
    assert load_calibration(docs / "calibration-h200.json").host_load_bytes_per_s == 52e9
