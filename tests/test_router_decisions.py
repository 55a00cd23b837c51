"""The router's decision path without workers running requests: its own assignments spread a burst over
idle workers (and leave with the requests), and every decision is logged with its terms and the choices
the other arms' policies would have made. Worker handles are built by hand with the loads they report;
no RPC is made before a request runs."""

from __future__ import annotations

import pytest

from splitserve.engine.sampling_params import SamplingParams
from splitserve.index.table import PrefixMatch
from splitserve.kvtransfer.requests import sampling_to_proto
from splitserve.protos import common_pb2
from splitserve.router.core import (
    ArmAssigner,
    Routed,
    RoutedRequest,
    Router,
    WorkerHandle,
    WorkerSet,
    measured_costs,
)
from splitserve.router.decision_log import DecisionLog, read_decision_log
from splitserve.router.inflight import Ledger
from splitserve.router.policies import LOCAL, make_policy

IDLE = common_pb2.WorkerLoad(free_blocks=1000, kv_usage=0.0)


def worker_set(roles: dict[str, str]) -> WorkerSet:
    workers = WorkerSet()
    for wid, role in roles.items():  # the handles a poll would have filled in: healthy, idle
        workers._workers[wid] = WorkerHandle(wid, role, f"{wid}:0", None, None, IDLE, True)
    return workers


def request(i: int, num_tokens: int = 320) -> RoutedRequest:
    sampling = sampling_to_proto(SamplingParams(max_tokens=64, temperature=0.0))
    return RoutedRequest(f"r{i}", list(range(3, 3 + num_tokens)), sampling, session_id=f"s{i}")


def decide_burst(router: Router, n: int):
    """`n` requests decided back to back, each still running (its generator open after the decision)."""
    running = [router.generate(request(i)) for i in range(n)]
    return running, [next(gen).decision for gen in running]


@pytest.mark.parametrize("policy", ["cpd", "least_loaded", "prefix_affinity"])
def test_a_burst_spreads_over_idle_decode_workers_when_the_router_counts_its_own_assignments(policy):
    roles = {"f0": "fresh", "w0": "warm", "d0": "decode", "d1": "decode"}
    router = Router(worker_set(roles), {policy: make_policy(policy)}, "m", 16, lambda h: {}, ledger=Ledger())
    running, decisions = decide_burst(router, 16)
    assert sorted(d.decode for d in decisions).count("d0") == 8  # 8 on each
    # Prefill work spreads too: every request adds its 320 tokens to its prefill target's queue.
    targets = [d.prefill or d.decode for d in decisions]
    assert len(set(targets)) > 1
    ledger = router.ledger
    assert sum(ledger.counts[d].running_requests for d in ("d0", "d1")) == 16
    # Each also runs on its prefill worker until its first token (none has come: no RPC was made).
    disaggregated = sum(d.prefill is not None for d in decisions)
    assert sum(ledger.counts[p].running_requests for p in ("f0", "w0") if p in ledger.counts) == disaggregated
    for gen in running:
        gen.close()  # the requests end: their assignments leave the ledger
    assert all((c.queued_tokens, c.running_requests, c.blocks) == (0, 0, 0) for c in ledger.counts.values())


def test_without_the_ledger_a_burst_piles_onto_one_worker():
    roles = {"f0": "fresh", "w0": "warm", "d0": "decode", "d1": "decode"}
    router = Router(worker_set(roles), {"cpd": make_policy("cpd")}, "m", 16, lambda h: {})
    running, decisions = decide_burst(router, 16)
    assert len({d.decode for d in decisions}) == 1 and len({d.prefill for d in decisions}) == 1
    for gen in running:
        gen.close()


