"""Rotary embedding fused with the paged K/V cache write: the Triton kernel, its launcher and the
plain-torch reference.

Owns rotating q and k (neox style: the two halves of each head form the pairs) by float32 cos/sin tables
indexed by position, and writing the rotated k and the raw v of each token into its cache slot. The KV
cache of one layer is [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V); slot =
block_id * block_size + offset. It does not own the tables (the engine's rotary module builds them), the
slot assignment (the scheduler's) or attention.

Rounding is torch's, op for op: the tables are cast to the activation dtype, then each product and the
sum are rounded to it. One program per token covers all its heads; the grid depends only on shapes
(CUDA-graph safe), and the launcher never synchronises with the device (positions and slots are not
range-checked: they must index the tables and the cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _rotate_heads(
    src_ptr,
    stride_src_head,
    dst_ptr,
    stride_dst_head,
    num_heads,
    half,
    cos1,
    sin1,
    cos2,
    sin2,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """dst[h] = src[h] * cos + rotate_half(src[h]) * sin for the heads of one token, rounded as torch."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (dims < half)
    dtype = dst_ptr.dtype.element_ty
    src = src_ptr + heads * stride_src_head + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1): first half x1*c - x2*s, second half x2*c + x1*s.
    out1 = (x1 * cos1).to(dtype).to(tl.float32) - (x2 * sin1).to(dtype).to(tl.float32)
    out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    dst = dst_ptr + heads * stride_dst_head + dims
    tl.store(dst, out1.to(dtype), mask=mask)
    tl.store(dst + half, out2.to(dtype), mask=mask)


@triton.jit
def _rope_and_store_kv_kernel(
    positions_ptr,
    slot_mapping_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    cache_ptr,
    stride_positions,
    stride_slots,
    stride_cos,
    stride_sin,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_qo_token,
    stride_qo_head,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    num_heads,
    num_kv_heads,
    half,
    block_size,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token * stride_positions).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token * stride_slots).to(tl.int64)
    dtype = q_ptr.dtype.element_ty

    # Tables cast to the activation dtype first, as the engine does.
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < half
    cos_row = cos_ptr + position * stride_cos + dims
    sin_row = sin_ptr + position * stride_sin + dims
    cos1 = tl.load(cos_row, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + half, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + half, mask=dmask, other=0.0).to(dtype).to(tl.float32)[None, :]

    _rotate_heads(
        q_ptr + token * stride_q_token,
        stride_q_head,
        q_out_ptr + token * stride_qo_token,
        stride_qo_head,
        num_heads,
        half,
        cos1,
        sin1,
        cos2,
        sin2,
        BLOCK_Q_HEADS,
        BLOCK_HALF,
    )
    k_dst = cache_ptr + (slot // block_size) * stride_cache_block + (slot % block_size) * stride_cache_offset
    _rotate_heads(
        k_ptr + token * stride_k_token,
        stride_k_head,
        k_dst,
        stride_cache_head,
        num_kv_heads,
        half,
        cos1,
        sin1,
        cos2,
        sin2,
        BLOCK_KV_HEADS,
        BLOCK_HALF,
    )

    # V is copied unchanged, as two halves on the same tile shape.
    heads = tl.arange(0, BLOCK_KV_HEADS)[:, None]
    mask = (heads < num_kv_heads) & (dims[None, :] < half)
    v_src = v_ptr + token * stride_v_token + heads * stride_v_head + dims[None, :]
    v_dst = k_dst + stride_cache_kv + heads * stride_cache_head + dims[None, :]
    tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)
    tl.store(v_dst + half, tl.load(v_src + half, mask=mask), mask=mask)


def _check_index(name: str, t: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if t.shape != (num_tokens,) or t.dtype not in _INDEX_DTYPES or t.device != device:
        raise ValueError(
            f"{name} must be [{num_tokens}] int32/int64 on {device}, "
            f"got {tuple(t.shape)} {t.dtype} on {t.device}"
        )


def _check_inputs(positions, q, k, v, cos, sin, kv_cache, slot_mapping, q_out) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(
            "q must be [num_tokens, num_heads, head_dim], k and v [num_tokens, num_kv_heads, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    num_tokens, num_kv_heads, head_dim = k.shape
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if q.dtype not in _DTYPES or any(t.dtype != q.dtype for t in (k, v, kv_cache)):
        raise ValueError(
            f"q, k, v and kv_cache need one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}, "
            f"{kv_cache.dtype}"
        )
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"kv_cache must be [2, num_blocks, block_size, {num_kv_heads}, {head_dim}], "
            f"got {tuple(kv_cache.shape)}"
        )
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape != cos.shape or table.shape[1] != head_dim:
            raise ValueError(f"{name} must be [max_positions, {head_dim}] like cos, got {tuple(table.shape)}")
        if table.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {table.dtype}")
    if q_out is not None and (q_out.shape != q.shape or q_out.dtype != q.dtype):
        raise ValueError(f"q_out must be {tuple(q.shape)} {q.dtype}, got {tuple(q_out.shape)} {q_out.dtype}")
    named = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "kv_cache": kv_cache, "q_out": q_out}
    for name, t in named.items():
        if t is None:
            continue
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")
    _check_index("positions", positions, num_tokens, q.device)
    _check_index("slot_mapping", slot_mapping, num_tokens, q.device)


def rope_and_store_kv(
    positions: torch.Tensor,  # [num_tokens] int64 (or int32)
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos: torch.Tensor,  # [max_positions, head_dim] float32
    sin: torch.Tensor,  # [max_positions, head_dim] float32
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (or int32): block_id * block_size + offset
    *,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotates q and k by their positions, writes the rotated k and the raw v into kv_cache at
    slot_mapping, and returns the rotated q.

    The rotated q goes into `q_out` (q's shape and dtype, contiguous last dimension, any other strides;
    `q_out=q` rotates in place) or, by default, into a new contiguous tensor. q, k and v are read only
    (unless q is q_out) and may be strided views, e.g. of a packed qkv projection; their last dimension
    must be contiguous. Mutates kv_cache at the given slots only; slots must be distinct (a repeated slot
    gets one of its tokens, unspecified which). Raises ValueError on bad shapes, dtypes, devices or
    layouts; positions and slots are not range-checked (that would need a device sync).
    """
    _check_inputs(positions, q, k, v, cos, sin, kv_cache, slot_mapping, q_out)
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_tokens, num_heads, head_dim]
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return q_out
    num_kv_heads, half = k.shape[1], head_dim // 2
    block_q_heads = triton.next_power_of_2(num_heads)
    block_half = triton.next_power_of_2(half)
    _rope_and_store_kv_kernel[(num_tokens,)](
        positions,
        slot_mapping,
        cos,
        sin,
        q,
        k,
        v,
        q_out,
        kv_cache,
        positions.stride(0),
        slot_mapping.stride(0),
        cos.stride(0),
        sin.stride(0),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        num_heads,
        num_kv_heads,
        half,
        kv_cache.shape[2],
        BLOCK_Q_HEADS=block_q_heads,
        BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        num_warps=4 if block_q_heads * block_half <= 2048 else 8,
        enable_fp_fusion=False,  # no FMA contraction: the same roundings as torch's separate ops
    )
    return q_out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_and_store_kv_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """The engine's torch math (rotary + store_kv), op for op: returns a new rotated q and writes
    kv_cache (which must be contiguous) at slot_mapping; q, k and v are not modified."""
    c = cos[positions].unsqueeze(1).to(q.dtype)  # [num_tokens, 1, head_dim]
    s = sin[positions].unsqueeze(1).to(q.dtype)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)
    return q
