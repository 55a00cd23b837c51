"""What a trace implies beyond its records: when each request is sent (`schedule`), which request is a
session's next turn (`next_turns`), and how much of it an ideal cache could serve (`oracle_hit_rate`).
Shared by the replayer, the simulator and the reports. Torch-free, stdlib only.
"""

from __future__ import annotations

import math
import random

from splitserve.experiments.trace import Trace, TraceError


def schedule(trace: Trace, rate: float | None, seed: int = 0) -> list[float]:
    """Send time (s from the run's start) of every request, by index; not sorted when re-timed.

    `rate` None: the trace's own `arrival_s`. `rate` R > 0 requests/s: open-loop Poisson. Requests that
    start a session (turn 0, or sessionless) get exponential gaps in trace order, the first at 0, at rate
    R × (such requests / all requests), so the whole trace is offered at R; a later turn keeps its trace
    offset from its session's turn 0 (think time). Deterministic per `seed`. Not done here: the consumers
    (replayer, simulator) never send turn k before turn k-1 has finished, so a send time is a lower bound.
    Raises `ValueError` for a rate that is not a positive finite number, `TraceError` for a later turn
    whose session's turn 0 is not in the trace."""
    reqs = trace.requests
    if rate is None:
        return [r.arrival_s for r in reqs]
    if isinstance(rate, bool) or not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number of requests/s, got {rate!r}")
    num_starts = sum(1 for r in reqs if not r.session_id or r.turn == 0)
    rng = random.Random(seed)
    start_rate = rate * num_starts / len(reqs) if reqs else rate  # the follow-ups fill up the rest
    session_start: dict[str, tuple[float, float]] = {}  # session → (new start, trace arrival of turn 0)
    times, t = [], 0.0
    for i, r in enumerate(reqs):
        if not r.session_id or r.turn == 0:
            times.append(t)
            if r.session_id:
                session_start[r.session_id] = (t, r.arrival_s)
            t += rng.expovariate(start_rate)
            continue
        if r.session_id not in session_start:
            raise TraceError(f"request {i}: session {r.session_id!r} turn {r.turn} has no turn 0 before it")
        new_start, old_start = session_start[r.session_id]
        times.append(new_start + (r.arrival_s - old_start))
    return times


def next_turns(trace: Trace) -> dict[int, int]:
    """Index of a request → index of its session's next turn; absent for last turns and sessionless ones."""
    index = {(r.session_id, r.turn): i for i, r in enumerate(trace.requests) if r.session_id}
    return {i: index[(r.session_id, r.turn + 1)] for i, r in enumerate(trace.requests)
            if r.session_id and (r.session_id, r.turn + 1) in index}


def oracle_hit_rate(trace: Trace) -> float:
    """Share of all prompt tokens an infinite cache shared by every worker could serve.

    In arrival order a request reuses its leading full blocks already seen, capped at input_len - 1 rounded
    down to a whole block (an engine computes at least the last prompt token). Afterwards its full blocks
    are seen, and so are its next turn's first (input_len + output_len) // block_len ids: the output joins
    the next prompt and the decode worker holds it. 0.0 for an empty trace."""
    block_len = trace.meta.block_len
    follow = next_turns(trace)
    seen: set[int] = set()
    cached = total = 0
    for i, r in enumerate(trace.requests):
        full = r.input_len // block_len
        hits = 0
        while hits < full and r.hash_ids[hits] in seen:
            hits += 1
        cached += min(hits, (r.input_len - 1) // block_len) * block_len
        total += r.input_len
        seen.update(r.hash_ids[:full])
        if i in follow:
            seen.update(trace.requests[follow[i]].hash_ids[:(r.input_len + r.output_len) // block_len])
    return cached / total if total else 0.0
