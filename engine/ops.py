"""The model's swappable operations: norms, activation, RoPE + KV write, attention.

Owns the choice between the plain-torch reference (any device and dtype; what CPU runs and what the
kernels are tested against) and the Triton kernels (CUDA). The model is built with one `ModelOps` object
and calls it explicitly; there is no global switch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.attention import AttentionMetadata, decode_attention, prefill_attention, store_kv
from splitserve.engine.rotary import rotate_half


class TorchOps:
    """Reference operations, op for op the math of transformers' Llama/Qwen implementations."""

    name = "torch"
    supports_cuda_graphs = False  # the reference attention reads host-side lengths

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_and_store_kv(
        self,
        positions: torch.Tensor,  # [num_tokens]
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        cos: torch.Tensor,  # [max_positions, head_dim] float32
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """Rotate q and k, write k and v into their cache slots; returns the rotated q."""
        c = cos[positions].unsqueeze(1).to(q.dtype)  # [num_tokens, 1, head_dim]
        s = sin[positions].unsqueeze(1).to(q.dtype)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        store_kv(k, v, kv_cache, slot_mapping)
        return q

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if meta.phase == "decode":
            return decode_attention(q, kv_cache, meta, scale)
        return prefill_attention(q, kv_cache, meta, scale)


ModelOps = TorchOps  # the interface: the Triton set subclasses it and overrides what it accelerates


def select_ops(device: torch.device, kernels: str = "auto") -> ModelOps:
    """`auto`: the Triton kernels on CUDA when Triton is importable, the torch reference elsewhere.
    `triton` forces the kernels (on CPU they need TRITON_INTERPRET=1); `torch` forces the reference."""
    if kernels == "torch" or (kernels == "auto" and device.type != "cuda"):
        return TorchOps()
    try:
        from splitserve.engine.triton_ops import TritonOps
    except ImportError:
        if kernels == "triton":
            raise
        return TorchOps()
    return TritonOps()
