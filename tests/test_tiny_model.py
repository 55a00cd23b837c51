"""`splitserve.tiny_model` and `splitserve make-tiny-model`: the checkpoints load in Hugging Face
transformers with exactly the expected parameters, the tokenizer round-trips any text and formats ChatML,
builds are byte-identical per seed, random models give non-degenerate greedy outputs, bad specs fail."""

from __future__ import annotations

import argparse
import json
import random
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitserve.cli import make_tiny_model as make_tiny_model_cli
from splitserve.tiny_model import TinyModelSpec, hf_config, make_tiny_model, summarize_checkpoint
from splitserve.tiny_tokenizer import CHAT_TEMPLATE, train_tokenizer

VARIANTS = [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 32}),
    ("llama", {"head_dim": 8}),
]
VARIANT_IDS = ["llama", "qwen2", "qwen3", "llama-tied", "qwen3-head_dim32", "llama-head_dim8"]
TEXTS = [
    "Hello, world!",
    "  leading spaces, trailing tabs\t\t\n\nand a blank line",
    "Crème brûlée, naïve café, Zürich, Kraków, São Paulo",
    "日本語のテキストと한국어 그리고 русский текст",
    "emoji: 🙂👍🏽🧑‍🍳 🇵🇹 and math ∑∫√∞ ≠ ≤",
    "control \x00\x01\x7f bytes and \r\n line ends",
    'def f(x):\n    return {"a": [1, 2.5e-3]}  # comment',
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
]


