"""Trace files: save/load round trips and strict validation, Mooncake import/export and re-blocking,
re-timing (`schedule`), next turns and the oracle hit rate. CPU only, no cluster."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest

from splitserve.experiments.sessions import next_turns, oracle_hit_rate, schedule
from splitserve.experiments.trace import (
    Trace,
    TraceError,
    TraceMeta,
    TraceRequest,
    export_mooncake,
    import_mooncake,
    load_trace,
    save_trace,
)
from splitserve.experiments.workloads import make_workload

HEADER = {"splitserve_trace": 1, "block_len": 4, "workload": "hand", "seed": None, "params": {"k": [1, 2]}}
# Session "s" (turns on lines 2 and 4) and two sessionless requests; block_len 4.
ROWS = [
    {"arrival_s": 0.0, "session_id": "s", "turn": 0, "input_len": 10, "output_len": 3, "hash_ids": [0, 1, 2],
     "tenant": ""},
    {"arrival_s": 1.0, "session_id": "", "turn": 0, "input_len": 8, "output_len": 2, "hash_ids": [0, 1],
     "tenant": "t"},
    {"arrival_s": 2.0, "session_id": "s", "turn": 1, "input_len": 17, "output_len": 1,
     "hash_ids": [0, 1, 5, 6, 7], "tenant": ""},
    {"arrival_s": 2.5, "session_id": "", "turn": 0, "input_len": 4, "output_len": 1, "hash_ids": [0],
     "tenant": ""},
]


def hand_trace() -> Trace:
    reqs = tuple(TraceRequest(**{**r, "hash_ids": tuple(r["hash_ids"])}) for r in ROWS)
    return Trace(TraceMeta(4, "hand", None, {"k": [1, 2]}), reqs)


def write_lines(path, lines) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_hand_file_loads_to_the_hand_trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    write_lines(path, [HEADER, *ROWS])
    assert load_trace(path) == hand_trace()


@pytest.mark.parametrize("name", ["multi-turn", "mixed"])
def test_save_load_round_trip_is_equal_and_stable(tmp_path, name):
    trace = make_workload(name, 150, seed=3)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    save_trace(trace, a)
    loaded = load_trace(a)
    assert loaded == trace
    save_trace(loaded, b)
    assert a.read_bytes() == b.read_bytes()


def patched(row: int, **changes):
    """The hand file's lines with request `row` (0-based) updated; None removes a field."""
    lines = [HEADER, *ROWS]
    new = {**lines[row + 1], **changes}
    lines[row + 1] = {k: v for k, v in new.items() if v is not None}
    return lines


BROKEN = [  # (id, lines, 1-based line, field or None)
    ("bad-json", [HEADER, ROWS[0], '{"arrival_s": 1.0,', *ROWS[2:]], 3, None),
    ("blank-line", [HEADER, ROWS[0], "", *ROWS[1:]], 3, None),
    ("not-an-object", [HEADER, ROWS[0], "[1, 2]", *ROWS[2:]], 3, None),
    ("missing-field", patched(1, tenant=None), 3, "tenant"),
    ("string-for-int", patched(0, input_len="10"), 2, "input_len"),
    ("bool-for-int", patched(0, turn=True), 2, "turn"),
    ("zero-output", patched(1, output_len=0), 3, "output_len"),
    ("float-length", patched(1, input_len=8.0), 3, "input_len"),
    ("wrong-hash-count", patched(1, hash_ids=[0]), 3, "hash_ids"),
    ("negative-hash-id", patched(1, hash_ids=[0, -1]), 3, "hash_ids"),
    ("float-hash-id", patched(1, hash_ids=[0, 1.0]), 3, "hash_ids"),
    ("nan-time", [HEADER, ROWS[0], json.dumps(ROWS[1]).replace("1.0", "NaN"), *ROWS[2:]], 3, "arrival_s"),
    ("negative-time", patched(0, arrival_s=-1.0), 2, "arrival_s"),
    ("decreasing-time", patched(2, arrival_s=0.5), 4, "arrival_s"),
    ("unknown-field", patched(1, priority=1), 3, "priority"),
    ("session-id-type", patched(1, session_id=3), 3, "session_id"),
    ("turn-gap", patched(2, turn=2), 4, "turn"),
    ("no-turn-0", patched(0, turn=1), 2, "turn"),
    ("sessionless-turn", patched(1, turn=1), 3, "turn"),
    ("repeated-turn", patched(2, turn=0), 4, "turn"),
    ("prefix-broken", patched(2, hash_ids=[0, 9, 5, 6, 7]), 4, "hash_ids"),
    ("prompt-too-short", patched(2, input_len=12, hash_ids=[0, 1, 5]), 4, "input_len"),
    ("header-missing", ROWS, 1, "splitserve_trace"),
    ("header-version", [{**HEADER, "splitserve_trace": 2}, *ROWS], 1, "splitserve_trace"),
    ("header-block-len", [{**HEADER, "block_len": 0}, *ROWS], 1, "block_len"),
    ("header-unknown", [{**HEADER, "model": "x"}, *ROWS], 1, "model"),
    ("header-missing-field", [{k: v for k, v in HEADER.items() if k != "workload"}, *ROWS], 1, "workload"),
    ("header-seed", [{**HEADER, "seed": "7"}, *ROWS], 1, "seed"),
    ("header-params", [{**HEADER, "params": [1]}, *ROWS], 1, "params"),
    ("empty-file", [], 1, None),
]


