"""Results handed out by the engine and the offline API (vLLM-compatible shapes). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class FinishReason(StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's logprob under the model's raw distribution, its rank there (1: the most likely),
    and the `SamplingParams.logprobs` most likely tokens as (token id, logprob), descending."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


class StepOutput(NamedTuple):
    """What one engine step did to one request. `new_token_ids` may be empty (a mid-prompt chunk).
    `logprobs`: one per new token, when the request asked for them. A named tuple: one is made per
    request per step (a frozen dataclass costs ~2.5x as much to make)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_cached_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Logprob:
    """vLLM's shape: a token's logprob, its rank in the distribution (1: the most likely), its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """`logprobs`, when asked for: per output token, {token id: Logprob} holding the sampled token and the
    most likely ones (vLLM's shape); `cumulative_logprob` their sum over the sampled tokens."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int
    finished: bool
