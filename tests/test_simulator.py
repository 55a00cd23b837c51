"""The simulator reproduces hand-computed timelines exactly, keeps its caches exact, and calls the policies.

Costs in the timeline tests are round numbers: a prefill is 1 ms + 1 ms per new token, a decode step 10 ms,
a KV transfer 1 ms per 500 tokens' worth… precisely: 1,000 bytes per token at 500,000 B/s, no latency — so
n tokens of KV take 2n ms. Blocks are 4 tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from splitserve import cli
from splitserve.experiments.trace import Trace, TraceError, TraceMeta, TraceRequest, save_trace
from splitserve.experiments.workloads import WORKLOADS, make_workload
from splitserve.router.cost_model import (
    CalibrationError,
    CostModel,
    DecodeCost,
    PrefillCost,
    RequestPath,
    TransferCost,
    cost_model_from_json,
)
from splitserve.router.policies import FRESH, LOCAL, WARM, Decision, make_policy
from splitserve.simulator.cache import BlockCache, HolderIndex
from splitserve.simulator.config import SimConfig
from splitserve.simulator.run import simulate

MS = 1e-3
BL = 4
COSTS = CostModel(
    prefill=PrefillCost(fixed_s=1 * MS, per_token_s=1 * MS, per_token_ctx_s=0.0),
    decode=DecodeCost(fixed_s=10 * MS, per_seq_s=0.0, per_ctx_token_s=0.0),
    transfers={"same-host": TransferCost(latency_s=0.0, bytes_per_s=5e5)},
    kv_bytes_per_token=1000,
)


def ms(values):
    """Seconds → milliseconds, rounded away from float noise (the timelines are whole or tenth ms)."""
    if isinstance(values, list):
        return [round(v * 1e3, 6) for v in values]
    return None if values is None else round(values * 1e3, 6)


def request(arrival_ms, input_len, output_len, first_id, session="", turn=0):
    """A request whose ids are first_id, first_id + 1, … (one per started block of its prompt)."""
    num_ids = -(-input_len // BL)
    return TraceRequest(arrival_ms * MS, session, turn, input_len, output_len,
                        tuple(range(first_id, first_id + num_ids)))  # fmt: skip


def trace(*requests):
    return Trace(TraceMeta(block_len=BL, workload="hand"), tuple(requests))


class Scripted:
    """A policy that routes the n-th request as told, remembering what it was shown."""

    name = "scripted"

    def __init__(self, *choices):
        self.choices = list(choices)
        self.seen = []

    def route(self, request, workers):
        self.seen.append((request, {w.worker_id: w for w in workers}))
        pool, prefill, decode = self.choices[len(self.seen) - 1]
        return Decision(self.name, pool, prefill, decode, {"n": float(len(self.seen))})


def config(**overrides):
    shape = {"num_fresh": 1, "num_warm": 0, "num_decode": 1, **overrides}
    return SimConfig(**shape)


def test_one_request_through_a_prefill_worker_and_a_decode_worker():
    run = simulate(trace(request(0, 10, 4, 1)), make_policy("least_loaded"), config(), COSTS)
    (r,) = run.results
    # prefill 1 + 10 = 11 ms; 10 tokens of KV take 20 ms from the prefill's start (layer-wise overlap), so
    # the sequence joins the decode batch at 20 ms: steps end at 30, 40, 50.
    assert (ms(r.ttft_s), ms(r.itl_s), ms(r.e2e_s)) == (11.0, [19.0, 10.0, 10.0], 50.0)
    assert (r.pool, r.prefill_worker, r.decode_worker, r.output_len, r.error) == (
        FRESH,
        "fresh-0",
        "decode-0",
        4,
        None,
    )
    assert (r.cached_tokens, r.predicted_cached_tokens, ms(run.duration_s)) == (0, 0, 50.0)


def test_a_request_reaches_its_workers_after_its_routes_path_cost():
    costs = replace(COSTS, path=RequestPath(pool_s=2 * MS, local_s=1 * MS))
    run = simulate(trace(request(0, 10, 4, 1)), make_policy("least_loaded"), config(), costs)
    # The first test's timeline 2 ms later: prefill [2, 13], KV at 22, steps end at 32, 42, 52.
    assert (ms(run.results[0].ttft_s), ms(run.results[0].e2e_s)) == (13.0, 52.0)
    run = simulate(trace(request(0, 10, 2, 1)), make_policy("colocated"), config(), costs)
    # Local: from 1 ms, one step of the decode worker with its 10-token chunk (1 + 10 ms), then one step.
    assert (ms(run.results[0].ttft_s), ms(run.results[0].e2e_s)) == (12.0, 22.0)
    # A calibration file gives it as `path` (optional: zero without it), each field checked.
    assert cost_model_from_json(costs.to_json()).path == costs.path
    older = {k: v for k, v in costs.to_json().items() if k != "path"}
    assert cost_model_from_json(older).path == RequestPath()
    with pytest.raises(CalibrationError, match=r"calibration\.path: missing field 'local_s'"):
        cost_model_from_json(costs.to_json() | {"path": {"pool_s": 0.001}})


def test_two_requests_queue_fifo_on_one_prefill_worker_and_join_the_batch_at_a_step_boundary():
    t = trace(request(0, 10, 2, 1), request(5, 6, 2, 100))
    run = simulate(t, make_policy("least_loaded"), config(), COSTS)
    a, b = run.results
    # A: prefill [0, 11], KV at 20, one step [20, 30]. B waits for A: prefill [11, 18] (TTFT 18 - 5);
    # its KV lands at max(18, 11 + 12) = 23, inside A's step, so it decodes in [30, 40].
    assert (ms(a.ttft_s), ms(a.itl_s), ms(a.e2e_s)) == (11.0, [19.0], 30.0)
    assert (ms(b.sent_s), ms(b.ttft_s), ms(b.itl_s), ms(b.e2e_s)) == (5.0, 13.0, [22.0], 35.0)
    # At B's decision A had 6 ms of its 11 ms left: ceil(10 × 6 / 11) = 6 uncomputed tokens queued.
    assert run.decisions[1].terms["prefill_queued_tokens"] == 6.0


def test_a_local_prefill_is_chunked_into_the_decode_steps_beside_a_running_sequence():
    policy = Scripted((FRESH, "fresh-0", "decode-0"), (LOCAL, None, "decode-0"))
    t = trace(request(0, 4, 6, 1), request(10, 10, 2, 100))
    run = simulate(t, policy, config(local_chunk_tokens=4), COSTS)
    a, local = run.results
    # A: prefill [0, 5], KV at 8, steps from 8. The local request arrives at 10 and joins at 18: chunks of
    # 4, 4 and 2 tokens add 1 + 4 (its first, with the fixed cost), 4 and 2 ms to steps [18, 33], [33, 47],
    # [47, 59]; its first token at 59, its second after one more step [59, 69].
    assert (ms(local.ttft_s), ms(local.itl_s), ms(local.e2e_s)) == (49.0, [10.0], 59.0)
    assert (local.pool, local.prefill_worker, local.decode_worker) == (LOCAL, "", "decode-0")
    assert ms(a.itl_s) == [13.0, 15.0, 14.0, 12.0, 10.0]  # inflated by the chunks
    # The local request's uncomputed tokens are the decode worker's queued tokens while it waits.
    probe = Scripted((FRESH, "fresh-0", "decode-0"), (LOCAL, None, "decode-0"),
                     (FRESH, "fresh-0", "decode-0"))  # fmt: skip
    simulate(trace(request(0, 4, 6, 1), request(10, 10, 2, 100), request(20, 4, 2, 200)), probe,
             config(local_chunk_tokens=4), COSTS)  # fmt: skip
    assert probe.seen[2][1]["decode-0"].queued_tokens == 10  # its first chunk counts once computed, at 33
    assert probe.seen[2][1]["decode-0"].running_requests == 2


def test_decode_steps_cost_their_sequences_and_growing_context():
    costs = CostModel(COSTS.prefill, DecodeCost(fixed_s=10 * MS, per_seq_s=1 * MS, per_ctx_token_s=1 * MS),
                      COSTS.transfers, COSTS.kv_bytes_per_token)  # fmt: skip
    run = simulate(trace(request(0, 4, 3, 1)), make_policy("least_loaded"), config(), costs)
    # prefill [0, 5], KV at 8; step 1 reads 4 + 1 context tokens: 10 + 1 + 5 = 16 ms, step 2: 17 ms.
    assert ms(run.results[0].itl_s) == [19.0, 17.0]


def test_decode_max_seqs_makes_extra_sequences_wait_fifo():
    t = trace(request(0, 4, 3, 1), request(0, 4, 3, 100))
    policy = Scripted((FRESH, "fresh-0", "decode-0"), (WARM, "warm-0", "decode-0"))
    run = simulate(t, policy, config(num_warm=1, decode_max_seqs=1), COSTS)
    a, b = run.results
    # Both KVs land at 8 ms; A decodes [8, 18], [18, 28]; B only then: [28, 38], [38, 48].
    assert (ms(a.e2e_s), ms(b.itl_s), ms(b.e2e_s)) == (28.0, [33.0, 10.0], 48.0)


def test_a_local_prefill_waits_for_a_free_slot_as_the_engine_does():
    t = trace(request(0, 4, 3, 1), request(10, 4, 2, 100), request(50, 4, 2, 200))
    policy = Scripted((FRESH, "fresh-0", "decode-0"), (LOCAL, None, "decode-0"),
                      (FRESH, "fresh-0", "decode-0"))  # fmt: skip
    run = simulate(t, policy, config(decode_max_seqs=1, local_chunk_tokens=4), COSTS)
    a, local, _ = run.results
    # A holds the only slot from 8 ms ([8, 18], [18, 28]). The local request, sent at 10, starts at 28
    # (not at 18, beside A): its one chunk with the fixed cost, 5 ms, is a step of its own [28, 33]; it
    # keeps the slot it prefilled in and decodes [33, 43].
    assert (ms(a.e2e_s), ms(local.ttft_s), ms(local.itl_s), ms(local.e2e_s)) == (28.0, 23.0, [10.0], 33.0)
    # The decode worker reports its cap, its token budget and its measured step time: steps of 10, 10, 5
    # and 10 ms averaged at 0.2 for the newest: 10, 10, 9, 9.2.
    seen = policy.seen[2][1]["decode-0"]
    assert (seen.max_running, seen.step_tokens, ms(seen.step_s)) == (1, 4, 9.2)


def test_a_shared_device_serializes_the_workers_compute():
    t = trace(request(0, 10, 2, 1), request(1, 10, 2, 100))
    policy = Scripted((FRESH, "fresh-0", "decode-0"), (FRESH, "fresh-1", "decode-0"))
    own = simulate(t, policy, config(num_fresh=2), COSTS).results
    policy = Scripted((FRESH, "fresh-0", "decode-0"), (FRESH, "fresh-1", "decode-0"))
    shared = simulate(t, policy, config(num_fresh=2, shared_device=True), COSTS).results
    # Own devices: B prefills [1, 12]; A's step [20, 30]. Shared: B waits for A's prefill: [11, 22], and
    # A's step, ready at 20, waits for B's: [22, 32]; B's KV lands at max(22, 11 + 20) = 31: [32, 42].
    assert (ms(own[1].ttft_s), ms(own[0].e2e_s)) == (11.0, 30.0)
    assert (ms(shared[1].ttft_s), ms(shared[0].e2e_s), ms(shared[1].e2e_s)) == (21.0, 32.0, 41.0)


def test_a_next_turn_waits_for_its_predecessor_and_finds_its_prefix_on_the_decode_worker():
    turn0 = request(0, 8, 8, 1, session="s", turn=0)  # ids 1, 2; with its output: 16 tokens
    turn1 = TraceRequest(1 * MS, "s", 1, 20, 2, (1, 2, 3, 4, 5))  # scheduled before turn 0 ends
    policy = Scripted((FRESH, "fresh-0", "decode-0"), (LOCAL, None, "decode-0"))
    run = simulate(trace(turn0, turn1), policy, config(), COSTS)
    r0, r1 = run.results
    # turn 0: prefill [0, 9], KV at 16, 7 steps to 86. turn 1 is sent then; decode-0 holds ids 1-4 (the
    # prompt and the output's blocks): 16 cached tokens, a 4-token chunk of 1 + 4 ms.
    assert ms(r0.e2e_s) == 86.0 and ms(r1.sent_s) == 86.0
    _, views = policy.seen[1]
    assert (views["decode-0"].matched_blocks, views["fresh-0"].matched_blocks) == (4, 2)
    assert (r1.cached_tokens, r1.predicted_cached_tokens, ms(r1.ttft_s), ms(r1.e2e_s)) == (16, 16, 5.0, 15.0)
    # A failed predecessor does not hold its successor back: it goes at its scheduled time.
    refused = simulate(trace(turn0, turn1), make_policy("least_loaded"), config(decode_kv_blocks=3), COSTS)
    assert refused.results[0].error == "OverloadedError: no room for the request's KV"
    assert ms(refused.results[1].sent_s) == 1.0


def test_a_request_sent_at_a_step_boundary_joins_the_step_that_starts_then():
    busy = request(0, 4, 10, 1)  # decodes on decode-0 in steps ending at 18, 28, …
    turn0 = request(0, 4, 2, 100, session="s", turn=0)  # its one decode step ends at 18
    turn1 = TraceRequest(0.0, "s", 1, 12, 2, (100, 200, 201))  # sent at 18, on the dot
    policy = Scripted((FRESH, "fresh-0", "decode-0"), (FRESH, "fresh-1", "decode-0"),
                      (LOCAL, None, "decode-0"))  # fmt: skip
    run = simulate(trace(busy, turn0, turn1), policy, config(num_fresh=2), COSTS)
    # decode-0 holds block 100 (turn 0's prompt, and its output's full block is the same one): 4 cached
    # tokens, 8 to compute in the step starting at 18: 10 + 1 + 8 ms, so the first token comes at 37.
    r = run.results[2]
    assert (ms(r.sent_s), r.cached_tokens, ms(r.ttft_s)) == (18.0, 4, 19.0)


def test_lru_eviction_order_and_pinned_blocks_are_never_evicted():
    index = HolderIndex()
    cache = BlockCache("w", 4, index)
    cache.insert([1, 2, 3])  # touched tail first: 3 is the least recently used
    assert cache.evictable_ids() == [3, 2, 1]
    cache.insert([1, 4])
    assert cache.evictable_ids() == [3, 2, 4, 1]
    assert cache.acquire([1, 2], 1)  # pins 1 and 2; one private block: 3 goes
    assert cache.evictable_ids() == [4] and 3 not in cache and index.holders(3) == frozenset()
    assert not cache.acquire([], 2)  # 4 blocks: 2 pinned, 1 reserved, only 4 evictable
    assert cache.evictable_ids() == [4] and cache.num_free == 1
    cache.insert([5, 6])  # the pinned ones stay; 4, then the new tail 6, go
    assert cache.evictable_ids() == [5] and 1 in cache and 2 in cache
    assert index.holders(6) == frozenset() and index.holders(1) == {"w"}
    cache.release([1, 2], 1)  # unpinned ids are evictable again, most recently used
    assert cache.evictable_ids() == [5, 2, 1] and cache.num_free == 4


def test_the_holder_index_matches_every_workers_leading_blocks():
    rng = random.Random(7)
    index = HolderIndex()
    caches = [BlockCache(f"w{i}", 64, index) for i in range(6)]
    chains = [[rng.randrange(40) for _ in range(rng.randrange(1, 30))] for _ in range(50)]
    for chain in chains:
        rng.choice(caches).insert(chain)
        probe = rng.choice(chains)
        expected = {c.worker_id: c.match(probe) for c in caches if c.match(probe)}
        assert index.matches(probe) == expected


def test_kv_room_refusal_on_the_full_decode_worker_while_another_is_free():
    t = trace(request(0, 12, 4, 1), request(1, 12, 4, 100))  # each needs ceil(16 / 4) = 4 blocks
    policy = Scripted((FRESH, "fresh-0", "decode-0"), (FRESH, "fresh-0", "decode-0"))
    run = simulate(t, policy, config(num_decode=2, decode_kv_blocks=6), COSTS)
    ok, refused = run.results
    assert ok.error is None
    assert refused.error == "OverloadedError: no room for the request's KV"
    assert (refused.ttft_s, refused.e2e_s, refused.output_len, refused.decode_worker) == (
        None,
        None,
        0,
        "decode-0",
    )
    _, views = policy.seen[1]
    assert (views["decode-0"].free_blocks, views["decode-1"].free_blocks) == (2, 6)
    assert [d.request_id for d in run.decisions] == ["0", "1"]  # a refused request was still decided


def test_no_worker_fails_the_request_as_unavailable_without_a_decision():
    run = simulate(trace(request(0, 8, 2, 1)), make_policy("least_loaded"), config(num_fresh=0), COSTS)
    assert run.results[0].error.startswith("UnavailableError: ")
    assert run.decisions == []


class Recording:
    """A real policy, remembering every worker's matched blocks it was shown."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, inner.name, []

    def route(self, request, workers):
        self.seen.append({w.worker_id: w.matched_blocks for w in workers})
        return self.inner.route(request, workers)


