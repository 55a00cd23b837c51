"""Loading Hugging Face safetensors weights into `DecoderLM`, packing Q/K/V and gate/up.

Owns the mapping from checkpoint tensor names to model parameters and the check that every parameter
was filled exactly once with the right shape. Raises `CheckpointError` for missing files, unknown or
missing tensors and shape mismatches. Never unpickles anything (safetensors only).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from splitserve.engine.errors import CheckpointError
from splitserve.engine.model import DecoderLM
from splitserve.engine.model_config import ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Target(NamedTuple):
    """Where a checkpoint tensor goes: a parameter, and the row range of it (packed projections)."""

    param: str
    row_start: int
    num_rows: int | None  # None: the whole parameter


def _packed_targets(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    inter = cfg.intermediate_size
    return {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, cfg.q_size),
        "self_attn.k_proj": ("self_attn.qkv_proj", cfg.q_size, cfg.kv_size),
        "self_attn.v_proj": ("self_attn.qkv_proj", cfg.q_size + cfg.kv_size, cfg.kv_size),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
        "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
    }


def target_of(name: str, cfg: ModelConfig) -> Target | None:
    """The model target of a checkpoint tensor name; None for tensors the model does not use."""
    if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
        return None
    name = name.removeprefix("model.")
    for hf_part, (ours, start, rows) in _packed_targets(cfg).items():
        marker = f".{hf_part}."
        if marker in name:
            prefix, suffix = name.split(marker)
            return Target(f"{prefix}.{ours}.{suffix}", start, rows)
    return Target(name, 0, None)


def load_weights(model: DecoderLM, path: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint's safetensors files (cast to its dtype)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weight files in {path}")
    params = dict(model.named_parameters())
    filled: dict[str, int] = dict.fromkeys(params, 0)  # rows filled per parameter
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                target = target_of(name, model.cfg)
                if target is None:
                    continue
                if target.param not in params:
                    raise CheckpointError(f"{file.name}: unexpected tensor {name!r} for {model.cfg.family}")
                _copy_into(params[target.param], target, f.get_tensor(name), name)
                filled[target.param] += target.num_rows or params[target.param].shape[0]
    missing = [n for n, rows in filled.items() if rows != params[n].shape[0]]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors for: {', '.join(missing[:8])}")


def _copy_into(param: torch.nn.Parameter, target: Target, tensor: torch.Tensor, name: str) -> None:
    dest = param.data if target.num_rows is None else param.data.narrow(0, target.row_start, target.num_rows)
    if tuple(tensor.shape) != tuple(dest.shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dest.shape)}"
        )
    dest.copy_(tensor)
