"""Token ids for trace requests, so that an engine's prefix cache sees what the trace describes.

Each hash id stands for one block of `block_len` token ids drawn from (seed, hash id): equal ids give equal
tokens, different ids (almost surely) different ones. Owns only that mapping; it knows nothing of
tokenizers or text (the ids need not decode to anything readable) and sends nothing. Torch-free.
"""

from __future__ import annotations

import functools
import random

from splitserve.experiments.trace import TraceRequest


class PromptSynth:
    """Deterministic prompts for a trace whose hash ids cover `block_len` tokens each.

    Token ids lie in [first_token_id, vocab_size), leaving the ids below (often special tokens) unused.
    Up to `cache_blocks` blocks are kept (least recently used dropped); the object holds no other state.
    Raises `ValueError` for a block_len < 1 or an empty id range.
    """

    def __init__(self, block_len: int, vocab_size: int, seed: int = 0, first_token_id: int = 3,
                 cache_blocks: int = 65536) -> None:
        if block_len < 1:
            raise ValueError(f"block_len must be >= 1, got {block_len}")
        if not 0 <= first_token_id < vocab_size:
            raise ValueError(f"need 0 <= first_token_id < vocab_size, got {first_token_id} and {vocab_size}")
        self.block_len = block_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.first_token_id = first_token_id
        self._block = functools.lru_cache(maxsize=cache_blocks)(self._draw_block)

    def _draw_block(self, hash_id: int) -> tuple[int, ...]:
        # A string seed is hashed with SHA-512: the same block in every process and Python version.
        rng = random.Random(f"{self.seed}:{hash_id}")
        return tuple(rng.choices(range(self.first_token_id, self.vocab_size), k=self.block_len))

    def tokens(self, req: TraceRequest) -> list[int]:
        """`req.input_len` token ids: its hash ids' blocks concatenated, the last one cut to fit. A new list,
        the caller's. Raises `ValueError` when the request does not have ceil(input_len / block_len) ids
        (a trace of another block_len)."""
        expected = -(-req.input_len // self.block_len)
        if len(req.hash_ids) != expected:
            raise ValueError(f"request has {len(req.hash_ids)} hash ids, {expected} expected for input_len "
                             f"{req.input_len} at block_len {self.block_len}")
        out: list[int] = []
        for hash_id in req.hash_ids:
            out.extend(self._block(hash_id))
        del out[req.input_len:]
        return out

    def session_prompt(self, req: TraceRequest, prev_prompt: list[int], prev_output: list[int]) -> list[int]:
        """The prompt for turn k > 0 of a session replayed live: the previous turn's actual prompt, then its
        actual output (which differs from what the trace's ids stand for), then `tokens(req)` from position
        len(prev_prompt) + len(prev_output) on, `req.input_len` tokens in all. When the previous turn's
        prompt and output are already longer than `req.input_len` (the trace and the run disagree), the
        history cannot be kept and this returns `tokens(req)` alone. A new list; the inputs are not changed.
        """
        base = len(prev_prompt) + len(prev_output)
        if req.input_len < base:
            return self.tokens(req)
        return [*prev_prompt, *prev_output, *self.tokens(req)[base:]]
