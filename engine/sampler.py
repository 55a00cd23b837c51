"""Turning a batch of logits into next tokens, in one batched pass: greedy, penalties (repetition, presence,
frequency), temperature, top-k, top-p, min-p, per-request seeds, and logprobs from the same pass.

Owns only the math of picking a token. Stop conditions live in the scheduler; stop strings with the
caller that detokenizes. No Python loop over sequences: each step's per-request values travel to the device
as two small tensors, and every operation is over the whole batch.

Randomness is counter-based: a request's draw for the token at position p is one uniform number made from
(its seed, p) by a stateless hash (`uniforms`, SplitMix64 on the host, vectorised), turned into a token by
inverse-CDF over its filtered distribution in vocabulary order. So a request's tokens do not depend on
what else is in the batch, nor on which engine samples them: the prefill worker that samples a
disaggregated request's first token and the decode worker that samples the rest draw what one engine
would, with no generator state to carry between them. Requests without a seed get one from the engine.

Order, as vLLM applies them: penalties on the raw logits, then temperature, then top-k and top-p (one sort,
only when some row uses them), then min-p. Logprobs are of the model's raw distribution (log-softmax of the
logits before any processing), as OpenAI and vLLM report them by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from splitserve.engine.sampling_params import SamplingParams

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One uniform number in [0, 1) per (seed, position): float64, 53 random bits, a pure function of them."""
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        h = _splitmix64(_splitmix64(seeds.astype(np.uint64)) ^ positions.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


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


class Sampler:
    """Picks tokens on the device without synchronising with the host, so it can run while the previous
    step is still in flight."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(
        self,
        logits: torch.Tensor,  # [rows, vocab_size], any float dtype
        rows: list[SampleRow],
        out: torch.Tensor | None = None,  # [rows] int64 on the logits' device
    ) -> tuple[torch.Tensor, Logprobs | None]:
        """Next token per row, written into `out` (or a new tensor), and the logprobs the rows asked for
        (None if none did); no host sync."""
        params = [r.params for r in rows]
        tokens = torch.argmax(logits, dim=-1, out=out)  # greedy rows are done here
        if not all(p.greedy for p in params):
            tokens.copy_(self._sample(logits, rows))
        elif any(p.penalized for p in params):
            tokens.copy_(self._penalized(logits.float(), rows).argmax(dim=-1))
        logprobs = (
            self._logprobs(logits, tokens, params) if any(p.logprobs is not None for p in params) else None
        )
        return tokens, logprobs

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        temperature, top_p, min_p, u, top_k = self._row_values(rows).unbind(0)
        scaled = logits.float()
        if any(p.penalized for p in params):
            scaled = self._penalized(scaled, rows)
        greedy = temperature == 0.0
        scaled = scaled / torch.where(greedy, 1.0, temperature).unsqueeze(1)
        if any(p.top_k is not None or p.top_p < 1.0 for p in params if not p.greedy):
            scaled = _top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        if any(p.min_p > 0.0 for p in params if not p.greedy):
            probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:]
        target = torch.minimum(u.unsqueeze(1) * total, total.nextafter(torch.zeros_like(total)))
        sampled = (cdf <= target).sum(dim=-1).clamp_(max=logits.shape[-1] - 1)  # first cdf above target
        # A token of no mass only where a parallel scan's rounding broke monotony: the argmax then.
        drawn = probs.gather(1, sampled.unsqueeze(1)).squeeze(1) > 0
        sampled = torch.where(drawn, sampled, probs.argmax(dim=-1))
        return torch.where(greedy, scaled.argmax(dim=-1), sampled)

    def _row_values(self, rows: list[SampleRow]) -> torch.Tensor:
        """[temperature, top_p, min_p, uniform draw, top_k] × rows, float32 on the device (one copy)."""
        seeds = np.fromiter((r.seed for r in rows), dtype=np.uint64, count=len(rows))
        positions = np.fromiter((r.position for r in rows), dtype=np.uint64, count=len(rows))
        values = np.empty((5, len(rows)), dtype=np.float32)
        values[0] = [r.params.temperature for r in rows]
        values[1] = [r.params.top_p for r in rows]
        values[2] = [r.params.min_p for r in rows]
        values[3] = np.minimum(uniforms(seeds, positions), np.nextafter(np.float32(1), np.float32(0)))
        values[4] = [r.params.top_k or 0 for r in rows]  # 0: no top-k (vocabularies < 2^24: exact)
        host = torch.from_numpy(values)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

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

        def on_device(parts: list[np.ndarray], dtype=torch.int64) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(parts)).to(device=device, dtype=dtype)

        # Counts built on the device from the token ids alone (one small copy, not a [rows, vocab] one).
        counts = torch.zeros((num_rows, vocab), dtype=torch.float32, device=device)
        out = (on_device(out_rows), on_device(out_ids))
        counts.index_put_(out, torch.ones(len(out[0]), device=device), accumulate=True)
        seen = counts > 0
        seen[on_device(seen_rows), on_device(seen_ids)] = True
        rep, presence, frequency = (
            on_device([x], torch.float32).unsqueeze(1) for x in (rep, presence, frequency)
        )
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return logits - frequency * counts - presence * (counts > 0).float()

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> Logprobs:
        raw = logits.float().log_softmax(dim=-1)
        sampled = raw.gather(1, tokens.unsqueeze(1)).squeeze(1)
        rank = (raw > sampled.unsqueeze(1)).sum(dim=-1) + 1
        top_logprobs, top_ids = raw.topk(max(p.logprobs or 0 for p in params), dim=-1)
        return Logprobs(sampled, rank, top_ids, top_logprobs)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) each row's tokens outside its top k (0: all) and outside the smallest set of its most
    likely tokens whose mass reaches top_p; the most likely token always stays. One descending sort finds
    each row's cutoff logit; the mask is applied in vocabulary order (tokens tied with the cutoff stay)."""
    vocab = logits.shape[-1]
    ordered = logits.sort(dim=-1, descending=True).values
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each rank
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(top_k > 0, top_k, float(vocab)).unsqueeze(1)
    # A row without top-p keeps every token (rounding can bring the mass before the tail to 1).
    keep = (rank < k) & ((before < top_p.unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1))
    num_kept = keep.sum(dim=-1, keepdim=True).clamp_(min=1)
    cutoff = ordered.gather(1, num_kept - 1)
    return logits.masked_fill(logits < cutoff, float("-inf"))
