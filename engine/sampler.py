"""Turning a batch of logits into next tokens, in one batched pass: greedy, penalties (repetition, presence,
frequency), temperature, top-k, top-p, min-p, per-request seeds, and logprobs from the same pass.

Owns where the per-request values come from and the order of the steps. Stop conditions live in the
scheduler; stop strings with the caller that detokenizes. No Python loop over sequences on the device side:
each step's per-request values travel as three small arrays (through the engine's staged uploads), and
every operation is over the whole batch.

Filtering and drawing is `kernels.sampling`: sort-free rejection sampling whose kept set and draw are
defined there (temperature, then top-k and top-p over the whole distribution, then min-p); the Triton
kernels on CUDA, their plain-torch reference on CPU, which give the same tokens. Randomness is
counter-based: a request's draw for the token at position p is a pure function of (its seed, p), so its
tokens do not depend on what else is in the batch, nor on which engine samples them: the prefill worker
that samples a disaggregated request's first token and the decode worker that samples the rest draw what
one engine would, with no generator state to carry between them. Requests without a seed get one from
the engine.

Penalties apply to the raw logits first, as vLLM applies them. Logprobs are of the model's raw
distribution (log-softmax of the logits before any processing), as OpenAI and vLLM report them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels.sampling import sample, sample_reference


class SampleRow(NamedTuple):
    """One row of a step's logits to sample: its request's parameters, seed and the position of the token
    drawn; for penalties, the token ids it has seen (`prompt` and `output`, only read when it has any).
    A named tuple: one is made per sequence per step, and a frozen dataclass costs ~4× as much to make."""

    params: SamplingParams
    seed: int
    position: int
    prompt: list[int] | None = None
    output: list[int] | None = None


@dataclass(frozen=True)
class Logprobs:
    """Device tensors, one row per sampled row: the sampled token's raw logprob and rank (1 = the most
    likely), and the `top` most likely tokens' ids and logprobs (descending). `top` is the batch's largest
    request; a row reads its own first `params.logprobs`."""

    sampled: torch.Tensor  # [rows] float32
    rank: torch.Tensor  # [rows] int64
    top_ids: torch.Tensor  # [rows, top] int64
    top_logprobs: torch.Tensor  # [rows, top] float32

    def map(self, fn) -> Logprobs:
        """The same four fields, each passed through `fn` (e.g. a copy to the host)."""
        return Logprobs(fn(self.sampled), fn(self.rank), fn(self.top_ids), fn(self.top_logprobs))

    def __iter__(self):
        return iter((self.sampled, self.rank, self.top_ids, self.top_logprobs))


class SamplingValues(NamedTuple):
    """A step's per-request sampling values on the host, one column per row: [temperature, top_p, min_p]
    float32, top_k int32 (0: off), [seed, position of the token drawn] int64."""

    floats: np.ndarray
    top_k: np.ndarray
    ints: np.ndarray


class Sampler:
    """Picks tokens on the device without synchronising with the host, so it can run while the previous
    step is still in flight. `upload(values)` puts a host array on the device without waiting for it
    (the model runner's staged uploads; on CPU the array itself)."""

    def __init__(
        self, device: torch.device, upload: Callable[[np.ndarray], torch.Tensor] | None = None
    ) -> None:
        self.device = device
        self._upload = upload or (lambda values: torch.from_numpy(values).to(device))
        self._draw = sample if device.type == "cuda" else sample_reference

    def __call__(
        self,
        logits: torch.Tensor,  # [rows, vocab_size], any float dtype
        rows: list[SampleRow],
        out: torch.Tensor | None = None,  # [rows] int64 on the logits' device
    ) -> tuple[torch.Tensor, Logprobs | None]:
        """Next token per row, written into `out` (or a new tensor), and the logprobs the rows asked for
        (None if none did); no host sync."""
        params = [r.params for r in rows]
        filtered = self._penalized(logits.float(), rows) if any(p.penalized for p in params) else logits
        if all(p.greedy for p in params):
            tokens = torch.argmax(filtered, dim=-1, out=out)
        else:
            floats, top_k, ints = self._row_values(rows)
            tokens = self._draw(filtered, floats[0], top_k, floats[1], floats[2], ints[0], ints[1], out=out)
        return tokens, self.logprobs(logits, tokens, rows)

    @staticmethod
    def values(rows: list[SampleRow]) -> SamplingValues:
        """The rows' per-request values, on the host."""
        n = len(rows)
        floats = np.empty((3, n), np.float32)
        floats[0] = [r.params.temperature for r in rows]
        floats[1] = [r.params.top_p for r in rows]
        floats[2] = [r.params.min_p for r in rows]
        top_k = np.fromiter((r.params.top_k or 0 for r in rows), np.int32, n)
        ints = np.empty((2, n), np.int64)
        ints[0] = [r.seed for r in rows]
        ints[1] = [r.position for r in rows]
        return SamplingValues(floats, top_k, ints)

    def _row_values(self, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self._upload(values) for values in self.values(rows))

    def _penalized(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Repetition penalty on every token of prompt and output (a positive logit divided by it, a
        negative one multiplied), presence and frequency penalties on the output's tokens (minus the
        penalty once, and once per occurrence), as vLLM and OpenAI define them."""
        num_rows, vocab = logits.shape
        device = logits.device
        out_rows, out_ids, seen_rows, seen_ids = [], [], [], []
        rep, presence, frequency = np.ones(num_rows), np.zeros(num_rows), np.zeros(num_rows)
        for i, r in enumerate(rows):
            p = r.params
            if not p.penalized:
                continue
            out_rows.append(np.full(len(r.output or ()), i))
            out_ids.append(np.asarray(r.output or (), dtype=np.int64))
            seen_rows.append(np.full(len(r.prompt or ()), i))
            seen_ids.append(np.asarray(r.prompt or (), dtype=np.int64))
            rep[i], presence[i], frequency[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty

        def on_device(parts: list[np.ndarray], dtype=np.int64) -> torch.Tensor:
            return self._upload(np.concatenate(parts).astype(dtype, copy=False))

        # Counts built on the device from the token ids alone (one small copy, not a [rows, vocab] one).
        counts = torch.zeros((num_rows, vocab), dtype=torch.float32, device=device)
        out = (on_device(out_rows), on_device(out_ids))
        counts.index_put_(out, torch.ones(len(out[0]), device=device), accumulate=True)
        seen = counts > 0
        seen[on_device(seen_rows), on_device(seen_ids)] = True
        rep, presence, frequency = (
            on_device([x], np.float32).unsqueeze(1) for x in (rep, presence, frequency)
        )
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return logits - frequency * counts - presence * (counts > 0).float()

    @staticmethod
    def logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[SampleRow]) -> Logprobs | None:
        """The logprobs of `tokens` (sampled from `logits`) that the rows asked for; None if none did."""
        params = [r.params for r in rows]
        if all(p.logprobs is None for p in params):
            return None
        raw = logits.float().log_softmax(dim=-1)
        sampled = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
        rank = (raw > sampled.unsqueeze(1)).sum(dim=-1) + 1
        top_logprobs, top_ids = raw.topk(max(p.logprobs or 0 for p in params), dim=-1)
        return Logprobs(sampled, rank, top_ids, top_logprobs)
