"""Greedy tokens of the engine equal Hugging Face transformers `generate` on the same checkpoint (float32,
CPU): single prompts, mixed-length batches with chunked prefill on and off, prefix-cache hits, preemption."""

from __future__ import annotations

import random
from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitserve import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3"]
MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


@cache
def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path, prompt_ids: list[int], max_new_tokens: int = MAX_NEW) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = hf_model(str(path)).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def random_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def generated(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ARCHS)
def test_text_prompts_match_hf(tiny_model, arch):
    path = tiny_model(arch)
    llm = LLM(str(path), num_blocks=256)
    texts = ["The weather in the mountains", "Hello!", "def add(a, b):\n    return"]
    for text, out in zip(texts, llm.generate(texts, GREEDY), strict=True):
        assert out.prompt_token_ids == llm.tokenizer.encode(text)
        assert out.outputs[0].token_ids == hf_greedy(path, out.prompt_token_ids)
        assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunked", [True, False])
def test_mixed_length_batch_matches_hf(tiny_model, arch, chunked):
    path = tiny_model(arch)
    # A 16-token budget splits the long prompts into chunks that share steps with other sequences'
    # decodes; without chunking the budget must hold the longest prompt.
    budget = 16 if chunked else 160
    llm = LLM(str(path), num_blocks=256, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    prompts = random_prompts([1, 7, 16, 33, 70, 120], llm.engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(token_prompts(prompts), params)
    expected = [hf_greedy(path, p) for p in prompts]
    # ignore_eos may run past an EOS where HF stops: compare HF's tokens as a prefix.
    for got, want in zip(generated(outs), expected, strict=True):
        assert got[: len(want)] == want
    assert llm.engine.block_pool.num_free_blocks == llm.engine.block_pool.num_usable_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits_report_cached_tokens_and_keep_tokens(tiny_model, arch):
    path = tiny_model(arch)
    llm = LLM(str(path), num_blocks=256, block_size=16)
    vocab = llm.engine.model_config.vocab_size
    shared, suffix = random_prompts([40, 9], vocab, seed=1)
    first = llm.generate(token_prompts([shared]), GREEDY)[0]
    assert first.num_cached_tokens == 0
    again = llm.generate(token_prompts([shared]), GREEDY)[0]
    assert again.num_cached_tokens == 32  # two full blocks; the partial third is recomputed
    extended = llm.generate(token_prompts([shared + suffix]), GREEDY)[0]
    assert extended.num_cached_tokens == 32
    assert generated([first, again]) == [hf_greedy(path, shared)] * 2
    assert extended.outputs[0].token_ids == hf_greedy(path, shared + suffix)


@pytest.mark.parametrize(
    "arch, overrides",
    [("llama", {"tie_word_embeddings": True}), ("qwen3", {"head_dim": 24}), ("llama", {"head_dim": 8})],
)
def test_model_variants_match_hf(tiny_model, arch, overrides):
    path = tiny_model(arch, **overrides)
    llm = LLM(str(path), num_blocks=128)
    prompts = random_prompts([5, 29], llm.engine.model_config.vocab_size, seed=2)
    outs = llm.generate(token_prompts(prompts), GREEDY)
    assert generated(outs) == [hf_greedy(path, p) for p in prompts]


def test_preemption_under_a_small_cache_keeps_tokens(tiny_model):
    path = tiny_model("llama")
    # 12 usable blocks of 8 tokens for four sequences that each grow to ~40 tokens: preemption is forced.
    llm = LLM(str(path), num_blocks=13, block_size=8, max_num_batched_tokens=64)
    prompts = random_prompts([20, 22, 24, 26], llm.engine.model_config.vocab_size, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(token_prompts(prompts), params)
    assert llm.engine.scheduler.num_preemptions > 0
    for got, prompt in zip(generated(outs), prompts, strict=True):
        want = hf_greedy(path, prompt, 16)
        assert got[: len(want)] == want
    assert llm.engine.block_pool.num_free_blocks == 12
