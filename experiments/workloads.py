"""Seeded workload generators: traces whose hash ids follow from what the prompts are made of.

A conversation's token stream is a list of content segments: a system prompt shared by a group of sessions
(or a tenant), then per turn the new user message (or tool result) and the assistant's output. The stream is
cut into `block_len`-token blocks and a block's id is interned from (parent block id, the (segment, start,
end) pieces it covers), so equal prefixes get equal ids and nothing else does; a partial last block gets its
own id. Turn k's ids are therefore turn k-1's full-block ids followed by blocks over its output and the new
tokens, and sessions sharing a system prompt share its leading ids.

Owns the generators and `make_workload`; the records and their files are `trace.py`'s. Times are the trace's
own nominal arrivals (a session's turns at its start plus cumulative think times); the consumers re-time
them (`sessions.schedule`) and enforce that turn k follows turn k-1. Torch-free, stdlib only.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from splitserve.experiments.trace import Trace, TraceMeta, TraceRequest


class _BlockIds:
    """The id table of one trace: (parent id or None, the pieces a block covers) → id, 0, 1, 2, ... as first
    seen. Every stream of the trace interns here, so equal content after equal prefixes gets equal ids."""

    def __init__(self, block_len: int) -> None:
        self.block_len = block_len
        self._ids: dict[tuple, int] = {}

    def intern(self, parent: int | None, pieces: tuple) -> int:
        return self._ids.setdefault((parent, pieces), len(self._ids))


class _Stream:
    """One conversation's tokens cut into blocks, ids interned in the trace's `_BlockIds` (mutated)."""

    def __init__(self, ids: _BlockIds) -> None:
        self._ids = ids
        self._block_len = ids.block_len
        self._full: list[int] = []  # ids of the complete blocks
        self._tail: list[tuple] = []  # pieces of the incomplete last block
        self._tail_len = 0
        self.num_tokens = 0

    def append(self, key: tuple, length: int) -> None:
        """Add `length` tokens of the segment named `key` (a key must name the same content everywhere)."""
        start = 0
        while start < length:
            take = min(length - start, self._block_len - self._tail_len)
            self._tail.append((key, start, start + take))
            self._tail_len += take
            start += take
            if self._tail_len == self._block_len:
                self._full.append(self._intern())
                self._tail, self._tail_len = [], 0
        self.num_tokens += length

    def hash_ids(self) -> tuple[int, ...]:
        """ceil(num_tokens / block_len) ids of the stream so far."""
        return (*self._full, self._intern()) if self._tail else tuple(self._full)

    def _intern(self) -> int:
        return self._ids.intern(self._full[-1] if self._full else None, tuple(self._tail))


@dataclass(frozen=True)
class _Shape:
    """How one workload's sessions look, token lengths already scaled."""

    part: str  # names its sessions and content keys, keeping the parts of `mixed` disjoint
    system_prompt_len: int
    sessions_per_system_prompt: int  # consecutive sessions sharing one, when `num_tenants` is None
    num_tenants: int | None  # each session picks one of this many tenants (and their system prompt)
    max_turns: int  # a session's turns are drawn uniformly from 1 .. max_turns
    new_kind: str  # what each turn appends: "user" or "tool"
    new_len: int  # mean of what each turn appends
    output_len: int  # mean
    think_s: float  # mean exponential gap between a session's turns
    session_rate: float  # sessions/s, Poisson
    max_context_len: int  # a session ends before a later turn whose prompt + output would pass it


def _draw_len(rng: random.Random, mean: int) -> int:
    """A length uniform in 0.5x .. 1.5x of `mean`, at least 1."""
    return max(1, round(mean * rng.uniform(0.5, 1.5)))


def _session(shape: _Shape, index: int, start_s: float, max_turns: int, rng: random.Random,
             ids: _BlockIds) -> list[TraceRequest]:
    """The turns of session `index` starting at `start_s`, at most `max_turns` of them (at least one)."""
    session_id = f"{shape.part}-{index}"
    if shape.num_tenants is None:
        group, tenant = index // shape.sessions_per_system_prompt, ""
    else:
        group = rng.randrange(shape.num_tenants)
        tenant = f"tenant-{group}"
    stream = _Stream(ids)
    stream.append(("sys", shape.part, group), shape.system_prompt_len)
    num_turns = min(max_turns, rng.randint(1, shape.max_turns))
    turns, t = [], start_s
    for turn in range(num_turns):
        new_len, output_len = _draw_len(rng, shape.new_len), _draw_len(rng, shape.output_len)
        if turn > 0:
            if stream.num_tokens + new_len + output_len > shape.max_context_len:
                break
            t += rng.expovariate(1.0 / shape.think_s)
        stream.append((shape.new_kind, session_id, turn), new_len)
        turns.append(TraceRequest(t, session_id, turn, stream.num_tokens, output_len, stream.hash_ids(),
                                  tenant))
        stream.append(("out", session_id, turn), output_len)
    return turns


