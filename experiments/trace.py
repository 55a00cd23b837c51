"""Workload traces: what a request asks for and when, without its text.

A trace is a list of `TraceRequest`s plus `TraceMeta`. Prompts are described by *hash ids*: one integer per
`block_len` tokens of the prompt (the last one may cover a partial block), equal ids meaning equal content
with equal prefix (Mooncake's convention), so the cache behaviour of a workload is visible without text.
Sessions (multi-turn conversations) name their turns: turn k's prompt is turn k-1's prompt, its output and
new tokens, so a replayer sends turn k only after turn k-1 finished and puts the real output in its prompt.

JSONL on disk: a header line `{"splitserve_trace": 1, "block_len": ..., "workload": ..., "seed": ...,
"params": {...}}`, then one line per request `{"arrival_s", "session_id", "turn", "input_len", "output_len",
"hash_ids", "tenant"}`, in arrival order.

This module owns the records, their file formats (ours and Mooncake's public one) and their validation.
It does not answer what a trace implies (send times at a rate, next turns, the oracle hit rate:
`sessions.py`), generate workloads (`workloads.py`) or make token ids (`prompts.py`). Torch-free, stdlib only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

TRACE_VERSION = 1


class TraceError(ValueError):
    """A trace that cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds from the trace's start
    session_id: str  # "" for a request outside any session
    turn: int  # 0 for a session's first turn (and for sessionless requests)
    input_len: int  # prompt tokens
    output_len: int  # tokens to generate (replayed with ignore_eos, so exactly this many)
    hash_ids: tuple[int, ...]  # ceil(input_len / block_len) ids
    tenant: str = ""


@dataclass(frozen=True)
class TraceMeta:
    block_len: int  # tokens per hash id
    workload: str = ""
    seed: int | None = None
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Trace:
    meta: TraceMeta
    requests: tuple[TraceRequest, ...]


