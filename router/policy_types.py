"""The policy interface: what a routing policy sees (`WorkerView`, `RequestShape`) and returns (`Decision`).

Shared by the live router, the A/B framework and the simulator; the policies themselves are in
`policies.py` (simple ones, the registry) and `cpd.py`. Torch-free, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from splitserve.router.cost_model import UNMEASURED, Measured

FRESH, WARM, DECODE = "fresh", "warm", "decode"
LOCAL = "decode-local"  # the decode worker prefills the request itself


class NoWorker(Exception):
    """No live worker can take the request (no decode worker, or no prefill target at all)."""


@dataclass(frozen=True)
class WorkerView:
    """One live worker as a policy sees it. `matched_blocks`: leading blocks of this request's prompt
    the worker holds, in KV memory or its host tier; `matched_host_blocks`: how many of those are in its
    host tier only (loaded back before use). Load is what the worker reports (queued tokens include its
    running prefills); `measured`, what it measures its work to cost."""

    worker_id: str
    role: str  # FRESH, WARM or DECODE
    matched_blocks: int = 0
    matched_host_blocks: int = 0
    queued_tokens: int = 0
    running_requests: int = 0
    kv_usage: float = 0.0
    free_blocks: int | None = None  # None: not reported (no KV room check)
    device: str = ""  # its compute device; workers naming the same one share it ("" = its own)
    waiting_prefills: int = 0  # requests waiting there: for their prefill (a decode worker: or a slot)
    max_running: int | None = None  # the most sequences it runs at once (None: not reported); past it,
    # requests wait for a slot (`running_requests` counts them too)
    step_s: float = 0.0  # its recent step time as measured (0: not reported)
    step_tokens: int | None = None  # the most prompt tokens one of its steps computes (None: not reported)
    fetch_s: float = 0.0  # its fetches as it measures them: mean time and bytes (0: none yet)
    fetch_bytes: float = 0.0
    measured: Measured = UNMEASURED


@dataclass(frozen=True)
class RequestShape:
    num_prompt_tokens: int
    block_size: int
    session_id: str | None = None
    max_tokens: int = 0  # tokens it may generate: with the prompt, the KV room a decode worker needs

    @property
    def num_full_blocks(self) -> int:
        return self.num_prompt_tokens // self.block_size


@dataclass(frozen=True)
class Decision:
    """Where the request goes. `prefill` is None when the decode worker prefills it (`pool` LOCAL).
    `fetch_from`: a worker holding more of the prompt's leading blocks than the prefill target (the
    decode worker when LOCAL), which fetches its `fetch_blocks` first (`fetch_plan`); None: no fetch."""

    policy: str
    pool: str  # FRESH, WARM or LOCAL
    prefill: str | None
    decode: str
    terms: dict[str, float] = field(default_factory=dict)
    fetch_from: str | None = None
    fetch_blocks: int = 0

    @property
    def target(self) -> str:
        """The worker that prefills the request."""
        return self.decode if self.pool == LOCAL else self.prefill or ""


def usable_cached_tokens(matched_blocks: int, num_prompt_tokens: int, block_size: int) -> int:
    """The prompt tokens a prefix hit of `matched_blocks` saves, as the engine uses a hit: whole blocks,
    and the last prompt token always computed (it gives the first token)."""
    return min(matched_blocks, (num_prompt_tokens - 1) // block_size) * block_size


def host_blocks_between(w: WorkerView, start: int, end: int) -> int:
    """How many of the worker's matched blocks [start, end) it holds in its host tier only. The index
    counts them, not where they are: they are taken to be the last of its match (a prefix's tail is
    freed, so spilled, first)."""
    return max(0, min(end, w.matched_blocks) - max(start, w.matched_blocks - w.matched_host_blocks))


def usable_host_tokens(w: WorkerView, num_prompt_tokens: int, block_size: int) -> int:
    """Of the worker's `usable_cached_tokens`, those it loads back from its host tier first."""
    usable = usable_cached_tokens(w.matched_blocks, num_prompt_tokens, block_size) // block_size
    return host_blocks_between(w, 0, usable) * block_size


def blocks_to_reserve(num_prompt_tokens: int, max_tokens: int, block_size: int, matched_blocks: int) -> int:
    """New KV blocks a decode worker needs for a request (prompt and output) beyond the `matched_blocks`
    leading ones it already holds (shared, not copied)."""
    return -(-(num_prompt_tokens + max_tokens) // block_size) - matched_blocks


class Policy(Protocol):
    """What the router, the A/B framework and the simulator call. `route` may keep state of its own (a
    cursor) but reads nothing else: no clock, no I/O. Raises `NoWorker` when no worker can take it."""

    name: str

    def route(self, request: RequestShape, workers: Sequence[WorkerView]) -> Decision: ...


def split_roles(workers: Sequence[WorkerView]) -> tuple[list[WorkerView], list[WorkerView]]:
    prefills = [w for w in workers if w.role in (FRESH, WARM)]
    decodes = [w for w in workers if w.role == DECODE]
    if not decodes:
        raise NoWorker("no live decode worker")
    return prefills, decodes


def load_key(w: WorkerView) -> tuple:
    """Least loaded first: queued tokens, then running requests, then KV usage, then id (determinism)."""
    return (w.queued_tokens, w.running_requests, w.kv_usage, w.worker_id)


def require(prefills: list[WorkerView]) -> list[WorkerView]:
    if not prefills:
        raise NoWorker("no live prefill worker")
    return prefills
