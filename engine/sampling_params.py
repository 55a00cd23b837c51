"""Per-request sampling and stopping parameters (vLLM-compatible names). Torch-free.

Owns validation of user-supplied sampling values; the sampler and the stop checks read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from splitserve.engine.errors import InvalidRequest

MAX_LOGPROBS = 20  # the most top logprobs a request may ask for (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. `top_k` None, `top_p` 1.0 and `min_p` 0.0 disable those filters;
    `repetition_penalty` 1.0 and `presence_penalty` / `frequency_penalty` 0.0 disable the penalties (as in
    vLLM: repetition on prompt and output tokens, the others on output tokens). `seed` makes the draws a
    pure function of (seed, token position). `logprobs` N (0–20) returns each sampled token's logprob and
    rank and the N most likely tokens' (the raw model distribution); None returns none. `stop` strings
    are matched on detokenized text by the caller that owns the tokenizer; `stop_token_ids` and EOS are
    matched by the engine. Invalid values raise `InvalidRequest` (a `ValueError`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1

    def __post_init__(self) -> None:
        # Accept lists (vLLM users pass them) but store tuples so the object stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        if self.n != 1:
            raise InvalidRequest(f"n must be 1 (parallel sampling is not supported), got {self.n}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InvalidRequest(f"top_k must be None (disabled) or an integer >= 1, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequest(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not (
            isinstance(self.logprobs, int)
            and not isinstance(self.logprobs, bool)
            and 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise InvalidRequest(
                f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be non-negative integers")

    # Cached: the engine and the sampler read them for every sequence of every step.
    @cached_property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @cached_property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