def test_the_ledger_folds_into_reported_loads_without_counting_twice():
    ledger = Ledger()
    ticket = ledger.assign({"d0": (100, 1, 30), "f0": (400, 0, 0)})
    reported = common_pb2.WorkerLoad(queued_tokens=50, running_requests=0, free_blocks=90, kv_usage=0.1,
                                     max_running_requests=64, step_ms=3.5, step_tokens=2048,
                                     tiers=common_pb2.KVTierStats(fetch_ms=12.0, host_hit_tokens=64),
                                     costs=common_pb2.MeasuredCosts(host_load_bytes_per_s=5e9))  # fmt: skip
    seen = ledger.adjusted("d0", reported)  # 100 usable blocks: 90 free by report, 70 after our 30
    assert (seen.max_running_requests, seen.step_ms, seen.step_tokens) == (64, 3.5, 2048)  # as reported
    # What it measured (tier stats, costs) the views take from the polled load, not from this copy.
    workers = worker_set({"d0": "decode"})
    handle = workers.get("d0")
    handle.load, handle.measured = reported, measured_costs(reported.costs)
    (view,) = Router(workers, {"cpd": make_policy("cpd")}, "m", 16, lambda h: {}, ledger=ledger).views({})
    assert (view.fetch_s, view.measured.host_load_bytes_per_s) == (0.012, 5e9)
    assert (view.queued_tokens, view.free_blocks) == (100, 70)  # the counts with this router's own
    # Its request waits for its prefill there (the local one): counted as waiting, within the running ones.
    assert (seen.queued_tokens, seen.running_requests + seen.waiting_requests, seen.waiting_requests,
            seen.free_blocks) == (100, 1, 1, 70)  # fmt: skip
    assert seen.kv_usage == pytest.approx(0.3)
    caught_up = common_pb2.WorkerLoad(queued_tokens=120, running_requests=2, free_blocks=60, kv_usage=0.4)
    seen = ledger.adjusted("d0", caught_up)  # the report shows more than we sent: the report wins
    total = seen.running_requests + seen.waiting_requests
    assert (seen.queued_tokens, total, seen.free_blocks) == (120, 2, 60)
    ticket.first_token()
    assert ledger.adjusted("f0", common_pb2.WorkerLoad()).queued_tokens == 0
    assert ledger.adjusted("d0", reported).running_requests == 1  # still decoding
    ticket.end()
    ticket.end()  # idempotent
    assert ledger.adjusted("d0", reported) == reported


def test_every_decision_is_logged_with_its_terms_and_the_other_arms_shadow_choices(tmp_path):
    roles = {"f0": "fresh", "w0": "warm", "d0": "decode", "d1": "decode"}
    shares = {"cpd": 0.5, "round_robin": 0.5}
    held = {"d1": PrefixMatch(20), "w0": PrefixMatch(20)}  # 320 tokens in the index on d1 and w0
    log = DecisionLog(tmp_path / "decisions.jsonl")
    router = Router(worker_set(roles), {n: make_policy(n) for n in shares}, "m", 16, lambda h: held,
                    ArmAssigner(shares), shadows={n: make_policy(n) for n in (*shares, "least_loaded")},
                    ledger=Ledger(), decision_log=log)  # fmt: skip
    routed = []
    for i in range(12):
        gen = router.generate(request(i, num_tokens=330))
        routed.append(next(gen))
        gen.close()
    log.close()
    records = read_decision_log(tmp_path / "decisions.jsonl")
    assert [r.request_id for r in records] == [f"r{i}" for i in range(12)]
    for rec, out in zip(records, routed, strict=True):
        assert isinstance(out, Routed) and rec.arm == out.arm
        d = out.decision
        assert (rec.choice.pool, rec.choice.prefill, rec.choice.decode) == (d.pool, d.prefill, d.decode)
        assert rec.terms == d.terms and rec.prompt_tokens == 330
        assert set(rec.shadow) == {"cpd", "round_robin", "least_loaded"} - {rec.arm}
        target = d.decode if d.pool == LOCAL else d.prefill
        held_blocks = held.get(target, PrefixMatch(0)).num_blocks
        assert rec.predicted_cached_tokens == held_blocks * 16 == d.terms["predicted_cached_tokens"]
    cpd = [r for r in records if r.arm == "cpd"]
    assert cpd and all(r.choice.pool == LOCAL and r.choice.decode == "d1" for r in cpd)  # 10-token suffix