@cache
def load_hf(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


def expected_shapes(spec: TinyModelSpec, vocab: int) -> dict[str, tuple[int, ...]]:
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.resolved_head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            f"{p}input_layernorm.weight": (h,),
            f"{p}post_attention_layernorm.weight": (h,),
            f"{p}self_attn.q_proj.weight": (q, h),
            f"{p}self_attn.k_proj.weight": (kv, h),
            f"{p}self_attn.v_proj.weight": (kv, h),
            f"{p}self_attn.o_proj.weight": (h, q),
            f"{p}mlp.gate_proj.weight": (i, h),
            f"{p}mlp.up_proj.weight": (i, h),
            f"{p}mlp.down_proj.weight": (h, i),
        }
        if spec.arch == "qwen2":
            shapes |= {f"{p}self_attn.q_proj.bias": (q,), f"{p}self_attn.k_proj.bias": (kv,)}
            shapes |= {f"{p}self_attn.v_proj.bias": (kv,)}
        if spec.arch == "qwen3":
            shapes |= {f"{p}self_attn.q_norm.weight": (d,), f"{p}self_attn.k_norm.weight": (d,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


@pytest.mark.parametrize(("arch", "overrides"), VARIANTS, ids=VARIANT_IDS)
def test_checkpoint_has_hf_names_and_loads_without_missing_keys(tiny_model, arch, overrides):
    path = tiny_model(arch, **overrides)
    spec = TinyModelSpec(arch=arch, **overrides)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    assert safetensors_shapes(path) == expected_shapes(spec, vocab)

    model, info = load_hf(path)
    assert {k: v for k, v in info.items() if v} == {}
    hf_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if spec.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        hf_shapes.pop("lm_head.weight", None)
    assert hf_shapes == expected_shapes(spec, vocab)
    assert model.config.num_hidden_layers == spec.num_layers
    assert model.model.layers[0].self_attn.head_dim == spec.resolved_head_dim


def test_config_is_classic_on_disk_format(tiny_model):
    llama = json.loads((tiny_model("llama") / "config.json").read_text())
    assert llama["architectures"] == ["LlamaForCausalLM"]
    assert "rope_parameters" not in llama
    assert llama["rope_theta"] == 10000.0
    assert llama["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    }
    assert llama["attention_bias"] is False and llama["mlp_bias"] is False
    assert llama["torch_dtype"] == llama["dtype"] == "float32"
    for arch, cls in (("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")):
        config = json.loads((tiny_model(arch) / "config.json").read_text())
        assert config["architectures"] == [cls] and config["model_type"] == arch
        assert config["rope_scaling"] is None and config["sliding_window"] is None
        assert config["use_sliding_window"] is False
    qwen3 = json.loads((tiny_model("qwen3", head_dim=32) / "config.json").read_text())
    assert qwen3["head_dim"] == 32 and qwen3["hidden_size"] == 64


def test_tokenizer_ids_and_generation_config(tiny_model):
    path = tiny_model("llama")
    tok = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    gen = json.loads((path / "generation_config.json").read_text())
    endoftext, im_start, im_end = (
        tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    )
    assert len(tok) == config["vocab_size"] == 512
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|endoftext|>"
    assert config["bos_token_id"] == endoftext and config["eos_token_id"] == im_end
    assert gen["eos_token_id"] == [im_end, endoftext]
    assert len({endoftext, im_start, im_end}) == 3
    # Qwen style: no BOS is prepended.
    assert tok("Hello").input_ids == tok.encode("Hello", add_special_tokens=False)
    assert tok("Hello").input_ids[0] != endoftext
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((path / name).read_text())["eos_token"] == "<|im_end|>"


def test_tokenizer_round_trips_any_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    rng = random.Random(0)
    random_texts = ["".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(50)) for _ in range(20)]
    for text in TEXTS + [t for t in random_texts if not any(0xD800 <= ord(c) <= 0xDFFF for c in t)]:
        ids = tok.encode(text, add_special_tokens=False)
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids) == text
    special = tok.encode("<|im_start|>x<|im_end|>", add_special_tokens=False)
    assert special[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_chat_template_is_chatml(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    config = json.loads((tiny_model("qwen2") / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    spec = TinyModelSpec(arch="qwen2", dtype="bfloat16")
    first, second = make_tiny_model(tmp_path / "a", spec), make_tiny_model(tmp_path / "b", spec)
    other = make_tiny_model(tmp_path / "c", TinyModelSpec(arch="qwen2", dtype="bfloat16", seed=1))
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(("arch", "overrides"), VARIANTS[:4], ids=VARIANT_IDS[:4])
def test_random_model_greedy_output_is_not_degenerate(tiny_model, arch, overrides):
    path = tiny_model(arch, **overrides)
    model, _ = load_hf(path)
    tok = AutoTokenizer.from_pretrained(path)
    outputs, gaps = [], []
    for prompt in ("The weather in Lisbon", "def add(a, b):", "Q: How long should I boil an egg?\nA:"):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=30,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tok.pad_token_id,
            )
            top2 = model(out).logits[0].topk(2, dim=-1).values
        new = out[0, ids.shape[1] :].tolist()
        assert len(set(new)) >= 5, new
        outputs.append(new)
        gaps += (top2[:, 0] - top2[:, 1]).tolist()
    assert len({tuple(o) for o in outputs}) == len(outputs)
    gaps_t = torch.tensor(gaps)
    assert gaps_t.median() > 0.1
    assert (gaps_t < 1e-4).float().mean() < 0.02


def test_padded_vocab_and_bfloat16(tmp_path):
    path = make_tiny_model(tmp_path, TinyModelSpec(arch="qwen3", vocab_size=600, dtype="bfloat16"))
    summary = summarize_checkpoint(path)
    assert (summary.vocab_size, summary.tokenizer_size, summary.arch) == (600, 512, "qwen3")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert embed.shape == (600, 64)
    # Padding rows stay random but small, so greedy decoding keeps to ids the tokenizer can decode.
    assert 0 < embed[512:].float().std() < embed[:512].float().std() / 5
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_llama_3_2_1b_preset():
    spec = TinyModelSpec.llama_3_2_1b_shape()
    config = hf_config(spec, vocab_size=spec.vocab_size, bos_token_id=0, eos_token_id=2)
    expected = {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert TinyModelSpec.llama_3_2_1b_shape(num_layers=2, dtype="float32").num_layers == 2
    with pytest.raises(ValueError, match="unknown TinyModelSpec fields"):
        TinyModelSpec.llama_3_2_1b_shape(layers=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"arch": "gpt2"}, "arch must be one of"),
        ({"hidden_size": 0}, "hidden_size must be >= 1"),
        ({"num_layers": 1.5}, "num_layers must be an integer"),
        ({"num_heads": 4, "num_kv_heads": 3}, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
        ({"hidden_size": 66, "num_heads": 4}, "must be divisible by num_heads"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"arch": "qwen2", "head_dim": 32}, "qwen2 cannot express head_dim=32"),
        ({"vocab_size": 100}, "vocab_size must be at least 259"),
        ({"tokenizer_vocab_size": 200}, "tokenizer_vocab_size must be >= 259"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"rope_theta": 0.0}, "rope_theta must be a positive finite number"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive finite number"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"max_position_embeddings": 2}, "original_max_position_embeddings"),
        ({"rope_scaling_factor": 0.5}, "rope_scaling_factor must be >= 1.0"),
    ],
)
def test_bad_specs_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        TinyModelSpec(**overrides)


def test_vocab_smaller_than_tokenizer_fails_before_writing(tmp_path):
    with pytest.raises(
        ValueError, match=r"vocab_size \(300\) must be >= the trained tokenizer's size \(512\)"
    ):
        make_tiny_model(tmp_path / "out", TinyModelSpec(vocab_size=300))
    assert not (tmp_path / "out").exists()
    assert train_tokenizer(300).get_vocab_size() == 300


def test_cli_writes_checkpoint(tmp_path, capsys):
    from splitserve.cli import main

    out = tmp_path / "cli"
    argv = ["make-tiny-model", str(out), "--arch", "qwen3", "--num-layers", "1", "--head-dim", "32"]
    assert main([*argv, "--tie-word-embeddings", "--dtype", "bfloat16", "--seed", "7"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(out)) and "arch=qwen3" in line and "tokenizer_size=512" in line
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["head_dim"], config["tie_word_embeddings"]) == (1, 32, True)
    assert config["torch_dtype"] == "bfloat16"
    assert f"parameters={summarize_checkpoint(out).num_parameters:,}" in line


def test_cli_flags_map_onto_the_spec(tmp_path):
    parser = argparse.ArgumentParser()
    make_tiny_model_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["make-tiny-model", str(tmp_path), "--shape", "llama-3.2-1b", "--no-tie-word-embeddings"]
    )
    assert args.shape == "llama-3.2-1b" and args.tie_word_embeddings is False and args.hidden_size is None
    assert args.handler.__name__ == "_run"


def test_cli_reports_bad_spec_as_error(tmp_path, capsys):
    from splitserve.cli import main

    assert main(["make-tiny-model", str(tmp_path / "bad"), "--num-heads", "4", "--num-kv-heads", "3"]) == 2
    assert "must be a multiple of num_kv_heads" in capsys.readouterr().err
