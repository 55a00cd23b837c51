"""Workload generators (determinism, shapes, shared prefixes, validation of every trace) and the prompt
synthesizer that turns hash ids into token ids. CPU only, no cluster."""

from __future__ import annotations

import itertools
import statistics

import pytest

from splitserve.experiments.prompts import PromptSynth
from splitserve.experiments.sessions import oracle_hit_rate
from splitserve.experiments.trace import TraceRequest, load_trace, save_trace
from splitserve.experiments.workloads import WORKLOADS, make_workload

NAMES = ["multi-turn", "tenants", "agentic", "mixed"]


def session_index(req: TraceRequest) -> int:
    return int(req.session_id.rsplit("-", 1)[1])


@pytest.mark.parametrize("name", NAMES)
def test_every_workload_is_deterministic_and_valid(tmp_path, name):
    trace = make_workload(name, 150, seed=7)
    assert trace == make_workload(name, 150, seed=7)
    assert trace.requests != make_workload(name, 150, seed=8).requests
    assert len(trace.requests) == 150 and trace.meta.workload == name and trace.meta.seed == 7
    arrivals = [r.arrival_s for r in trace.requests]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    save_trace(trace, tmp_path / "t.jsonl")  # validates, as load_trace does
    assert load_trace(tmp_path / "t.jsonl") == trace
    assert 0.0 < oracle_hit_rate(trace) < 1.0


@pytest.mark.parametrize("name", NAMES)
def test_recorded_params_remake_the_trace(name):
    trace = make_workload(name, 90, seed=2, block_len=32, length_scale=0.5)
    meta = trace.meta
    assert meta.params["num_requests"] == 90 and meta.params["length_scale"] == 0.5
    assert make_workload(meta.workload, seed=meta.seed, block_len=meta.block_len, **meta.params) == trace


@pytest.mark.parametrize("num_requests", [1, 2, 7, 333])
@pytest.mark.parametrize("name", NAMES)
def test_exactly_the_requested_number(name, num_requests):
    assert len(make_workload(name, num_requests, seed=1, length_scale=0.1).requests) == num_requests


def test_multi_turn_has_about_one_first_turn_in_ten():
    reqs = make_workload("multi-turn", 1000, seed=11).requests
    share = sum(r.turn == 0 for r in reqs) / len(reqs)
    assert 0.08 <= share <= 0.12
    assert max(r.turn for r in reqs) >= 15  # turns drawn per session, not a fixed count