def _generate(shape: _Shape, num_requests: int, rng: random.Random, ids: _BlockIds) -> list[TraceRequest]:
    """Exactly `num_requests` requests (sessions in start order, turns in order) of sessions starting at 0
    and then at Poisson times; the caller sorts them by arrival."""
    requests: list[TraceRequest] = []
    start_s, index = 0.0, 0
    while len(requests) < num_requests:
        requests += _session(shape, index, start_s, num_requests - len(requests), rng, ids)
        start_s += rng.expovariate(shape.session_rate)
        index += 1
    return requests


def _check_params(params: object) -> None:
    """Integers where the default is one (bool is not), numbers > 0 (shares >= 0); raises ValueError."""
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        kinds = (int,) if isinstance(f.default, int) else (int, float)
        low_ok = value >= 0 if f.name.endswith("_share") else value > 0
        if isinstance(value, bool) or not isinstance(value, kinds) or not low_ok:
            kind = "an integer" if kinds == (int,) else "a number"
            raise ValueError(f"workload parameter {f.name}: expected {kind} "
                             f"{'>= 0' if f.name.endswith('_share') else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class MultiTurnParams:
    """Chat sessions of ~`turns_mean` turns (1 .. 2*turns_mean-1) with growing context."""

    system_prompt_len: int = 1536
    sessions_per_system_prompt: int = 12
    turns_mean: int = 10
    user_len: int = 256
    output_len: int = 64
    think_s: float = 2.0
    session_rate: float = 2.0
    max_context_len: int = 8192

    def __post_init__(self) -> None:
        _check_params(self)

    def parts(self, num_requests: int, scale: Callable[[int], int]) -> list[tuple[_Shape, int]]:
        shape = _Shape("multi-turn", scale(self.system_prompt_len), self.sessions_per_system_prompt, None,
                       2 * self.turns_mean - 1, "user", scale(self.user_len), scale(self.output_len),
                       self.think_s, self.session_rate, scale(self.max_context_len))
        return [(shape, num_requests)]


@dataclass(frozen=True)
class TenantsParams:
    """Many tenants, each with its own system prompt; short sessions (1 .. max_turns turns)."""

    num_tenants: int = 32
    system_prompt_len: int = 1024
    max_turns: int = 3
    user_len: int = 256
    output_len: int = 64
    think_s: float = 2.0
    session_rate: float = 4.0
    max_context_len: int = 8192

    def __post_init__(self) -> None:
        _check_params(self)

    def parts(self, num_requests: int, scale: Callable[[int], int]) -> list[tuple[_Shape, int]]:
        shape = _Shape("tenants", scale(self.system_prompt_len), 1, self.num_tenants, self.max_turns, "user",
                       scale(self.user_len), scale(self.output_len), self.think_s, self.session_rate,
                       scale(self.max_context_len))
        return [(shape, num_requests)]


@dataclass(frozen=True)
class AgenticParams:
    """Long inputs, short outputs: every turn appends a cold tool result after a long shared task prefix."""

    system_prompt_len: int = 2048
    sessions_per_system_prompt: int = 16
    turns_mean: int = 6
    tool_len: int = 1024
    output_len: int = 24
    think_s: float = 0.5  # tool latency
    session_rate: float = 1.0
    max_context_len: int = 16384

    def __post_init__(self) -> None:
        _check_params(self)

    def parts(self, num_requests: int, scale: Callable[[int], int]) -> list[tuple[_Shape, int]]:
        shape = _Shape("agentic", scale(self.system_prompt_len), self.sessions_per_system_prompt, None,
                       2 * self.turns_mean - 1, "tool", scale(self.tool_len), scale(self.output_len),
                       self.think_s, self.session_rate, scale(self.max_context_len))
        return [(shape, num_requests)]


@dataclass(frozen=True)
class MixedParams:
    """The three workloads above, at their defaults, interleaved by arrival in these shares of requests."""

    multi_turn_share: float = 0.5
    tenants_share: float = 0.25
    agentic_share: float = 0.25

    def __post_init__(self) -> None:
        _check_params(self)
        if self.multi_turn_share + self.tenants_share + self.agentic_share <= 0:
            raise ValueError("workload parameters: the mixed shares sum to 0")

    def parts(self, num_requests: int, scale: Callable[[int], int]) -> list[tuple[_Shape, int]]:
        shares = [self.multi_turn_share, self.tenants_share, self.agentic_share]
        counts = _counts(num_requests, shares)
        wholes = (MultiTurnParams(), TenantsParams(), AgenticParams())
        return [p.parts(count, scale)[0] for p, count in zip(wholes, counts, strict=True) if count]


def _counts(num_requests: int, shares: list[float]) -> list[int]:
    """Non-negative counts summing to `num_requests`, in proportion to `shares` (cumulative rounding)."""
    total, bounds, acc = sum(shares), [0], 0.0
    for share in shares:
        acc += share
        bounds.append(round(num_requests * acc / total))
    return [b - a for a, b in itertools.pairwise(bounds)]


def _build(name: str, params_type: type, num_requests: int, seed: int, block_len: int, length_scale: float,
           given: dict) -> Trace:
    """Validate the arguments, generate `name`'s requests and record everything needed to redo it."""
    known = [f.name for f in dataclasses.fields(params_type)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"workload {name!r} has no parameter {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    for arg, value in (("num_requests", num_requests), ("block_len", block_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(length_scale, bool) or not isinstance(length_scale, (int, float)) or not length_scale > 0:
        raise ValueError(f"length_scale must be a number > 0, got {length_scale!r}")
    params = params_type(**given)

    def scale(n: int) -> int:
        return max(1, round(n * length_scale))

    ids = _BlockIds(block_len)
    requests: list[TraceRequest] = []
    for shape, count in params.parts(num_requests, scale):
        # One generator per part (a string seed is hashed: stable everywhere), so the parts of `mixed`
        # do not shift each other when one's share changes.
        requests += _generate(shape, count, random.Random(f"{seed}:{shape.part}"), ids)
    requests.sort(key=lambda r: r.arrival_s)  # stable: equal times keep a session's turns in order
    recorded = {"num_requests": num_requests, "length_scale": length_scale, **dataclasses.asdict(params)}
    return Trace(TraceMeta(block_len, name, seed, recorded), tuple(requests))


def multi_turn(num_requests: int = 200, seed: int = 0, block_len: int = 16, length_scale: float = 1.0,
               **params) -> Trace:
    """Chat sessions (see `MultiTurnParams`); about 1 request in `turns_mean` is a first turn."""
    return _build("multi-turn", MultiTurnParams, num_requests, seed, block_len, length_scale, params)


def tenants(num_requests: int = 200, seed: int = 0, block_len: int = 16, length_scale: float = 1.0,
            **params) -> Trace:
    """Sessions of many tenants, `tenant` set (see `TenantsParams`); tenants share no hash id."""
    return _build("tenants", TenantsParams, num_requests, seed, block_len, length_scale, params)


def agentic(num_requests: int = 200, seed: int = 0, block_len: int = 16, length_scale: float = 1.0,
            **params) -> Trace:
    """Tool-calling sessions: long, mostly cold inputs and short outputs (see `AgenticParams`)."""
    return _build("agentic", AgenticParams, num_requests, seed, block_len, length_scale, params)


def mixed(num_requests: int = 200, seed: int = 0, block_len: int = 16, length_scale: float = 1.0,
          **params) -> Trace:
    """multi-turn, tenants and agentic interleaved (see `MixedParams`), sessions and ids disjoint."""
    return _build("mixed", MixedParams, num_requests, seed, block_len, length_scale, params)


WORKLOADS: dict[str, Callable[..., Trace]] = {
    "multi-turn": multi_turn, "tenants": tenants, "agentic": agentic, "mixed": mixed,
}


def make_workload(name: str, num_requests: int = 200, seed: int = 0, block_len: int = 16,
                  length_scale: float = 1.0, **params) -> Trace:
    """A new trace of exactly `num_requests` requests of workload `name`, sorted by arrival, turns in order.

    The same arguments give an identical trace; another seed gives another. `length_scale` multiplies every
    token length (each stays >= 1). `TraceMeta.params` records num_requests, length_scale and every workload
    parameter, so `make_workload(meta.workload, seed=meta.seed, block_len=meta.block_len, **meta.params)`
    remakes it. Raises `ValueError` naming the known workloads or parameters, or a bad value."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name](num_requests, seed, block_len, length_scale, **params)
