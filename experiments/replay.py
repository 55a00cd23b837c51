"""The replayer: sends a trace's requests to a live cluster through the async client SDK and measures them.

Send times come from `trace.schedule` (the trace's own timestamps, or an open-loop Poisson re-timing at a
rate); a session's turn is never sent before its previous turn finished, and its prompt is the previous
turn's prompt, the output the cluster actually produced and the new tokens (`PromptSynth.session_prompt`),
as a chat client would send it. Other prompts are synthesized from their hash ids, so equal ids are equal
tokens and the cluster's prefix caches see what the trace describes. Every request is greedy with
`ignore_eos`, so it generates exactly its `output_len` tokens.

Per request it records a `RequestResult`: time to first token and end-to-end latency as this client saw
them, the gaps between tokens (a chunk carrying k tokens counts as k gaps of its delay / k), the route
(arm, pool, workers), the cached tokens the router's index predicted and those the worker reported, and
the typed error of a failed request. An optional concurrency cap holds requests back (their send time is
then when they were sent, not when they were due). Torch-free.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from splitserve.client import AsyncClient, SplitserveError
from splitserve.experiments.prompts import PromptSynth
from splitserve.experiments.results import RequestResult
from splitserve.experiments.sessions import schedule
from splitserve.experiments.trace import Trace, TraceRequest


@dataclass(frozen=True)
class ReplayConfig:
    vocab_size: int  # of the cluster's checkpoint: synthesized token ids stay below it
    rate: float | None = None  # requests/s (open-loop Poisson); None: the trace's timestamps
    max_concurrency: int | None = None  # requests in flight at most; None: unbounded
    seed: int = 0
    timeout_s: float = 600.0  # each request's deadline
    arm: str = ""  # the label of this run's results; "" = the arm the router reports per request
    progress: bool = True  # a progress line on stderr

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")


@dataclass
class ReplayRun:
    results: list[RequestResult]
    duration_s: float  # first send → last completion


class _Progress:
    """One line on stderr, rewritten at most ten times a second on a terminal (else a line per tenth of
    the run): done/total, errors, elapsed time."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.done = self.errors = 0
        self._start = self._shown = time.monotonic()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        now = time.monotonic()
        if not self.enabled:
            return
        tenth = max(1, self.total // 10)
        due = now - self._shown > 0.1 if self.tty else self.done % tenth == 0
        if due or self.done == self.total:
            self._shown = now
            filled = 30 * self.done // max(1, self.total)
            start = "\r" if self.tty else ""
            sys.stderr.write(f"{start}[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"errors {self.errors} {now - self._start:.1f}s")  # fmt: skip
            if self.done == self.total or not self.tty:
                sys.stderr.write("\n")
            sys.stderr.flush()


async def replay(client: AsyncClient, trace: Trace, config: ReplayConfig) -> ReplayRun:
    """Replay every request of `trace` through `client` (a router). Never raises for a failed request:
    it is recorded with its error."""
    send_at = schedule(trace, config.rate, config.seed)
    synth = PromptSynth(trace.meta.block_len, config.vocab_size, config.seed)
    previous: dict[str, int] = {}  # session → index of its latest turn
    done = {i: asyncio.Event() for i in range(len(trace.requests))}
    histories: dict[int, tuple[list[int], list[int]]] = {}  # index → (prompt sent, output received)
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    progress = _Progress(len(trace.requests), config.progress)
    start = time.monotonic()

    async def one(index: int, req: TraceRequest, before: int | None) -> RequestResult:
        await asyncio.sleep(max(0.0, start + send_at[index] - time.monotonic()))
        if before is not None:
            await done[before].wait()
        prompt = synth.tokens(req)
        if before is not None and before in histories:
            prompt = synth.session_prompt(req, *histories[before])
        try:
            if gate is None:
                return await _send(client, index, req, prompt, config, start, histories)
            async with gate:
                return await _send(client, index, req, prompt, config, start, histories)
        finally:
            done[index].set()

    tasks = []
    for index, req in enumerate(trace.requests):
        before = previous.get(req.session_id) if req.session_id else None
        if req.session_id:
            previous[req.session_id] = index
        tasks.append(asyncio.create_task(one(index, req, before)))
    results = []
    for task in asyncio.as_completed(tasks):
        result = await task
        progress.update(result.ok)
        results.append(result)
    results.sort(key=lambda r: r.index)
    ends = [r.done_s for r in results if r.done_s is not None] or [0.0]
    first = min((r.sent_s for r in results), default=0.0)
    return ReplayRun(results, max(ends) - first)


async def _send(client: AsyncClient, index: int, req: TraceRequest, prompt: list[int],
                config: ReplayConfig, start: float,
                histories: dict[int, tuple[list[int], list[int]]]) -> RequestResult:  # fmt: skip
    sent = time.monotonic()
    result = RequestResult(index, config.arm, req.session_id, req.turn, len(prompt), sent - start)
    output: list[int] = []
    last = sent
    try:
        async for chunk in client.stream(prompt, max_tokens=req.output_len, temperature=0.0, ignore_eos=True,
                                         session_id=req.session_id or None, timeout=config.timeout_s):
            now = time.monotonic()
            if chunk.route is not None:
                _take_route(result, chunk.route, config.arm)
            if k := len(chunk.token_ids):
                if not output:  # the first token; any others in its chunk came with it
                    result.ttft_s = now - sent
                    result.itl_s.extend([0.0] * (k - 1))
                else:
                    result.itl_s.extend([(now - last) / k] * k)
                output.extend(chunk.token_ids)
                last = now
            if chunk.usage is not None:
                result.cached_tokens = chunk.usage.cached_tokens
        result.e2e_s = last - sent
        result.output_len = len(output)
        histories[index] = (prompt, output)
    except SplitserveError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.output_len = len(output)
    return result


def _take_route(result: RequestResult, route: dict, arm: str) -> None:
    result.arm = arm or route["arm"]
    result.pool = route["pool"]
    result.prefill_worker = route["prefill_worker"]
    result.decode_worker = route["decode_worker"]
    result.predicted_cached_tokens = int(route["terms"].get("predicted_cached_tokens", 0))


def replay_blocking(address: str, trace: Trace, config: ReplayConfig) -> ReplayRun:
    """`replay` from synchronous code: its own event loop and client."""

    async def run() -> ReplayRun:
        async with AsyncClient(address) as client:
            return await replay(client, trace, config)

    return asyncio.run(run())
