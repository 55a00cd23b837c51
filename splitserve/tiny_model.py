"""Random-weight Hugging Face checkpoints with a real trained tokenizer, for tests and benchmarks.

This module owns `TinyModelSpec` (the shape of a checkpoint), the byte-level BPE tokenizer trained on
`splitserve/assets/tokenizer_corpus.txt`, the deterministic random weights, and the on-disk layout that
`make_tiny_model` writes: `config.json` in the classic format real checkpoints use, `generation_config.json`,
`model.safetensors` with Hugging Face parameter names, and the tokenizer files. The same spec always gives
byte-identical files, so tests and benchmarks can compare outputs across runs and machines.

It needs torch, safetensors and tokenizers, but not transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from splitserve.tiny_tokenizer import (
    ENDOFTEXT,
    IM_END,
    NUM_BYTE_TOKENS,
    SPECIAL_TOKENS,
    special_token_ids,
    train_tokenizer,
    write_json,
    write_tokenizer_files,
)

Arch = Literal["llama", "qwen2", "qwen3"]
DType = Literal["float32", "bfloat16", "float16"]

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Init scales, chosen so that a random model is not degenerate (see `random_weights`).
_LOGIT_STD = 3.0  # std of the logits, tied or not
_Q_GAIN = 2.0  # sharper attention, so that the context changes the output
_OUT_GAIN = 2.5  # o_proj/down_proj: blocks dominate the residual over the embedding
_NORM_NOISE = 0.1
_BIAS_STD = 0.1
_PADDING_ROW_SCALE = 0.1


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of a random checkpoint. Defaults give a ~140k-parameter model that loads in milliseconds."""

    arch: Arch = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    # None: hidden_size // num_heads. Llama and Qwen3 may use any even value; Qwen2 has no such field.
    head_dim: int | None = None
    # None: exactly the trained tokenizer's size. Larger: the extra rows are ids no text encodes to.
    vocab_size: int | None = None
    tokenizer_vocab_size: int = 512
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # Llama only; Qwen2/Qwen3 checkpoints get "rope_scaling": null.
    rope_llama3_scaling: bool = True
    rope_scaling_factor: float = 8.0
    # None: max_position_embeddings // 4.
    rope_original_max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    dtype: DType = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in get_args(Arch):
            raise ValueError(f"arch must be one of {get_args(Arch)}, got {self.arch!r}")
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_TORCH_DTYPES)}, got {self.dtype!r}")
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        ):
            _require_int(name, getattr(self, name), minimum=1)
        for name in ("head_dim", "vocab_size", "rope_original_max_position_embeddings"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1)
        _require_int(
            "tokenizer_vocab_size", self.tokenizer_vocab_size, minimum=NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)
        )
        _require_int("seed", self.seed, minimum=0)
        if self.seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {self.seed}")
        self._validate_heads()
        self._validate_floats()
        if self.vocab_size is not None and self.vocab_size < NUM_BYTE_TOKENS + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must be at least {NUM_BYTE_TOKENS + len(SPECIAL_TOKENS)} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {self.vocab_size}"
            )

    def _validate_heads(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}) "
                "when head_dim is not given"
            )
        if self.resolved_head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.resolved_head_dim}")
        # Qwen2 configs have no head_dim field: every loader derives it from hidden_size / num_heads.
        if (
            self.arch == "qwen2"
            and self.head_dim is not None
            and self.head_dim * self.num_heads != self.hidden_size
        ):
            raise ValueError(
                f"qwen2 cannot express head_dim={self.head_dim} != hidden_size // num_heads "
                f"({self.hidden_size // self.num_heads}); use arch 'llama' or 'qwen3'"
            )

    def _validate_floats(self) -> None:
        for name in ("rope_theta", "rms_norm_eps"):
            _require_finite(name, getattr(self, name))
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)!r}")
        if self.uses_llama3_scaling:
            _require_finite("rope_scaling_factor", self.rope_scaling_factor)
            if not self.rope_scaling_factor >= 1.0:
                raise ValueError(f"rope_scaling_factor must be >= 1.0, got {self.rope_scaling_factor!r}")
            original = self.resolved_rope_original_max_position_embeddings
            if not 1 <= original <= self.max_position_embeddings:
                raise ValueError(
                    f"llama3 rope scaling needs 1 <= original_max_position_embeddings ({original}) <= "
                    f"max_position_embeddings ({self.max_position_embeddings}); "
                    "raise max_position_embeddings or turn rope_llama3_scaling off"
                )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def uses_llama3_scaling(self) -> bool:
        return self.arch == "llama" and self.rope_llama3_scaling

    @property
    def resolved_rope_original_max_position_embeddings(self) -> int:
        if self.rope_original_max_position_embeddings is not None:
            return self.rope_original_max_position_embeddings
        return self.max_position_embeddings // 4

    @classmethod
    def llama_3_2_1b_shape(cls, **overrides: Any) -> TinyModelSpec:
        """The exact shape of meta-llama/Llama-3.2-1B (1.24B parameters, 2.5 GB in bfloat16)."""
        shape: dict[str, Any] = {
            "arch": "llama",
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_layers": 16,
            "num_heads": 32,
            "num_kv_heads": 8,
            "head_dim": 64,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_llama3_scaling": True,
            "rope_scaling_factor": 32.0,
            "rope_original_max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5,
            "dtype": "bfloat16",
        }
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TinyModelSpec fields: {sorted(unknown)}")
        return cls(**(shape | overrides))


