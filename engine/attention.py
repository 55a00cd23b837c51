"""Paged attention: the metadata a batch carries and the plain-torch reference attention.

Owns writing new K/V into their cache slots and attending over each sequence's paged context. The
KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V). The
functions here are the reference path (any device, any dtype); `ops` chooses them or the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """Where a batch's tokens sit in the paged cache. Built by the model runner, read by backends."""

    phase: Literal["prefill", "decode"]
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with the null block
    query_start_loc_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_context(kv: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """K or V of one sequence from its blocks: [length, num_kv_heads, head_dim]."""
    return kv[block_ids].flatten(0, 1)[:length]


def prefill_attention(q, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context (cached prefix + new).
    q [num_tokens, num_heads, head_dim] → same shape. Uses host-side lengths: not for CUDA graphs."""
    out = torch.empty_like(q)
    block_size = kv_cache.shape[2]
    starts = meta.query_start_loc_host
    for i, seq_len in enumerate(meta.seq_lens_host):
        q_start, q_end = starts[i], starts[i + 1]
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :num_blocks]
        k_ctx = gather_context(kv_cache[0], blocks, seq_len)  # [seq_len, num_kv_heads, head_dim]
        v_ctx = gather_context(kv_cache[1], blocks, seq_len)
        num_new = q_end - q_start
        # Query r sits at position seq_len - num_new + r and sees keys up to it.
        q_pos = torch.arange(seq_len - num_new, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [num_new, seq_len]
        o = F.scaled_dot_product_attention(
            q[q_start:q_end].transpose(0, 1).unsqueeze(0),  # [1, num_heads, num_new, head_dim]
            k_ctx.transpose(0, 1).unsqueeze(0),
            v_ctx.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out


def decode_attention(q, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per sequence over its paged context. q [num_seqs, num_heads, head_dim]."""
    block_size = kv_cache.shape[2]
    max_blocks = -(-max(meta.seq_lens_host) // block_size)
    tables = meta.block_tables[:, :max_blocks]
    k_ctx = kv_cache[0][tables].flatten(1, 2)  # [num_seqs, max_len, num_kv_heads, head_dim]
    v_ctx = kv_cache[1][tables].flatten(1, 2)
    positions = torch.arange(k_ctx.shape[1], device=q.device)
    mask = positions[None, :] < meta.seq_lens[:, None]  # [num_seqs, max_len]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [num_seqs, num_heads, 1, head_dim]
        k_ctx.transpose(1, 2),
        v_ctx.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(2)
