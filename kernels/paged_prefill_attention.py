"""Causal varlen prefill attention over the paged KV cache (chunked prefill with prefix caching).

Owns the Triton kernel, its launcher, its launch knobs and a plain-torch reference. Each sequence's new
query tokens attend to its whole context, the cached prefix plus the new tokens themselves, all of whose
K/V are already in the cache: this file neither writes K/V nor builds block tables. It reads the cache
layout of `splitserve.engine.attention`: kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]
(K then V), contiguous. Query r of sequence i sits at position seq_lens[i] - num_new_i + r, where num_new_i
= query_start_loc[i + 1] - query_start_loc[i], and sees the keys at positions up to its own.

Grid (cdiv(max_query_len, block_q), num_seqs, num_kv_heads), FlashAttention-2 style: a program holds
block_q new tokens of one sequence for every query head of one KV group, packed as block_m = block_q * group
rows, so each K/V tile is loaded once per group. It walks its context in tiles of block_n keys, each key's
page gathered from the block table (a tile may span pages or lie inside one), keeps an online softmax in
base 2 (log2(e) folded into the scale) with fp32 statistics and accumulator, skips keys past its last
query, and masks only the tiles on the diagonal. Programs past their sequence's new tokens exit at once.

CUDA graphs: the grid depends only on host ints (max_query_len, num_seqs, num_kv_heads); lengths and
offsets are read on the device, and the launcher never syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from splitserve.kernels.paged_checks import check_block_tables, check_out_and_devices, check_q_and_cache

MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class PrefillTuning:
    """Launch knobs, the ones `benchmarks/prefill_attention.py` sweeps; the defaults are first guesses."""

    # Rows per program: query tokens x the KV group's heads (block_q = block_m // group). The launcher
    # lowers it to what max_query_len fills, and raises it to hold one token's group.
    block_m: int = 128
    block_n: int = 64  # keys per inner-loop iteration (K and V tiles of [block_n, head_dim])
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (a tl.dot tile side); got {value}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps and num_stages must be positive; got {self}")


def default_tuning(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> PrefillTuning:
    """Wide heads take more warps for the [block_m, head_dim] accumulator. Head_dim 256, and fp32 (a test
    dtype) at any width, halve the tiles and pipeline less, so the K/V tiles fit in shared memory."""
    num_warps = 4 if head_dim <= 64 else 8
    if head_dim > 128 or dtype == torch.float32:
        return PrefillTuning(block_m=64, block_n=32, num_warps=num_warps, num_stages=2)
    return PrefillTuning(num_warps=num_warps)


@triton.jit
def _attend_key_tile(
    acc, l_i, m_i, q, q_pos, k_base, block_table, start, kv_end, qk_scale_log2,
    stride_kv, stride_block, stride_token,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over keys [start, start + BLOCK_N) clipped to kv_end. Without CAUSAL every
    row sees every key of the tile; with it each row sees keys up to its position q_pos. Clipped keys are
    loaded as zeros, and every live row has q_pos < kv_end, so the causal mask hides them from it (padding
    rows past the last live token may score them; they are never stored)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = start + offs_n  # [BLOCK_N] key positions
    n_mask = pos < kv_end
    block_ids = tl.load(block_table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    rows = block_ids * stride_block + (pos % BLOCK_SIZE) * stride_token  # [BLOCK_N]
    kv_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
    if CAUSAL:
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    # Every row sees key 0 on its first tile, so m_new is finite from the start.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(k_base + stride_kv + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    qk_scale_log2, max_context_len,
    stride_q_token, stride_q_head, stride_kv, stride_block, stride_token, stride_bt_seq,
    stride_out_token, stride_out_head,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (query tile, seq, kv_head): new tokens [first, first + BLOCK_Q) of one sequence, every
    query head of one KV group. Row r of the tile is token first + r // GROUP, head r % GROUP of the group."""
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the latest, longest tiles start first
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    # Clamped so that bad lengths cannot read past the table row nor place a query before position 0.
    seq_len = tl.minimum(tl.maximum(tl.load(seq_lens_ptr + seq), 0), max_context_len)
    num_new = tl.minimum(tl.load(query_start_loc_ptr + seq + 1) - q_start, seq_len)
    first = q_tile * BLOCK_Q
    if first >= num_new:
        return
    last = tl.minimum(first + BLOCK_Q, num_new) - 1  # the tile's last live token
    num_cached = seq_len - num_new

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    token = first + offs_m // GROUP  # [BLOCK_M] index among the sequence's new tokens
    heads = kv_head * GROUP + offs_m % GROUP  # query head h attends with kv head h // GROUP
    m_mask = token <= last  # also false on the rows past BLOCK_Q * GROUP
    q_pos = num_cached + token  # [BLOCK_M] positions in the context
    rows_q = (q_start + token).to(tl.int64)
    io_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_ptrs = q_ptr + rows_q[:, None] * stride_q_token + heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)  # [BLOCK_M, BLOCK_D], padded rows and dims zero

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt_seq
    k_base = kv_ptr + kv_head * HEAD_DIM
    kv_end = num_cached + last + 1
    # Keys before the first row's position are visible to every row: whole tiles of them need no mask.
    full_end = (num_cached + first + 1) // BLOCK_N * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_key_tile(
            acc, l_i, m_i, q, q_pos, k_base, block_table, start, kv_end, qk_scale_log2,
            stride_kv, stride_block, stride_token,
            BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, CAUSAL=False, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
    for start in range(full_end, kv_end, BLOCK_N):  # the diagonal tiles
        acc, l_i, m_i = _attend_key_tile(
            acc, l_i, m_i, q, q_pos, k_base, block_table, start, kv_end, qk_scale_log2,
            stride_kv, stride_block, stride_token,
            BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, CAUSAL=True, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip

    o = acc / l_i[:, None]  # l_i >= 1 on live rows: each saw its row maximum
    rows_o = (q_start + token).to(tl.int64)
    o_ptrs = out_ptr + rows_o[:, None] * stride_out_token + heads[:, None] * stride_out_head + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=io_mask)