def test_a_turn_extends_the_previous_prompt_and_output():
    trace = make_workload("multi-turn", 300, seed=3)
    last: dict[str, TraceRequest] = {}
    block_len = trace.meta.block_len
    for r in trace.requests:
        prev = last.get(r.session_id)
        if prev is not None:
            grown = r.input_len - (prev.input_len + prev.output_len)
            assert 128 <= grown <= 384  # the new user message: 0.5x..1.5x of 256
            full = (prev.input_len + prev.output_len) // block_len
            assert r.hash_ids[:prev.input_len // block_len] == prev.hash_ids[:prev.input_len // block_len]
            assert r.hash_ids[full] not in prev.hash_ids  # the new message is new content
        last[r.session_id] = r


def test_sessions_sharing_a_system_prompt_share_its_leading_ids():
    trace = make_workload("multi-turn", 600, seed=5)
    firsts = [r for r in trace.requests if r.turn == 0]
    num_shared = 1536 // 16
    pairs_same = pairs_other = 0
    for a, b in itertools.combinations(firsts, 2):
        same_group = session_index(a) // 12 == session_index(b) // 12
        if same_group:
            assert a.hash_ids[:num_shared] == b.hash_ids[:num_shared]
            assert a.hash_ids[num_shared] != b.hash_ids[num_shared]  # their own messages differ
            pairs_same += 1
        else:
            assert not set(a.hash_ids) & set(b.hash_ids)
            pairs_other += 1
    assert pairs_same > 50 and pairs_other > 50


def test_tenants_share_nothing_with_each_other():
    trace = make_workload("tenants", 400, seed=6, num_tenants=8)
    by_tenant: dict[str, set[int]] = {}
    for r in trace.requests:
        by_tenant.setdefault(r.tenant, set()).update(r.hash_ids)
    assert len(by_tenant) == 8 and "" not in by_tenant
    for a, b in itertools.combinations(by_tenant.values(), 2):
        assert not a & b
    firsts = [r for r in trace.requests if r.turn == 0]
    a, b = next((a, b) for a, b in itertools.combinations(firsts, 2) if a.tenant == b.tenant)
    assert a.hash_ids[:1024 // 16] == b.hash_ids[:1024 // 16]
    assert {r.turn for r in trace.requests} == {0, 1, 2}


def test_agentic_is_long_cold_inputs_and_short_outputs():
    reqs = make_workload("agentic", 600, seed=8).requests
    assert statistics.mean(r.output_len for r in reqs) == pytest.approx(24, rel=0.15)
    assert statistics.mean(r.input_len for r in reqs) > 4000
    assert sum(r.turn == 0 for r in reqs) / len(reqs) == pytest.approx(1 / 6, abs=0.05)
    last: dict[str, TraceRequest] = {}
    for r in reqs:
        if r.session_id in last:
            prev = last[r.session_id]
            assert 512 <= r.input_len - prev.input_len - prev.output_len <= 1536  # the tool result
            assert r.arrival_s - prev.arrival_s < 10  # tool latency, not human think time
        last[r.session_id] = r


def test_mixed_interleaves_disjoint_parts_in_their_shares():
    trace = make_workload("mixed", 400, seed=9)
    parts: dict[str, list[TraceRequest]] = {}
    for r in trace.requests:
        parts.setdefault(r.session_id.rsplit("-", 1)[0], []).append(r)
    assert {k: len(v) for k, v in parts.items()} == {"multi-turn": 200, "tenants": 100, "agentic": 100}
    ids = {k: {i for r in v for i in r.hash_ids} for k, v in parts.items()}
    for a, b in itertools.combinations(ids.values(), 2):
        assert not a & b
    order = [r.session_id.rsplit("-", 1)[0] for r in trace.requests[:60]]
    assert len(set(order)) == 3  # interleaved by arrival, not concatenated
    only_chat = make_workload("mixed", 40, agentic_share=0.0, tenants_share=0.0)
    assert all(r.session_id.startswith("multi-turn-") for r in only_chat.requests)


def test_length_scale_shrinks_every_length():
    full = make_workload("multi-turn", 200, seed=1)
    small = make_workload("multi-turn", 200, seed=1, length_scale=0.05)
    assert max(r.input_len for r in small.requests) < max(r.input_len for r in full.requests) / 10
    assert min(r.output_len for r in small.requests) >= 1
    assert small.requests[0].input_len >= round(1536 * 0.05)


def test_a_session_ends_at_max_context_len():
    trace = make_workload("multi-turn", 500, seed=2, max_context_len=3000)
    assert all(r.input_len + r.output_len <= 3000 for r in trace.requests)
    assert sum(r.turn == 0 for r in trace.requests) > 500 / 10 * 1.5  # sessions ended early


def test_bad_arguments_name_what_is_known():
    with pytest.raises(ValueError, match="known: multi-turn, tenants, agentic, mixed"):
        make_workload("chat")
    with pytest.raises(ValueError, match=r"no parameter tool_len; known: system_prompt_len, "):
        make_workload("multi-turn", tool_len=3)
    for bad in ({"user_len": 0}, {"think_s": -1.0}, {"turns_mean": 2.5}, {"session_rate": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_workload("multi-turn", **bad)
    for bad in ({"num_requests": 0}, {"block_len": 0}, {"length_scale": 0.0}, {"seed": "1"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            make_workload("tenants", **bad)
    with pytest.raises(ValueError, match="sum to 0"):
        make_workload("mixed", multi_turn_share=0.0, tenants_share=0.0, agentic_share=0.0)
    assert set(WORKLOADS) == set(NAMES)


# --- PromptSynth --------------------------------------------------------------------------------------------

def test_equal_ids_give_equal_tokens_in_range():
    synth = PromptSynth(block_len=4, vocab_size=50, seed=1, first_token_id=3)
    a = synth.tokens(TraceRequest(0.0, "", 0, 10, 1, (7, 8, 9)))
    b = synth.tokens(TraceRequest(0.0, "", 0, 12, 1, (7, 8, 5)))
    assert len(a) == 10 and len(b) == 12
    assert a[:8] == b[:8] and a[8:10] != b[8:10]
    assert all(3 <= t < 50 for t in a + b)
    assert len(set(a)) > 4  # drawn, not constant
    again = PromptSynth(block_len=4, vocab_size=50, seed=1, first_token_id=3)
    assert again.tokens(TraceRequest(0.0, "", 0, 10, 1, (7, 8, 9))) == a
    other = PromptSynth(block_len=4, vocab_size=50, seed=2, first_token_id=3)
    assert other.tokens(TraceRequest(0.0, "", 0, 10, 1, (7, 8, 9))) != a


def test_synthesized_prompts_follow_the_trace_prefixes():
    trace = make_workload("multi-turn", 80, seed=4, length_scale=0.25)
    synth = PromptSynth(trace.meta.block_len, vocab_size=1000)
    last: dict[str, list[int]] = {}
    for r in trace.requests:
        tokens = synth.tokens(r)
        assert len(tokens) == r.input_len
        if r.session_id in last:
            prev = last[r.session_id]
            cut = len(prev) // 16 * 16
            assert tokens[:cut] == prev[:cut]
        last[r.session_id] = tokens


def test_session_prompt_puts_the_real_history_first():
    synth = PromptSynth(block_len=4, vocab_size=100)
    req = TraceRequest(1.0, "s", 1, 14, 2, (0, 1, 2, 3))
    synthesized = synth.tokens(req)
    prev_prompt, prev_output = [1, 1, 1, 1, 1, 1], [2, 2, 2]
    prompt = synth.session_prompt(req, prev_prompt, prev_output)
    assert prompt == prev_prompt + prev_output + synthesized[9:]
    assert len(prompt) == 14 and prev_prompt == [1] * 6 and prev_output == [2] * 3
    # The run's history outgrew the trace's prompt: the trace's tokens alone.
    assert synth.session_prompt(req, [1] * 10, [2] * 5) == synthesized


def test_prompt_synth_refuses_a_trace_of_another_block_len():
    synth = PromptSynth(block_len=8, vocab_size=100)
    with pytest.raises(ValueError, match="block_len 8"):
        synth.tokens(TraceRequest(0.0, "", 0, 10, 1, (0, 1, 2)))
    with pytest.raises(ValueError, match="first_token_id"):
        PromptSynth(block_len=8, vocab_size=3)
