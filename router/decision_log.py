"""The decision log: every routing decision with its score terms and what the other arms would have chosen.

A `DecisionRecord` is one decision: the arm that served the request, the target it picked, the policy's
score terms, the cached tokens the index predicted at that target, and — shadow scoring — the decision every
other configured policy would have made on the same inputs. The live router and the simulator write the
same records, one JSON object per line, so a report can say why an arm lost.

`DecisionLog` appends records to a file from a background thread (a routing decision never waits on the
disk); its bounded queue drops records rather than stall routing, and counts what it dropped. Torch-free.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.router.policy_types import Decision, usable_cached_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """Where a policy would send a request: its pool, prefill worker (None: local) and decode worker."""

    pool: str
    prefill: str | None
    decode: str

    @classmethod
    def of(cls, decision: Decision) -> Choice:
        return cls(decision.pool, decision.prefill, decision.decode)


@dataclass(frozen=True)
class DecisionRecord:
    t_s: float  # when the decision was made (the router's clock, or simulated time)
    request_id: str
    arm: str
    choice: Choice
    terms: dict[str, float]
    prompt_tokens: int
    predicted_cached_tokens: int  # leading tokens the chosen prefill target holds, per the index
    shadow: dict[str, Choice] = field(default_factory=dict)  # other arm → what it would have chosen

    def to_json(self) -> dict:
        return {
            "t_s": self.t_s, "request_id": self.request_id, "arm": self.arm, **_choice_json(self.choice),
            "terms": self.terms, "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "shadow": {arm: _choice_json(c) for arm, c in self.shadow.items()},
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> DecisionRecord:
        def choice(d: dict) -> Choice:
            return Choice(d["pool"], d["prefill"], d["decode"])

        return cls(data["t_s"], data["request_id"], data["arm"], choice(data), dict(data["terms"]),
                   data["prompt_tokens"], data["predicted_cached_tokens"],
                   {arm: choice(c) for arm, c in data["shadow"].items()})  # fmt: skip


def _choice_json(c: Choice) -> dict:
    return {"pool": c.pool, "prefill": c.prefill, "decode": c.decode}


def predicted_cached_tokens(decision: Decision, matched_blocks: dict[str, int], block_size: int,
                            num_prompt_tokens: int) -> int:  # fmt: skip
    """The prompt tokens the decision's prefill target (the decode worker when local) holds per the index,
    or will have fetched (`Decision.fetch_blocks`), capped as the engine caps a hit (at least the last
    prompt token is computed)."""
    held = max(matched_blocks.get(decision.target, 0), decision.fetch_blocks)
    return usable_cached_tokens(held, num_prompt_tokens, block_size)


def read_decision_log(path: str | Path) -> list[DecisionRecord]:
    with open(path) as f:
        return [DecisionRecord.from_json(json.loads(line)) for line in f if line.strip()]


class DecisionLog:
    """Appends records to `path` as JSON lines, from its own thread. `record()` never blocks; `close()`
    writes what is queued and stops the thread."""

    def __init__(self, path: str | Path, max_queued: int = 65536) -> None:
        self.path = Path(path)
        self.dropped = 0
        self._queue: queue.Queue[DecisionRecord | None] = queue.Queue(max_queued)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed by the writer thread on close()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._thread.start()

    def record(self, rec: DecisionRecord) -> None:
        try:
            self._queue.put_nowait(rec)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self.dropped:
            log.warning("decision log %s dropped %d records (writer behind)", self.path, self.dropped)

    def _run(self) -> None:
        with self._file:
            while (rec := self._queue.get()) is not None:
                self._file.write(json.dumps(rec.to_json()) + "\n")
                if self._queue.empty():
                    self._file.flush()
