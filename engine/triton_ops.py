"""The model's operations on CUDA through the Triton kernels in `splitserve.kernels`.

Owns the mapping from the model's calls to kernel launchers: fused residual-add + RMSNorm, SiLU-and-mul,
RoPE fused with the paged K/V write, and split-KV paged decode attention, whose lengths are read on the
device, so decode steps can be captured in CUDA graphs; prefill attention (chunks over a cached prefix)
through the paged varlen kernel, which measured 1.8-78x faster than the per-sequence torch SDPA path
on an H100 (docs/benchmarks.md).

Projections of at most `fused_gemv_max_tokens` rows can run on the GEMV kernels with the norm before
them and the MLP activation after them fused in; the rest on the add_rms_norm kernel, cuBLAS (F.linear)
and the silu_and_mul kernel. The default is 0 (never fused): on an H100 the fused kernels measured
slower than cuBLAS plus the separate elementwise kernels (docs/benchmarks.md). The choice depends on the
row count only, so each CUDA-graph batch bucket captures one fixed path.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.ops import TorchOps
from splitserve.kernels.gemv import (
    MAX_TOKENS,
    add_rms_norm_gemv,
    add_rms_norm_gemv_silu_mul,
    gemv,
    pdl_supported,
)
from splitserve.kernels.paged_decode_attention import paged_decode_attention
from splitserve.kernels.paged_prefill_attention import paged_prefill_attention
from splitserve.kernels.rms_norm import add_rms_norm, rms_norm
from splitserve.kernels.rope_kv import rope_and_store_kv
from splitserve.kernels.silu_mul import silu_and_mul


class TritonOps(TorchOps):
    """`fused_gemv_max_tokens` (0..MAX_TOKENS): the largest row count that takes the fused GEMV kernels.
    `pdl`: launch those with programmatic dependent launch; None decides from the current CUDA device
    (`pdl_supported`: capability >= 9.0, compiled Triton, never the interpreter). Raises ValueError on an
    out-of-range row count or on pdl=True where it is not supported."""

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, *, fused_gemv_max_tokens: int = 0, pdl: bool | None = None) -> None:
        if not 0 <= fused_gemv_max_tokens <= MAX_TOKENS:
            raise ValueError(f"fused_gemv_max_tokens must be in [0, {MAX_TOKENS}]: {fused_gemv_max_tokens}")
        supported = torch.cuda.is_available() and pdl_supported(torch.device("cuda"))
        if pdl and not supported:
            raise ValueError("pdl=True needs compiled Triton on a CUDA device of capability >= 9.0")
        self.fused_gemv_max_tokens = fused_gemv_max_tokens
        self.pdl = supported if pdl is None else pdl

    def _fused(self, x: torch.Tensor) -> bool:
        return x.shape[0] <= self.fused_gemv_max_tokens

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Also the q/k norms of Qwen3, on strided [num_tokens, heads, head_dim] views of the packed qkv.
        return rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        # In place: residual becomes x + residual, x its norm (both are this layer's own buffers).
        return add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._fused(x):
            return gemv(x, weight, bias, pdl=self.pdl)
        return F.linear(x, weight, bias)

    def add_norm_linear(self, x, residual, norm_weight, eps, weight, bias):
        if self._fused(x):  # the new residual is a new tensor; x and residual are left as they are
            return add_rms_norm_gemv(x, residual, norm_weight, eps, weight, bias, pdl=self.pdl)
        return super().add_norm_linear(x, residual, norm_weight, eps, weight, bias)  # in place, F.linear

    def add_norm_gate_up_silu(self, x, residual, norm_weight, eps, gate_up_weight):
        if self._fused(x):
            return add_rms_norm_gemv_silu_mul(x, residual, norm_weight, eps, gate_up_weight, pdl=self.pdl)
        return super().add_norm_gate_up_silu(x, residual, norm_weight, eps, gate_up_weight)

    def rope_and_store_kv(self, positions, q, k, v, cos, sin, kv_cache, slot_mapping) -> torch.Tensor:
        return rope_and_store_kv(positions, q, k, v, cos, sin, kv_cache, slot_mapping)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if meta.phase == "decode":
            return paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale)
        starts = meta.query_start_loc_host
        max_query_len = max(b - a for a, b in itertools.pairwise(starts))
        return paged_prefill_attention(
            q, kv_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            max_query_len=max_query_len,
        )  # fmt: skip