def test_decision_records_carry_shadows_and_the_chosen_targets_predicted_match():
    t = make_workload("multi-turn", 120, seed=3, block_len=16)
    names = ["cpd", "least_loaded", "prefix_affinity", "round_robin"]
    for arm in names:
        policy = Recording(make_policy(arm))
        shadows = {other: make_policy(other) for other in names if other != arm}
        run = simulate(t, policy, SimConfig(), COSTS, shadows=shadows, rate=20.0)
        assert len(run.decisions) == len(t.requests) == len(policy.seen)
        by_id = {r.index: r for r in run.results}
        for record, matched in zip(run.decisions, policy.seen, strict=True):
            assert set(record.shadow) == set(shadows) and record.arm == arm
            target = record.choice.decode if record.choice.pool == LOCAL else record.choice.prefill
            fetched = int(record.terms.get("fetch_blocks", 0))  # a planned fetch counts as held
            expected = min(max(matched[target], fetched) * 16, (record.prompt_tokens - 1) // 16 * 16)
            assert record.predicted_cached_tokens == expected
            assert by_id[int(record.request_id)].predicted_cached_tokens == expected
        assert sum(r.cached_tokens for r in run.results) > 0


def test_runs_are_deterministic():
    t = make_workload("mixed", 300, seed=1, block_len=16)

    def once():
        shadows = {"round_robin": make_policy("round_robin"), "cpd": make_policy("cpd")}
        run = simulate(t, make_policy("prefix_affinity"), SimConfig(), COSTS, rate=30.0, seed=4,
                       shadows=shadows)  # fmt: skip
        return [r.to_json() for r in run.results], [d.to_json() for d in run.decisions], run.num_events

    assert once() == once()


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("policy", ["cpd", "least_loaded", "prefix_affinity", "round_robin"])
def test_every_workload_runs_under_every_policy(workload, policy):
    t = make_workload(workload, 200, seed=0, block_len=16)
    run = simulate(t, make_policy(policy), SimConfig(), COSTS, rate=10.0)
    assert [r.error for r in run.results] == [None] * 200
    assert all(r.ttft_s > 0 and len(r.itl_s) == r.output_len - 1 for r in run.results)
    assert all(r.e2e_s >= r.ttft_s for r in run.results)
    # Tight caches: some refusals, each a typed overload, never a crash.
    tight = simulate(t, make_policy(policy), SimConfig(num_decode=2, decode_kv_blocks=600), COSTS, rate=50.0)
    errors = {r.error for r in tight.results} - {None}
    assert errors <= {"OverloadedError: no room for the request's KV"}


def test_config_and_cost_model_are_validated():
    with pytest.raises(ValueError, match="num_decode"):
        SimConfig(num_decode=0)
    with pytest.raises(ValueError, match="decode_kv_blocks"):
        SimConfig(decode_kv_blocks=0)
    with pytest.raises(ValueError, match="grpc"):
        simulate(trace(request(0, 8, 2, 1)), make_policy("least_loaded"), config(transport="grpc"), COSTS)
    repeated = trace(request(0, 4, 2, 1), TraceRequest(0.0, "", 0, 8, 2, (7, 7)))
    with pytest.raises(TraceError, match=r"request 1: field 'hash_ids'"):
        simulate(repeated, make_policy("least_loaded"), config(), COSTS)


# --- the command ---------------------------------------------------------------------------------------


@pytest.fixture
def cli_main(monkeypatch):
    """`splitserve` with the simulate command registered (a no-op once the CLI lists it)."""
    if "splitserve.cli.simulate" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "splitserve.cli.simulate"))
    return cli.main


