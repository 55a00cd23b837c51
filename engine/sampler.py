"""Turning a batch of logits into next tokens: greedy, temperature, top-k, top-p, per-request seeds.

Owns only the math of picking a token. Stop conditions live in the scheduler; stop strings with the
caller that detokenizes. A request with a seed draws from its own generator, so its tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from splitserve.engine.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top k and outside the smallest set with mass ≥ top_p. [V]"""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Picks tokens on the device without synchronising with the host, so it can run while the
    previous step is still in flight. Random draws use the exponential race (argmax of p / E with
    E ~ Exp(1) picks token i with probability p_i), which needs no host round trip."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,  # [num_seqs, vocab_size], any float dtype
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        out: torch.Tensor | None = None,  # [num_seqs] int64 on the logits' device
    ) -> torch.Tensor:
        """Next token per row, written into `out` (or a new tensor) and returned; no host sync."""
        tokens = torch.argmax(logits, dim=-1, out=out)  # greedy rows are done here
        for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
            if p.greedy:
                continue
            masked = apply_top_k_top_p(logits[row].float() / p.temperature, p.top_k, p.top_p)
            race = self._race(masked.shape[-1], masked.device, gen)
            tokens[row] = (masked.softmax(-1) / race).argmax()
        return tokens

    def skip_draw(self, params: SamplingParams, generator: torch.Generator | None, vocab_size: int) -> None:
        """Advance a request's own generator past one token's draw, as if this sampler had picked that
        token: a request whose first token was sampled elsewhere (disaggregated prefill) then draws what
        a single engine would. No-op for greedy requests and for those on the shared generator."""
        if not params.greedy and generator is not None:
            self._race(vocab_size, generator.device, generator)

    def _race(self, size: int, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
        race = torch.empty(size, dtype=torch.float32, device=device)
        return race.exponential_(generator=gen or self.generator).clamp_(min=1e-30)