@dataclass(frozen=True)
class TinyModelSummary:
    """What a written checkpoint holds, read back from its files."""

    path: Path
    arch: str
    num_parameters: int
    vocab_size: int
    tokenizer_size: int


def _require_int(name: str, value: object, *, minimum: int) -> None:
    # bool is an int subclass; True as a layer count is a caller bug, not a shape.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _require_finite(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def random_weights(
    spec: TinyModelSpec, vocab_size: int, *, used_vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic random weights under Hugging Face names, drawn in float32 then cast to spec.dtype.

    Scales keep a random model from being degenerate: the logits have std ~3 (clear top-1 gaps), and
    the attention and MLP outputs outweigh the embedding in the residual stream, so that the next token
    depends on the context rather than echoing the last token (which a tied lm_head would otherwise do).
    Rows from used_vocab_size on (padding ids no text encodes to) are scaled down so greedy decoding
    stays within the tokenizer's ids.
    """
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    hidden = spec.hidden_size
    # Small embeddings: tied, they are the lm_head and set the logit scale; untied, the first
    # input_layernorm rescales them anyway.
    embed_std = _LOGIT_STD / math.sqrt(hidden)
    dtype = _TORCH_DTYPES[spec.dtype]
    # Cast as we go: holding every tensor in float32 first would double peak memory for large shapes.
    embed = _shrink_padding_rows(_normal(gen, (vocab_size, hidden), embed_std), used_vocab_size)
    weights = _cast({"model.embed_tokens.weight": embed}, dtype)
    for layer in range(spec.num_layers):
        weights |= _cast(_layer_weights(spec, gen, f"model.layers.{layer}."), dtype)
    weights |= _cast({"model.norm.weight": _norm_weight(gen, hidden)}, dtype)
    if not spec.tie_word_embeddings:
        lm_head = _normal(gen, (vocab_size, hidden), _LOGIT_STD / math.sqrt(hidden))
        lm_head = _shrink_padding_rows(lm_head, used_vocab_size)
        weights |= _cast({"lm_head.weight": lm_head}, dtype)
    return weights


def _layer_weights(spec: TinyModelSpec, gen: torch.Generator, prefix: str) -> dict[str, torch.Tensor]:
    hidden, inter, head_dim = spec.hidden_size, spec.intermediate_size, spec.resolved_head_dim
    q_out, kv_out = spec.num_heads * head_dim, spec.num_kv_heads * head_dim
    w = {f"{prefix}input_layernorm.weight": _norm_weight(gen, hidden)}
    attn = f"{prefix}self_attn."
    w[f"{attn}q_proj.weight"] = _normal(gen, (q_out, hidden), _Q_GAIN / math.sqrt(hidden))
    w[f"{attn}k_proj.weight"] = _normal(gen, (kv_out, hidden), 1 / math.sqrt(hidden))
    w[f"{attn}v_proj.weight"] = _normal(gen, (kv_out, hidden), 1 / math.sqrt(hidden))
    w[f"{attn}o_proj.weight"] = _normal(gen, (hidden, q_out), _OUT_GAIN / math.sqrt(q_out))
    if spec.arch == "qwen2":
        for proj, size in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            w[f"{attn}{proj}.bias"] = _normal(gen, (size,), _BIAS_STD)
    if spec.arch == "qwen3":
        w[f"{attn}q_norm.weight"] = _norm_weight(gen, head_dim)
        w[f"{attn}k_norm.weight"] = _norm_weight(gen, head_dim)
    w[f"{prefix}post_attention_layernorm.weight"] = _norm_weight(gen, hidden)
    w[f"{prefix}mlp.gate_proj.weight"] = _normal(gen, (inter, hidden), 1 / math.sqrt(hidden))
    w[f"{prefix}mlp.up_proj.weight"] = _normal(gen, (inter, hidden), 1 / math.sqrt(hidden))
    w[f"{prefix}mlp.down_proj.weight"] = _normal(gen, (hidden, inter), _OUT_GAIN / math.sqrt(inter))
    return w


def _cast(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: tensor.to(dtype).contiguous() for name, tensor in weights.items()}


def _shrink_padding_rows(matrix: torch.Tensor, used_vocab_size: int | None) -> torch.Tensor:
    # Still random (a loader that mixes up rows stays detectable), but their logits rarely win.
    if used_vocab_size is not None:
        matrix[used_vocab_size:] *= _PADDING_ROW_SCALE
    return matrix


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _norm_weight(gen: torch.Generator, size: int) -> torch.Tensor:
    # Not exactly 1, so that a loader that skips a norm weight gives visibly different outputs.
    return 1.0 + _normal(gen, (size,), _NORM_NOISE)


def hf_config(
    spec: TinyModelSpec, *, vocab_size: int, bos_token_id: int, eos_token_id: int
) -> dict[str, Any]:
    """config.json in the classic format of real checkpoints (rope_theta + rope_scaling, torch_dtype)."""
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[spec.arch]],
        "model_type": spec.arch,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": _rope_scaling(spec),
        "rope_theta": float(spec.rope_theta),
        "tie_word_embeddings": spec.tie_word_embeddings,
        # Both spellings: older readers know torch_dtype, transformers >= 4.56 writes dtype.
        "torch_dtype": spec.dtype,
        "dtype": spec.dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    if spec.arch == "llama":
        config |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": spec.num_layers}
    if spec.arch == "qwen3":
        config["attention_bias"] = False
    if spec.arch != "qwen2":  # Qwen2 configs have no head_dim field (see TinyModelSpec._validate_heads)
        config["head_dim"] = spec.resolved_head_dim
    return config


def _rope_scaling(spec: TinyModelSpec) -> dict[str, Any] | None:
    if not spec.uses_llama3_scaling:
        return None
    return {
        "rope_type": "llama3",
        "factor": float(spec.rope_scaling_factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": spec.resolved_rope_original_max_position_embeddings,
    }


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec) -> Path:
    """Write a random-weight checkpoint for `spec` into out_dir (created if needed) and return its path.

    Files it writes are overwritten; other files in out_dir are left alone. Nothing is written when the
    spec turns out to be invalid (vocab_size smaller than the trained tokenizer).
    """
    tokenizer = train_tokenizer(spec.tokenizer_vocab_size)
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = spec.vocab_size if spec.vocab_size is not None else tokenizer_size
    if vocab_size < tokenizer_size:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be >= the trained tokenizer's size ({tokenizer_size}); "
            "lower tokenizer_vocab_size or leave vocab_size unset"
        )
    ids = special_token_ids(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(spec, vocab_size=vocab_size, bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END])
    write_json(out / "config.json", config)
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids[ENDOFTEXT],
            # The chat turn ends at <|im_end|>; raw completions end at <|endoftext|>.
            "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
            "pad_token_id": ids[ENDOFTEXT],
        },
    )
    weights = random_weights(spec, vocab_size, used_vocab_size=tokenizer_size)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(out, tokenizer, ids, model_max_length=spec.max_position_embeddings)
    return out


def summarize_checkpoint(model_dir: str | Path) -> TinyModelSummary:
    """Read back what a checkpoint directory holds, without loading the weights."""
    path = Path(model_dir)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    num_parameters = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            num_parameters += math.prod(f.get_slice(name).get_shape())
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return TinyModelSummary(
        path=path,
        arch=config["model_type"],
        num_parameters=num_parameters,
        vocab_size=config["vocab_size"],
        tokenizer_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )
