"""The batched sampler inside the engine (float32, CPU): penalties equal transformers' and a plain loop's,
logprobs equal the model's own log-softmax step by step, and a seeded request's tokens do not depend on its
batch — with penalized requests (which the engine runs without lookahead) beside pipelined ones."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine_vs_hf import hf_model
from test_sampling import reference_penalized

from splitserve import LLM, SamplingParams

MAX_NEW = 10


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model), num_blocks=256)


def prompts(n: int, seed: int = 0, length: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(length + i)] for i in range(n)]


def hf_steps(model, prompt: list[int], pick) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with transformers, one full forward a token: `pick(logits, tokens so far)` chooses.
    Returns the tokens and each step's raw log-softmax."""
    tokens, logps = list(prompt), []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            logits = hf_model(str(model))(torch.tensor([tokens])).logits[0, -1].float()
            logps.append(logits.log_softmax(-1))
            tokens.append(pick(logits, tokens))
    return tokens[len(prompt) :], logps


def test_repetition_penalty_matches_transformers_generate(model, llm):
    params = SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=MAX_NEW, ignore_eos=True)
    for prompt in prompts(3, seed=1):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = hf_model(str(model)).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                 max_new_tokens=MAX_NEW, repetition_penalty=1.8)  # fmt: skip
        got = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0].token_ids
        assert got == want[0, len(prompt) :].tolist()


def test_presence_and_frequency_penalties_match_a_plain_loop_in_a_mixed_batch(model, llm):
    pen = SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=1.5, max_tokens=MAX_NEW,
                         ignore_eos=True)  # fmt: skip
    plain = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    batch = prompts(4, seed=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], [pen, plain, pen, plain])
    for i, prompt in enumerate(batch):
        if i % 2:
            want, _ = hf_steps(model, prompt, lambda logits, tokens: int(logits.argmax()))
        else:
            n = len(prompt)

            def pick(logits, tokens, n=n):
                return int(reference_penalized(logits, [], tokens[n:], pen).argmax())

            want, _ = hf_steps(model, prompt, pick)
        assert outs[i].outputs[0].token_ids == want, i


def test_logprobs_are_the_models_log_softmax_with_ranks_and_top_tokens(model, llm):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=4)
    prompt = prompts(1, seed=3)[0]
    out = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    want, logps = hf_steps(model, prompt, lambda logits, tokens: int(logits.argmax()))
    assert out.token_ids == want and len(out.logprobs) == MAX_NEW
    for token, entry, logp in zip(out.token_ids, out.logprobs, logps, strict=True):
        assert entry[token].rank == 1 and entry[token].logprob == pytest.approx(float(logp[token]), abs=1e-4)
        top = logp.topk(4)
        assert [entry[t].rank for t in top.indices.tolist()] == [1, 2, 3, 4]
        for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert entry[t].logprob == pytest.approx(v, abs=1e-4)
            assert entry[t].decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False)
    sampled = [entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids, strict=True)]
    assert out.cumulative_logprob == pytest.approx(sum(sampled))
    none = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert none.outputs[0].logprobs is None and none.outputs[0].cumulative_logprob is None


def test_a_seeded_request_draws_the_same_in_any_batch_and_penalized_company(llm):
    seeded = SamplingParams(
        temperature=1.0, top_p=0.9, min_p=0.02, seed=77, max_tokens=MAX_NEW, ignore_eos=True
    )
    prompt = {"prompt_token_ids": prompts(1, seed=4)[0]}
    alone = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    company = [SamplingParams(temperature=0.8, repetition_penalty=1.3, max_tokens=MAX_NEW + 3),
               SamplingParams(temperature=0.0, max_tokens=4),
               SamplingParams(temperature=1.2, top_k=7)]  # fmt: skip
    others = [{"prompt_token_ids": p} for p in prompts(3, seed=5)]
    outs = llm.generate(
        [others[0], prompt, others[1], others[2]], [company[0], seeded, company[1], company[2]]
    )
    assert outs[1].outputs[0].token_ids == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True)
    a, b = llm.generate([prompt, prompt], unseeded)  # unseeded requests get keys of their own
    assert a.outputs[0].token_ids != b.outputs[0].token_ids
