"""Bad input gets a clear, typed error at the boundary and leaves the engine serving other requests."""

from __future__ import annotations

import json
import shutil

import pytest

from splitserve import LLM, SamplingParams
from splitserve.engine.errors import CheckpointError, InvalidRequest, UnsupportedModel


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("llama")), num_blocks=64, max_model_len=256)


def test_empty_prompt(llm):
    with pytest.raises(InvalidRequest, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(InvalidRequest, match="empty"):
        llm.generate("")


def test_prompt_longer_than_the_context(llm):
    with pytest.raises(InvalidRequest, match="context is 256 tokens"):
        llm.generate({"prompt_token_ids": [5] * 256})


def test_request_larger_than_the_kv_cache(llm):
    # 63 usable blocks of 16 tokens hold 1008 tokens; max_model_len caps at 256, so this fits ...
    llm.generate({"prompt_token_ids": [5] * 200}, SamplingParams(max_tokens=2000, temperature=0))
    small = LLM(llm.config.model, num_blocks=5, block_size=16)
    with pytest.raises(InvalidRequest, match="KV cache"):
        small.generate({"prompt_token_ids": [5] * 60}, SamplingParams(max_tokens=10))


def test_token_ids_outside_the_vocabulary(llm):
    vocab = llm.engine.model_config.vocab_size
    for bad in ([vocab], [-1], [1.5]):
        with pytest.raises(InvalidRequest, match="prompt token ids"):
            llm.generate({"prompt_token_ids": bad})


def test_a_bad_request_in_a_batch_runs_nothing_and_leaks_nothing(llm):
    pool = llm.engine.block_pool
    with pytest.raises(InvalidRequest):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": []}])
    assert not llm.engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_usable_blocks
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=3, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 3


def test_mismatched_sampling_params_and_options(llm, tiny_model):
    with pytest.raises(InvalidRequest, match="2 sampling params for 1 prompts"):
        llm.generate("hi", [SamplingParams(), SamplingParams()])
    with pytest.raises(InvalidRequest, match="prompt_token_ids"):
        llm.generate({"tokens": [1]})
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM(str(tiny_model("llama")), gpu_count=3)
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(tiny_model("llama")), block_size=7)


def test_unknown_architecture(tiny_model, tmp_path):
    path = tmp_path / "gpt2"
    shutil.copytree(tiny_model("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    supported = "supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    with pytest.raises(UnsupportedModel, match=supported):
        LLM(str(path))


def test_unsupported_rope_scaling(tiny_model, tmp_path):
    path = tmp_path / "yarn"
    shutil.copytree(tiny_model("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="yarn"):
        LLM(str(path))


@pytest.mark.parametrize(
    "missing, message",
    [("config.json", "missing config.json"), ("model.safetensors", "no \\*.safetensors"),
     ("tokenizer.json", "no tokenizer files")],
)
def test_missing_files(tiny_model, tmp_path, missing, message):
    path = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), path)
    (path / missing).unlink()
    if missing == "tokenizer.json":
        (path / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=message):
        LLM(str(path))


def test_wrong_tensor_shapes_and_missing_tensors(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:3]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*shape"):
        LLM(str(path))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks tensors for: layers\.0\.mlp\.gate_up_proj\.weight"):
        LLM(str(path))


def test_nonexistent_directory():
    with pytest.raises(CheckpointError, match="/nonexistent/model/dir does not exist"):
        LLM("/nonexistent/model/dir")