@pytest.mark.parametrize(("lines", "lineno", "field"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_a_broken_line_is_named_with_its_field(tmp_path, lines, lineno, field):
    path = tmp_path / "trace.jsonl"
    write_lines(path, lines)
    with pytest.raises(TraceError) as e:
        load_trace(path)
    prefix = f"{path}:{lineno}: " + (f"field '{field}': " if field else "")
    assert str(e.value).startswith(prefix), str(e.value)


def test_the_message_reads_as_documented(tmp_path):
    path = tmp_path / "trace.jsonl"
    write_lines(path, patched(0, input_len=-3))
    with pytest.raises(TraceError, match=r"trace\.jsonl:2: field 'input_len': expected a positive integer, "
                                         r"got -3$"):
        load_trace(path)


def test_save_refuses_an_invalid_trace_and_writes_nothing(tmp_path):
    good = hand_trace()
    bad = Trace(good.meta, (good.requests[0], TraceRequest(3.0, "s", 2, 17, 1, (0, 1, 5, 6, 7))))
    path = tmp_path / "out.jsonl"
    with pytest.raises(TraceError, match=r"out\.jsonl:3: field 'turn'"):
        save_trace(bad, path)
    assert not path.exists()


# --- Mooncake ---------------------------------------------------------------------------------------------

def test_mooncake_at_the_trace_block_len_keeps_times_lengths_and_ids(tmp_path):
    trace = make_workload("mixed", 120, seed=1)
    path = tmp_path / "mooncake.jsonl"
    export_mooncake(trace, path, block_len=16)
    back = import_mooncake(path, block_len=16)
    assert [round(r.arrival_s * 1000) for r in back.requests] == [round(r.arrival_s * 1000)
                                                                  for r in trace.requests]
    for got, want in zip(back.requests, trace.requests, strict=True):
        assert (got.input_len, got.output_len) == (want.input_len, want.output_len)
        assert got.hash_ids == want.hash_ids
        assert (got.session_id, got.turn, got.tenant) == ("", 0, "")
    assert back.meta.block_len == 16


def test_mooncake_export_import_export_is_byte_identical(tmp_path):
    trace = make_workload("multi-turn", 100, seed=2)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    export_mooncake(trace, a, block_len=512)
    export_mooncake(import_mooncake(a, block_len=512), b, block_len=512)
    assert a.read_bytes() == b.read_bytes()
    first = json.loads(a.read_text().splitlines()[0])
    assert list(first) == ["timestamp", "input_length", "output_length", "hash_ids"]


def test_reblocking_keeps_exactly_the_shared_prefixes(tmp_path):
    trace = make_workload("mixed", 80, seed=4)
    path = tmp_path / "coarse.jsonl"
    export_mooncake(trace, path, block_len=512)
    coarse = [r.hash_ids for r in import_mooncake(path, block_len=512).requests]
    fine = [r.hash_ids for r in trace.requests]
    ratio, shared, unshared = 512 // 16, 0, 0
    for i, j in itertools.combinations(range(len(fine)), 2):
        for n in range(1, min(len(coarse[i]), len(coarse[j])) + 1):
            same = coarse[i][:n] == coarse[j][:n]
            assert same == (fine[i][:n * ratio] == fine[j][:n * ratio]), (i, j, n)
            shared, unshared = shared + same, unshared + (not same)
    assert shared > 100 and unshared > 100  # both sides of the iff were exercised
    assert sorted({i for ids in coarse for i in ids}) == list(range(len({i for ids in coarse for i in ids})))


def test_mooncake_block_len_must_be_a_multiple(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        export_mooncake(hand_trace(), tmp_path / "x.jsonl", block_len=6)


def test_mooncake_import_ignores_extra_fields_and_validates_the_rest(tmp_path):
    path = tmp_path / "mooncake.jsonl"
    row = {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": list(range(46, 60))}
    write_lines(path, [row, {**row, "timestamp": 27482, "note": "extra"}])
    trace = import_mooncake(path)
    assert [r.arrival_s for r in trace.requests] == [0.0, 27.482]
    assert trace.requests[0].hash_ids == tuple(range(46, 60)) and trace.meta.block_len == 512
    cases = [
        ([row, {k: v for k, v in row.items() if k != "timestamp"}], 2, "timestamp"),
        ([{**row, "timestamp": 5}, row], 2, "timestamp"),
        ([{**row, "timestamp": 1.5}], 1, "timestamp"),
        ([row, {**row, "hash_ids": row["hash_ids"][:-1]}], 2, "hash_ids"),
        ([{**row, "output_length": 0}], 1, "output_length"),
        (["not json"], 1, None),
    ]
    for lines, lineno, field in cases:
        write_lines(path, lines)
        with pytest.raises(TraceError) as e:
            import_mooncake(path)
        assert str(e.value).startswith(f"{path}:{lineno}: " + (f"field '{field}'" if field else "")), e.value


# --- schedule, next turns, oracle --------------------------------------------------------------------------

def test_schedule_without_rate_is_the_trace_arrivals():
    trace = make_workload("multi-turn", 50)
    assert schedule(trace, None) == [r.arrival_s for r in trace.requests]


def test_schedule_at_a_rate_is_poisson_and_keeps_think_times():
    trace = make_workload("tenants", 3000, seed=5)
    rate = 40.0
    times = schedule(trace, rate, seed=1)
    reqs = trace.requests
    starts = [t for t, r in zip(times, reqs, strict=True) if r.turn == 0]
    assert len(starts) < 0.7 * len(reqs)  # sessions: follow-ups make up the rest of the offered rate
    assert starts == sorted(starts) and starts[0] == 0.0
    assert len(reqs) / starts[-1] == pytest.approx(rate, rel=0.08)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.1)  # exponential
    first = {r.session_id: i for i, r in enumerate(reqs) if r.turn == 0}
    num_follow = 0
    for i, r in enumerate(reqs):
        if r.turn > 0:
            j = first[r.session_id]
            assert times[i] - times[j] == pytest.approx(r.arrival_s - reqs[j].arrival_s, abs=1e-9)
            num_follow += 1
    assert num_follow > 1000
    assert schedule(trace, rate, seed=1) == times
    assert schedule(trace, rate, seed=2) != times


@pytest.mark.parametrize("rate", [0, -1.0, math.inf, math.nan, True])
def test_schedule_refuses_a_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        schedule(hand_trace(), rate)


def test_next_turns_maps_a_turn_to_its_successor():
    assert next_turns(hand_trace()) == {0: 2}
    trace = make_workload("multi-turn", 100)
    follow = next_turns(trace)
    for i, j in follow.items():
        a, b = trace.requests[i], trace.requests[j]
        assert (b.session_id, b.turn) == (a.session_id, a.turn + 1) and j > i
    assert len(follow) == 100 - len({r.session_id for r in trace.requests})


def test_oracle_hit_rate_on_a_hand_trace():
    # Request 0: nothing seen → 0; it leaves {0, 1} and its next turn's first (10+3)//4 = 3 ids {0, 1, 5}.
    # Request 1: 2 leading full blocks seen, capped at (8-1)//4 = 1 block → 4 tokens.
    # Request 2: full blocks 0, 1, 5, 6; 0, 1, 5 seen → 3 blocks (cap 4) → 12 tokens.
    # Request 3: 1 full block seen, capped at (4-1)//4 = 0 blocks → 0. Total (0+4+12+0) / (10+8+17+4).
    assert oracle_hit_rate(hand_trace()) == 16 / 39
    assert oracle_hit_rate(Trace(TraceMeta(4), ())) == 0.0