def test_the_command_runs_every_arm_and_writes_the_report(cli_main, tmp_path, capsys):
    out = tmp_path / "sim"
    assert cli_main(["simulate", "--requests", "120", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"cpd", "least_loaded", "prefix_affinity", "round_robin"}
    assert results["meta"]["mode"] == "simulated" and results["meta"]["requests"] == 120
    assert results["meta"]["simulated_requests_per_s"] > 0
    assert set(results["decisions"]["cpd"]["compared"]) == {"least_loaded", "prefix_affinity", "round_robin"}
    assert all(entry["completed"] == 120 for entry in results["arms"].values())
    assert (out / "report.md").exists() and str(out) in printed and "least_loaded" in printed


def test_the_command_sweeps_rates(cli_main, tmp_path):
    out = tmp_path / "sweep"
    args = ["simulate", "--policies", "cpd,round_robin", "--requests", "80", "--rates", "5,20",
            "--slo-ttft-p90-ms", "50", "--decode", "2", "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [p["rate"] for p in results["arms"]["round_robin"]["sweep"]] == [5.0, 20.0]
    assert results["meta"]["cluster"] == {"fresh": 4, "warm": 4, "decode": 2}


def test_a_malformed_trace_fails_with_its_line_and_field_and_writes_nothing(cli_main, tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    save_trace(make_workload("multi-turn", 5, block_len=16), path)
    lines = path.read_text().splitlines()
    row = json.loads(lines[2])
    row["input_len"] = "many"
    lines[2] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert cli_main(["simulate", "--trace", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3" in err and "'input_len'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_malformed_calibration_fails_with_its_field_and_writes_nothing(cli_main, tmp_path, capsys):
    calibration = tmp_path / "cal.json"
    data = COSTS.to_json()
    del data["decode"]["per_seq_s"]
    calibration.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["simulate", "--requests", "20", "--calibration", str(calibration), "--out", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "per_seq_s" in err and str(calibration) in err
    assert not out.exists()
