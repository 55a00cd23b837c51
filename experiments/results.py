"""What one request of an experiment measured, live (the replayer) or simulated (the simulator).

Both produce the same `RequestResult`, so one report reads either. Times are seconds; `sent_s` counts from
the run's start. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestResult:
    index: int  # the request's position in its trace
    arm: str  # the routing policy (A/B arm) that served it
    session_id: str
    turn: int
    input_len: int  # prompt tokens sent
    sent_s: float  # when it was sent, from the run's start
    ttft_s: float | None = None  # sent → first token; None when it failed before one
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive output tokens
    e2e_s: float | None = None  # sent → last token
    output_len: int = 0  # tokens received
    pool: str = ""  # "fresh", "warm" or "decode-local"
    prefill_worker: str = ""
    decode_worker: str = ""
    predicted_cached_tokens: int = 0  # what the router's index predicted its prefill target held
    cached_tokens: int = 0  # what the serving worker reported it reused
    error: str | None = None  # the failure, typed ("OverloadedError: ...")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def done_s(self) -> float | None:
        return None if self.e2e_s is None else self.sent_s + self.e2e_s

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
