"""The model's swappable operations: norms, projections (alone or fused with the norm before them and the
activation after them), activation, RoPE + KV write, attention.

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

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the first layer: the embeddings are the residual stream
            return self.rms_norm(x, weight, eps), x
        return self.add_rms_norm(x, residual, weight, eps)

    def add_norm_linear(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,  # [out_features, hidden_size]
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear(norm(x + residual)), x + residual); with residual None, (linear(norm(x)), x).
        May consume x and residual as `add_rms_norm` does; the caller keeps only the returned tensors."""
        normed, residual = self._add_norm(x, residual, norm_weight, eps)
        return self.linear(normed, weight, bias), residual

    def add_norm_gate_up_silu(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size]
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        gate_up_weight: torch.Tensor,  # [2 * intermediate_size, hidden_size], gate rows first
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(silu_and_mul(linear(norm(x + residual))), x + residual), residual as in `add_norm_linear`."""
        normed, residual = self._add_norm(x, residual, norm_weight, eps)
        return self.silu_and_mul(self.linear(normed, gate_up_weight, None)), residual

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


def select_ops(device: torch.device, kernels: str = "auto", fused_gemv_max_tokens: int = 0) -> ModelOps:
    """`auto`: the Triton kernels on CUDA when Triton is importable, the torch reference elsewhere.
    `triton` forces the kernels (on CPU they need TRITON_INTERPRET=1); `torch` forces the reference.
    `fused_gemv_max_tokens`: see `TritonOps`."""
    if kernels == "torch" or (kernels == "auto" and device.type != "cuda"):
        return TorchOps()
    try:
        from splitserve.engine.triton_ops import TritonOps
        from splitserve.kernels.gemv import pdl_supported
    except ImportError:
        if kernels == "triton":
            raise
        return TorchOps()
    return TritonOps(fused_gemv_max_tokens=fused_gemv_max_tokens, pdl=pdl_supported(device))