_HEADER_FIELDS = ("splitserve_trace", "block_len", "workload", "seed", "params")
_REQUEST_FIELDS = ("arrival_s", "session_id", "turn", "input_len", "output_len", "hash_ids", "tenant")
_MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Line:
    """One JSON object of a file; its checks raise `TraceError` naming the file, the line and the field."""

    def __init__(self, where: str, obj: dict) -> None:
        self.where = where  # "path:lineno"
        self.obj = obj

    def error(self, name: str, problem: str) -> TraceError:
        return TraceError(f"{self.where}: field '{name}': {problem}")

    def require(self, names: tuple[str, ...], exact: bool) -> None:
        """Every name present; with `exact`, nothing else either."""
        for name in names:
            if name not in self.obj:
                raise self.error(name, "missing")
        for name in self.obj if exact else ():
            if name not in names:
                raise self.error(name, f"unknown field (expected only {', '.join(names)})")

    def integer(self, name: str, minimum: int) -> int:
        value = self.obj[name]
        if not _is_int(value) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.error(name, f"expected {kind}, got {json.dumps(value)}")
        return value

    def string(self, name: str) -> str:
        value = self.obj[name]
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {json.dumps(value)}")
        return value

    def seconds(self, name: str) -> float:
        value = self.obj[name]
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value < 0:
            raise self.error(name, f"expected a finite number >= 0, got {json.dumps(value)}")
        return float(value)

    def ids(self, name: str, input_len: int, block_len: int) -> tuple[int, ...]:
        value = self.obj[name]
        if not isinstance(value, list):
            raise self.error(name, f"expected a list of non-negative integers, got {json.dumps(value)}")
        for pos, i in enumerate(value):
            if not _is_int(i) or i < 0:
                raise self.error(name, f"expected non-negative integers, got {json.dumps(i)} at index {pos}")
        expected = -(-input_len // block_len)
        if len(value) != expected:
            raise self.error(name, f"expected {expected} ids (ceil({input_len} / {block_len})), "
                                   f"got {len(value)}")
        return tuple(value)


def _read_lines(path: Path) -> list[_Line]:
    """Every line of `path` as a JSON object; a trailing newline is fine, a blank line is not."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not UTF-8 text ({e.reason})") from e
    rows = text.split("\n")
    if rows[-1] == "":
        rows.pop()
    lines = []
    for lineno, row in enumerate(rows, 1):
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(row)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        lines.append(_Line(where, obj))
    return lines


class _Order:
    """Rules across lines: arrivals non-decreasing; a session's turns numbered 0, 1, 2, ... in arrival
    order, each prompt extending the previous prompt and output and keeping its full blocks' ids."""

    def __init__(self, block_len: int) -> None:
        self.block_len = block_len
        self.last_arrival_s = 0.0
        self.last_turn: dict[str, TraceRequest] = {}

    def check(self, line: _Line, req: TraceRequest, time_field: str) -> None:
        if req.arrival_s < self.last_arrival_s:
            raise line.error(time_field, f"arrival {req.arrival_s} s is before the previous line's "
                                         f"{self.last_arrival_s} s")
        self.last_arrival_s = req.arrival_s
        if not req.session_id:
            if req.turn != 0:
                raise line.error("turn", f"a request outside any session has turn 0, got {req.turn}")
            return
        prev = self.last_turn.get(req.session_id)
        expected = 0 if prev is None else prev.turn + 1
        if req.turn != expected:
            raise line.error("turn", f"session {req.session_id!r} expects turn {expected}, got {req.turn}")
        self.last_turn[req.session_id] = req
        if prev is None:
            return
        if req.input_len < prev.input_len + prev.output_len:
            raise line.error("input_len", f"turn {req.turn} needs at least the previous turn's prompt and "
                                          f"output ({prev.input_len + prev.output_len}), got {req.input_len}")
        shared = prev.input_len // self.block_len
        if req.hash_ids[:shared] != prev.hash_ids[:shared]:
            raise line.error("hash_ids", f"the first {shared} ids differ from turn {prev.turn}'s")


def _request(line: _Line, block_len: int) -> TraceRequest:
    line.require(_REQUEST_FIELDS, exact=True)
    arrival_s = line.seconds("arrival_s")
    session_id, turn = line.string("session_id"), line.integer("turn", 0)
    input_len, output_len = line.integer("input_len", 1), line.integer("output_len", 1)
    hash_ids = line.ids("hash_ids", input_len, block_len)
    return TraceRequest(arrival_s, session_id, turn, input_len, output_len, hash_ids, line.string("tenant"))


def _meta(lines: list[_Line], path: Path) -> TraceMeta:
    if not lines:
        raise TraceError(f"{path}:1: missing header: the file is empty")
    head = lines[0]
    if "splitserve_trace" not in head.obj:
        raise head.error("splitserve_trace", "missing header: the first line must be the trace header")
    if head.obj["splitserve_trace"] != TRACE_VERSION or not _is_int(head.obj["splitserve_trace"]):
        raise head.error("splitserve_trace", f"expected version {TRACE_VERSION}, "
                                             f"got {json.dumps(head.obj['splitserve_trace'])}")
    head.require(_HEADER_FIELDS, exact=True)
    seed = head.obj["seed"]
    if seed is not None and not _is_int(seed):
        raise head.error("seed", f"expected an integer or null, got {json.dumps(seed)}")
    if not isinstance(head.obj["params"], dict):
        raise head.error("params", f"expected an object, got {json.dumps(head.obj['params'])}")
    return TraceMeta(head.integer("block_len", 1), head.string("workload"), seed, head.obj["params"])


def _parse(lines: list[_Line], path: Path) -> Trace:
    meta = _meta(lines, path)
    order = _Order(meta.block_len)
    requests = []
    for line in lines[1:]:
        req = _request(line, meta.block_len)
        order.check(line, req, "arrival_s")
        requests.append(req)
    return Trace(meta, tuple(requests))


def _json_rows(trace: Trace) -> list[dict]:
    m = trace.meta
    head = {"splitserve_trace": TRACE_VERSION, "block_len": m.block_len, "workload": m.workload,
            "seed": m.seed, "params": m.params}
    return [head] + [{"arrival_s": r.arrival_s, "session_id": r.session_id, "turn": r.turn,
                      "input_len": r.input_len, "output_len": r.output_len, "hash_ids": list(r.hash_ids),
                      "tenant": r.tenant} for r in trace.requests]


def save_trace(trace: Trace, path: str | PathLike) -> None:
    """Write `trace` as JSONL at `path` (replacing it). Validates first, by the rules `load_trace` applies,
    so what is written loads back equal (`params` as JSON returns it: lists for tuples); raises `TraceError`
    naming the line it would have written, `TypeError` when `params` is not JSON. Nothing is written then."""
    path = Path(path)
    rows = _json_rows(trace)
    _parse([_Line(f"{path}:{lineno}", row) for lineno, row in enumerate(rows, 1)], path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def load_trace(path: str | PathLike) -> Trace:
    """Read a trace written by `save_trace`. Strict: raises `TraceError` ("file:line: field 'name': ...")
    on the first bad line (JSON, header, a missing, unknown or mistyped field, a length < 1, a hash id count
    other than ceil(input_len / block_len), a time going back, a session's turn gap or broken prefix);
    returns the whole trace or nothing."""
    path = Path(path)
    return _parse(_read_lines(path), path)


def _reblock(fine_ids: tuple[int, ...], ratio: int, table: dict) -> list[int]:
    """Coarse ids for `ratio` fine ids each, interned from (parent coarse id, the fine ids covered)."""
    coarse: list[int] = []
    parent = None
    for start in range(0, len(fine_ids), ratio):
        parent = table.setdefault((parent, fine_ids[start:start + ratio]), len(table))
        coarse.append(parent)
    return coarse


def export_mooncake(trace: Trace, path: str | PathLike, block_len: int = 512) -> None:
    """Write `trace` in Mooncake's public format, one `{"timestamp" (ms), "input_length", "output_length",
    "hash_ids"}` per line. Sessions, turns and tenants are not part of it and are dropped. At the trace's
    own block_len the ids go out unchanged; at a multiple of it each coarse block's id is interned from
    (parent coarse id, the fine ids it covers), numbered 0, 1, 2, ... in first-seen order, so two requests
    share their first n coarse ids iff they share the fine ids under them. Raises `ValueError` when
    `block_len` is not a positive multiple of the trace's."""
    ratio, rest = divmod(block_len, trace.meta.block_len)
    if block_len < 1 or ratio < 1 or rest:
        raise ValueError(f"block_len {block_len} is not a multiple of the trace's {trace.meta.block_len}")
    table: dict = {}
    with Path(path).open("w", encoding="utf-8") as f:
        for r in trace.requests:
            ids = list(r.hash_ids) if ratio == 1 else _reblock(r.hash_ids, ratio, table)
            f.write(json.dumps({"timestamp": round(r.arrival_s * 1000), "input_length": r.input_len,
                                "output_length": r.output_len, "hash_ids": ids}) + "\n")


def import_mooncake(path: str | PathLike, block_len: int = 512) -> Trace:
    """Read a Mooncake trace whose hash ids stand for `block_len` tokens each: sessionless requests
    (session "", turn 0, tenant "") arriving at timestamp / 1000 s. Extra fields are ignored; otherwise as
    strict as `load_trace` (timestamps non-decreasing integers, ceil(input_length / block_len) ids), raising
    `TraceError` naming the line and field."""
    path = Path(path)
    order = _Order(block_len)
    requests = []
    for line in _read_lines(path):
        line.require(_MOONCAKE_FIELDS, exact=False)
        arrival_s = line.integer("timestamp", 0) / 1000
        input_len, output_len = line.integer("input_length", 1), line.integer("output_length", 1)
        hash_ids = line.ids("hash_ids", input_len, block_len)
        req = TraceRequest(arrival_s, "", 0, input_len, output_len, hash_ids)
        order.check(line, req, "timestamp")
        requests.append(req)
    return Trace(TraceMeta(block_len, "mooncake"), tuple(requests))
