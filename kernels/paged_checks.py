"""Argument checks shared by the paged attention launchers (decode and prefill). They read no device
memory and raise ValueError with what was expected and what came."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_q_and_cache(q: torch.Tensor, kv_cache: torch.Tensor, rows: str) -> None:
    """q [rows, num_heads, head_dim] fits kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"need q [{rows}, num_heads, head_dim] and kv_cache [2, num_blocks, block_size, "
            f"num_kv_heads, head_dim]; got {tuple(q.shape)} and {tuple(kv_cache.shape)}"
        )
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim or num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}: head_dim must "
            "match and num_heads be a multiple of num_kv_heads"
        )
    if q.dtype not in SUPPORTED_DTYPES or kv_cache.dtype != q.dtype:
        raise ValueError(f"q and kv_cache must share one of fp16/bf16/fp32; got {q.dtype}, {kv_cache.dtype}")
    if not kv_cache.is_contiguous() or q.stride(-1) != 1:
        raise ValueError("kv_cache must be contiguous and q's last dimension unit-stride")


def check_block_tables(block_tables: torch.Tensor, num_seqs: int) -> None:
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be int32 [{num_seqs}, max_blocks]; got "
            f"{block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")


def check_out_and_devices(q: torch.Tensor, out: torch.Tensor | None, **tensors: torch.Tensor) -> None:
    """`out` (when given) matches q; q, `tensors` and out share q's device."""
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} with a unit-stride last dimension")
    if out is not None:
        tensors = {**tensors, "out": out}
    if any(t.device != q.device for t in tensors.values()):
        raise ValueError(f"q, {', '.join(tensors)} must be on one device")
