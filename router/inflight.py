"""What this router has sent each worker that the worker's last polled load may not show yet.

Workers report their load when polled (every 0.1 s); between polls a burst of decisions would all see the
same idle worker. The `Ledger` counts the router's own assignments the moment it makes them: per worker,
the prompt tokens it must still compute for this router (until their first token), the requests it runs
and the KV blocks they hold (until they end; a prefill worker's share ends with the first token). A
policy then sees, per worker, the larger of the reported and the ledger's figure (the smaller for free
blocks): the report covers work from other routers, the ledger covers what the report has not caught up
with, and taking the maximum never counts a request twice.

Thread-safe; a `Ticket` is one request's entries and must be ended (`Router.generate` does, in `finally`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from splitserve.protos import common_pb2


@dataclass
class _Counts:
    queued_tokens: int = 0
    running_requests: int = 0
    blocks: int = 0
    waiting: int = 0  # of its requests, those whose prefill has not produced a token yet
    until_first_token: bool = False  # all of it ends with the first token (a prefill worker's share)


class Ticket:
    """One request's assignments. `first_token()` drops its uncomputed prompt tokens (prefill done);
    `end()` drops everything. Both are idempotent."""

    def __init__(self, ledger: Ledger, entries: dict[str, _Counts]) -> None:
        self._ledger = ledger
        self._entries = entries
        self._prefilled = False
        self._ended = False

    def first_token(self) -> None:
        with self._ledger.lock:
            if self._prefilled or self._ended:
                return
            self._prefilled = True
            for worker_id, c in self._entries.items():
                self._ledger.counts[worker_id].queued_tokens -= c.queued_tokens
                self._ledger.counts[worker_id].waiting -= c.waiting
                if c.until_first_token:
                    self._release(worker_id, c)

    def end(self) -> None:
        self.first_token()
        with self._ledger.lock:
            if self._ended:
                return
            self._ended = True
            for worker_id, c in self._entries.items():
                if not c.until_first_token:
                    self._release(worker_id, c)

    def _release(self, worker_id: str, c: _Counts) -> None:
        total = self._ledger.counts[worker_id]
        total.running_requests -= c.running_requests
        total.blocks -= c.blocks


class Ledger:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, _Counts] = {}

    def assign(self, entries: dict[str, tuple[int, int, int]], prefill: str | None = None) -> Ticket:
        """Record one request: worker id → (prompt tokens to compute there, requests it runs there, KV
        blocks it holds there); `prefill`: the worker among them whose share all ends with the first token.
        Returns the request's ticket."""
        counts = {w: _Counts(*map(max, v, (0, 0, 0)), waiting=int(v[0] > 0), until_first_token=w == prefill)
                  for w, v in entries.items()}  # fmt: skip
        with self.lock:
            for worker_id, c in counts.items():
                total = self.counts.setdefault(worker_id, _Counts())
                total.waiting += c.waiting
                total.queued_tokens += c.queued_tokens
                total.running_requests += c.running_requests
                total.blocks += c.blocks
        return Ticket(self, counts)

    def adjusted(self, worker_id: str, load: common_pb2.WorkerLoad) -> common_pb2.WorkerLoad:
        """`load` (as reported) with this router's own assignments folded in (see the module docstring)."""
        with self.lock:
            own = self.counts.get(worker_id)
            if own is None or not (own.queued_tokens or own.running_requests or own.blocks or own.waiting):
                return load  # nothing of ours to fold in
            own = _Counts(own.queued_tokens, own.running_requests, own.blocks, own.waiting)
        running = load.running_requests + load.waiting_requests
        total = _total_blocks(load)
        free = load.free_blocks if total is None else min(load.free_blocks, max(0, total - own.blocks))
        usage = load.kv_usage if total is None else max(load.kv_usage, own.blocks / total)
        # waiting_requests: the reported queue, or at least the requests this router sent whose prefill
        # has not produced a token (the running count already holds both: the two stay comparable).
        waiting = max(load.waiting_requests, own.waiting)
        return common_pb2.WorkerLoad(  # what a routing decision reads (tier stats and costs: the polled load)
            queued_tokens=max(load.queued_tokens, own.queued_tokens), waiting_requests=waiting,
            running_requests=max(running, own.running_requests) - waiting, kv_usage=usage, free_blocks=free,
            max_running_requests=load.max_running_requests, step_ms=load.step_ms,
            step_tokens=load.step_tokens,
        )  # fmt: skip


def _total_blocks(load: common_pb2.WorkerLoad) -> int | None:
    """The worker's usable KV blocks, from its free blocks and usage; None when it cannot be told (full,
    or a load never reported)."""
    if load.kv_usage >= 1.0 or (load.free_blocks == 0 and load.kv_usage == 0.0):
        return None
    return round(load.free_blocks / (1.0 - load.kv_usage))
