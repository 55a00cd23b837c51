"""The decoder-only transformer for the Llama 3.x, Qwen2 and Qwen3 families, over a paged KV cache.

One implementation: the families differ only in options read from `ModelConfig` (qkv bias, q/k norm,
head_dim). Q/K/V and gate/up projections are packed into one matrix each (the checkpoint loader packs
them). Each norm is one `ModelOps` call together with the projection after it (and the MLP's activation),
so the ops can fuse them; per layer: add+norm+qkv, q/k norm, RoPE + KV write, attention, o_proj,
add+norm+gate_up+SiLU-and-mul, down_proj. The model takes flat token batches and explicit attention
metadata; it holds no per-request state and knows nothing about scheduling, sampling or tokenization.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.engine.attention import AttentionMetadata
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.ops import ModelOps
from splitserve.engine.rotary import RotaryEmbedding


def _empty(*shape: int) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by the checkpoint loader, which checks coverage.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, ops: ModelOps) -> None:
        super().__init__()
        self.weight = _empty(out_features, in_features)
        self.bias = _empty(out_features) if bias else None
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = _empty(num_embeddings, embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: ModelOps) -> None:
        super().__init__()
        self.weight = _empty(size)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add then norm: returns (norm(x + residual), x + residual)."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def add_forward_linear(
        self, x: torch.Tensor, residual: torch.Tensor | None, linear: Linear
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear(norm(x + residual)), x + residual); residual None (the first layer) adds nothing."""
        return self.ops.add_norm_linear(x, residual, self.weight, self.eps, linear.weight, linear.bias)

    def add_forward_gate_up_silu(
        self, x: torch.Tensor, residual: torch.Tensor, gate_up: Linear
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(silu_and_mul(gate_up(norm(x + residual))), x + residual)."""
        return self.ops.add_norm_gate_up_silu(x, residual, self.weight, self.eps, gate_up.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, ops: ModelOps) -> None:
        super().__init__()
        self.cfg = cfg
        self.rotary = rotary
        self.ops = ops
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias, ops=ops)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias, ops=ops)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden_size], the last sublayer's output
        residual: torch.Tensor | None,
        norm: RMSNorm,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """norm(x + residual) → qkv → attention → o_proj; returns (output, x + residual). The norm is
        fused with the qkv projection."""
        cfg = self.cfg
        num_tokens = x.shape[0]
        qkv, residual = norm.add_forward_linear(x, residual, self.qkv_proj)  # [num_tokens, q + 2 * kv size]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(num_tokens, cfg.num_heads, cfg.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.ops.rope_and_store_kv(
            positions, q, k, v, self.rotary.cos, self.rotary.sin, kv_cache, meta.slot_mapping
        )
        o = self.ops.attention(q, kv_cache, meta, self.scale)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(o.reshape(num_tokens, cfg.q_size)), residual


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModelOps) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, ops=ops)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, ops=ops)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """norm(x + residual) → gate_up → SiLU-and-mul → down_proj; returns (output, x + residual). The
        norm, the gate/up projection and the activation are one fused call."""
        act, residual = norm.add_forward_gate_up_silu(x, residual, self.gate_up_proj)  # [num_tokens, inter]
        return self.down_proj(act), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, ops: ModelOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, rotary, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, residual, positions, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """(sublayer output, residual stream); residual None on the first layer (x is the embeddings)."""
        x, residual = self.self_attn(x, residual, self.input_layernorm, positions, kv_cache, meta)
        return self.mlp(x, residual, self.post_attention_layernorm)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, ops: ModelOps) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.rotary = rotary
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        tied = cfg.tie_word_embeddings
        self.lm_head = None if tied else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, ops=ops)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        layer_done: Callable[[int], None] | None = None,  # after each layer: its KV is written
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, residual = layer(x, residual, positions, kv_cache, meta)
            if layer_done is not None:
                layer_done(i)
        x, _ = self.norm.add_forward(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden_size] → [num_rows, vocab_size] in the model's dtype."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)
