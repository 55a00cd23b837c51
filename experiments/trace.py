"""Workload traces: what a request asks for and when, without its text.

A trace is a list of `TraceRequest`s plus `TraceMeta`. Prompts are described by *hash ids*: one integer per
`block_len` tokens of the prompt (the last one may cover a partial block), equal ids meaning equal content
with equal prefix (Mooncake's convention), so the cache behaviour of a workload is visible without text.
Sessions (multi-turn conversations) name their turns: turn k's prompt is turn k-1's prompt, its output and
new tokens, so a replayer sends turn k only after turn k-1 finished and puts the real output in its prompt.

JSONL on disk: a header line `{"splitserve_trace": 1, "block_len": ..., "workload": ..., "seed": ...,
"params": {...}}`, then one line per request `{"arrival_s", "session_id", "turn", "input_len", "output_len",
"hash_ids", "tenant"}`, in arrival order. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
