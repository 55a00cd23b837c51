"""The architecture of a Hugging Face checkpoint, parsed from its config.json. Torch-free.

Owns what the engine supports (Llama 3.x, Qwen2, Qwen3 decoders) and refuses everything else with an
`UnsupportedModel` that names what is supported. It does not load weights (`checkpoint` does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from splitserve.engine.errors import CheckpointError, UnsupportedModel

Family = Literal["llama", "qwen2", "qwen3"]

SUPPORTED_ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (`rope_type: llama3`); the only scaling supported."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    family: Family
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: RopeScaling | None
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    torch_dtype: str
    eos_token_ids: frozenset[int]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModel(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model directory {path} does not exist")
        raw = read_json(path / "config.json")
        return cls.from_dict(raw, _generation_eos(path))

    @classmethod
    def from_dict(cls, raw: dict, extra_eos: frozenset[int] = frozenset()) -> ModelConfig:
        family = _family(raw)
        _refuse_unsupported_options(raw, family)
        num_heads = _get(raw, "num_attention_heads", int)
        hidden = _get(raw, "hidden_size", int)
        rope_theta, rope_scaling = _rope(raw)
        return cls(
            family=family,
            hidden_size=hidden,
            intermediate_size=_get(raw, "intermediate_size", int),
            num_layers=_get(raw, "num_hidden_layers", int),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            vocab_size=_get(raw, "vocab_size", int),
            max_position_embeddings=_get(raw, "max_position_embeddings", int),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(raw.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            # generation_config.json's EOS list wins, as in transformers' generate
            eos_token_ids=extra_eos or _ids(raw.get("eos_token_id")),
        )


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in checkpoint directory {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def checkpoint_identity(path: str | Path) -> str:
    """A model identity for block hashes: the config plus the size, head and tail of each weight file.

    Two workers loading copies of one checkpoint agree; different weights under one config differ
    (random weights differ in every byte) without hashing gigabytes."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(weights.name.encode() + size.to_bytes(8, "little"))
        with weights.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return f"{path.name}@{digest.hexdigest()[:24]}"


def _family(raw: dict) -> Family:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    name = archs or raw.get("model_type")
    raise UnsupportedModel(f"unsupported architecture {name!r}; supported: {supported}")


def _refuse_unsupported_options(raw: dict, family: Family) -> None:
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise UnsupportedModel("mlp_bias=true is not supported")
    if family != "llama" and raw.get("use_sliding_window"):
        raise UnsupportedModel("sliding-window attention (use_sliding_window=true) is not supported")


def _rope(raw: dict) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older checkpoints write rope_theta + rope_scaling.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModel(f"rope scaling {rope_type!r} is not supported (only default and llama3)")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _get(raw: dict, key: str, kind: type) -> int:
    if key not in raw:
        raise CheckpointError(f"config.json lacks {key!r}")
    value = kind(raw[key])
    if value <= 0:
        raise CheckpointError(f"config.json has {key}={raw[key]!r}; it must be positive")
    return value


def _ids(value: int | list[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)


def _generation_eos(path: Path) -> frozenset[int]:
    gen = path / "generation_config.json"
    return _ids(read_json(gen).get("eos_token_id")) if gen.is_file() else frozenset()