def _validate(q, kv_cache, block_tables, query_start_loc, seq_lens, out, max_query_len) -> None:
    """Shape, dtype, device and layout checks that read no device memory."""
    check_q_and_cache(q, kv_cache, rows="num_tokens")
    head_dim = q.shape[2]
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}]; got {head_dim}")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32 or not seq_lens.is_contiguous():
        raise ValueError(
            f"seq_lens must be contiguous int32 [num_seqs]; got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype != torch.int32:
        raise ValueError(
            f"query_start_loc must be int32 [{num_seqs + 1}]; got {query_start_loc.dtype} "
            f"{tuple(query_start_loc.shape)}"
        )
    if not query_start_loc.is_contiguous():
        raise ValueError("query_start_loc must be contiguous")
    check_block_tables(block_tables, num_seqs)
    check_out_and_devices(q, out, kv_cache=kv_cache, block_tables=block_tables,
                          query_start_loc=query_start_loc, seq_lens=seq_lens)  # fmt: skip
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 0:
        raise ValueError(f"max_query_len must be a host int >= 0; got {max_query_len!r}")


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], unit-stride last dim, any other strides
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, prefix sums of new-token counts
    seq_lens: torch.Tensor,  # [num_seqs] int32, context lengths including the new tokens
    scale: float,
    *,
    max_query_len: int,
    out: torch.Tensor | None = None,
    tuning: PrefillTuning | None = None,
) -> torch.Tensor:
    """Causal prefill attention, [num_tokens, num_heads, head_dim] in q's dtype, written into `out` when
    given (and returned); q and the cache are only read. Every token of query_start_loc's ranges is
    written; rows past query_start_loc[-1] are left as they are.

    Contract, not checked on the device (that would sync): 0 <= num_new_i <= max_query_len, num_new_i <=
    seq_lens[i] <= max_blocks * block_size, block ids inside the cache. Lengths past the table's capacity
    are clamped to it and new-token counts to the length, so no read leaves the table row; rows of such
    sequences are then unspecified. Raises ValueError on mismatched shapes, dtypes, devices or layouts."""
    _validate(q, kv_cache, block_tables, query_start_loc, seq_lens, out, max_query_len)
    _, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_seqs = seq_lens.shape[0]
    tuning = tuning or default_tuning(head_dim, q.dtype)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_tokens, num_heads, head_dim]
    if num_seqs == 0 or max_query_len == 0 or q.shape[0] == 0:
        return out

    group = num_heads // num_kv_heads
    # No taller than the longest query needs (decode-like batches), and at least one token per program.
    block_m = min(tuning.block_m, max(16, triton.next_power_of_2(max_query_len * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    _prefill_kernel[(triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out,
        scale * math.log2(math.e), block_tables.shape[1] * block_size,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot needs every tile side >= 16
        BLOCK_N=tuning.block_n, BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 tests want exact products
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )  # fmt: skip
    return out


def paged_prefill_attention_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain torch, fp32 math, one sequence at a time, explicit causal mask; same contract as the kernel
    (rows outside every sequence come out as zeros). Reads lengths on the host: tests and benchmarks only."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # [num_tokens, num_heads, head_dim]
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[i], starts[i + 1]
        if q_end == q_start:
            continue
        block_ids = block_tables[i, : -(-seq_len // block_size)].long()
        k = kv_cache[0, block_ids].flatten(0, 1)[:seq_len].float()  # [seq_len, num_kv_heads, head_dim]
        v = kv_cache[1, block_ids].flatten(0, 1)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_start:q_end].float(), k) * scale  # [heads, new, seq_len]
        q_pos = torch.arange(seq_len - (q_end - q_start), seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [new, seq_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)
    return out.to(q.dtype)
