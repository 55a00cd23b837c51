"""The model's operations on CUDA through the Triton kernels in `splitserve.kernels`.

Owns the mapping from the model's calls to kernel launchers: fused residual-add + RMSNorm, SiLU-and-mul,
RoPE fused with the paged K/V write, and split-KV paged decode attention, whose lengths are read on the
device, so decode steps can be captured in CUDA graphs. Prefill attention stays on the torch reference
(PyTorch's fused SDPA kernels per sequence) until a measured Triton kernel beats it.
"""

from __future__ import annotations

import torch

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.ops import TorchOps
from splitserve.kernels.paged_decode_attention import paged_decode_attention
from splitserve.kernels.rms_norm import add_rms_norm, rms_norm
from splitserve.kernels.rope_kv import rope_and_store_kv
from splitserve.kernels.silu_mul import silu_and_mul


class TritonOps(TorchOps):
    name = "triton"
    supports_cuda_graphs = True

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Also the q/k norms of Qwen3, on strided [num_tokens, heads, head_dim] views of the packed qkv.
        return rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        # In place: residual becomes x + residual, x its norm (both are this layer's own buffers).
        return add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    def rope_and_store_kv(self, positions, q, k, v, cos, sin, kv_cache, slot_mapping) -> torch.Tensor:
        return rope_and_store_kv(positions, q, k, v, cos, sin, kv_cache, slot_mapping)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if meta.phase == "decode":
            return paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale)
        return super().attention(q, kv_cache, meta, scale)
