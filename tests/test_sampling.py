"""Sampling math and parameter validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.engine.errors import InvalidRequest
from splitserve.engine.sampler import Sampler, SampleRow
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels.sampling import uniforms


def rows(params, seeds=None, positions=None, outputs=None, prompts=None):
    n = len(params)
    seeds = seeds or [7] * n
    positions = positions or list(range(100, 100 + n))
    outputs, prompts = outputs or [None] * n, prompts or [None] * n
    return [
        SampleRow(p, s, q, pr, o)
        for p, s, q, pr, o in zip(params, seeds, positions, prompts, outputs, strict=True)
    ]


def reference_filtered(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a request samples from, plainly: one row at a time, sorted, in float64."""
    x = logits.double() / p.temperature
    order = torch.argsort(x, descending=True)
    probs = x[order].softmax(-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if p.top_k is not None:
        keep[p.top_k :] = False
    before = probs.cumsum(-1) - probs
    keep &= before < p.top_p
    kept = torch.zeros_like(probs).scatter(0, order, torch.where(keep, probs, 0.0))
    kept = kept / kept.sum()
    if p.min_p > 0:
        kept = torch.where(kept < p.min_p * kept.max(), 0.0, kept)
    return kept / kept.sum()


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=2.0, top_p=1e-6),
        SamplingParams(temperature=0.0, top_k=5),
    ]
    tokens, logprobs = Sampler(torch.device("cpu"))(logits, rows(params))
    assert tokens.tolist() == logits.argmax(-1).tolist() and logprobs is None


def test_a_draw_is_a_function_of_its_seed_and_position_alone():
    """The same (seed, position) picks the same token whatever else is in the batch, where it sits, and
    whatever path the batch takes (sorting for another row's top-p, min-p, penalties)."""
    sampler = Sampler(torch.device("cpu"))
    logits = torch.randn(6, 1000)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    alone = [int(sampler(logits[2:3], rows([p], [123], [40]))[0][0]) for _ in range(3)]
    others = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=0.0),
              SamplingParams(min_p=0.1), SamplingParams(repetition_penalty=1.5, temperature=0.5)]  # fmt: skip
    batch = [others[0], others[1], p, others[2], others[3], p]
    tokens, _ = sampler(
        logits,
        rows(
            batch,
            [1, 2, 123, 3, 4, 123],
            [9, 9, 40, 9, 9, 41],
            outputs=[None] * 4 + [[5, 6], None],
            prompts=[None] * 4 + [[1], None],
        ),
    )
    assert alone == [alone[0]] * 3 and int(tokens[2]) == alone[0]
    draws = uniforms(np.array([123] * 4, dtype=np.uint64), np.arange(40, 44, dtype=np.uint64))
    assert len(set(draws.tolist())) == 4 and all(0 <= d < 1 for d in draws)  # positions differ: draws differ
    assert uniforms(np.array([123], dtype=np.uint64), np.array([40], dtype=np.uint64))[0] == draws[0]


# Chi-square critical value, 7 degrees of freedom, p = 1e-4 (a correct sampler fails 1 run in 10,000).
CHI2_7DF_1E4 = 29.88


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.15),
    SamplingParams(temperature=0.9, top_k=6, top_p=0.95, min_p=0.05),
], ids=["temperature", "top_k", "top_p", "min_p", "all"])  # fmt: skip
def test_sampled_tokens_follow_the_filtered_distribution(params):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
    expected = reference_filtered(logits, params)
    n = 20_000
    batch = logits.repeat(n, 1)
    seeds = list(range(n))  # every row its own request: independent draws
    tokens, _ = Sampler(torch.device("cpu"))(batch, rows([params] * n, seeds, [5] * n))
    counts = torch.bincount(tokens, minlength=8).double()
    assert (counts[expected == 0] == 0).all(), "a filtered-out token was drawn"
    live = expected > 0
    chi2 = float((((counts - n * expected) ** 2)[live] / (n * expected[live])).sum())
    assert chi2 < CHI2_7DF_1E4, (chi2, counts.tolist(), (n * expected).tolist())


def reference_penalized(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams):
    out = logits.clone().double()
    for token in set(prompt) | set(output):
        out[token] = (
            out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
        )
    for token in set(output):
        out[token] -= p.presence_penalty + p.frequency_penalty * output.count(token)
    return out


def test_penalties_match_a_plain_reference_and_steer_greedy_picks():
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 3
    prompt, output = [1, 2, 3, 3], [4, 4, 4, 5, 1]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.7),
              SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.8),
              SamplingParams(temperature=0.0, repetition_penalty=0.6, frequency_penalty=-1.2)]  # fmt: skip
    sampler = Sampler(torch.device("cpu"))
    got = sampler._penalized(logits, rows(params, outputs=[output] * 3, prompts=[prompt] * 3))
    for i, p in enumerate(params):
        assert torch.allclose(got[i].double(), reference_penalized(logits[i], prompt, output, p), atol=1e-5)
    # The token a penalty pushes down is no longer picked greedily, in an otherwise greedy batch too.
    logits = torch.zeros(2, 10)
    logits[:, 4] = 5.0
    logits[:, 7] = 4.0
    plain, pen = SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, frequency_penalty=2.0)
    tokens, _ = sampler(logits, rows([plain, pen], outputs=[None, [4]], prompts=[None, [0]]))
    assert tokens.tolist() == [4, 7]


def test_logprobs_are_the_raw_distributions_with_ranks_and_the_top_tokens():
    torch.manual_seed(1)
    logits = torch.randn(3, 30).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.0, logprobs=0),
              SamplingParams(temperature=0.8, top_k=4)]  # fmt: skip
    tokens, lp = Sampler(torch.device("cpu"))(logits, rows(params))
    raw = logits.float().log_softmax(-1)
    assert torch.allclose(lp.sampled, raw.gather(1, tokens[:, None]).squeeze(1))
    for i, token in enumerate(tokens.tolist()):
        assert int(lp.rank[i]) == int((raw[i] > raw[i, token]).sum()) + 1
    assert int(lp.rank[0]) == 1  # greedy: the most likely
    assert lp.top_ids.shape == (3, 3) and lp.top_ids[0].tolist() == raw[0].topk(3).indices.tolist()
    assert torch.allclose(lp.top_logprobs[0], raw[0].topk(3).values)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": 0},
        {"seed": -1},
        {"stop": [""]},
        {"stop_token_ids": [-3]},
        {"n": 2},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"logprobs": 21},
        {"logprobs": True},
    ],
)
def test_out_of_range_sampling_values_are_rejected(kwargs):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert next(iter(kwargs)) in str(info.value)


def test_lists_are_accepted_and_stored_as_tuples():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])
    assert p.stop == ("a", "b") and p.stop_token_ids == (1, 2)
    assert SamplingParams(stop="x").stop == ("x",)


@pytest.mark.gpu
def test_on_cuda_draws_follow_the_distribution_and_do_not_depend_on_the_batch():
    cuda = torch.device("cuda")
    sampler = Sampler(cuda)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.95, min_p=0.05)
    n = 20_000
    tokens, _ = sampler(logits.repeat(n, 1).to(cuda), rows([params] * n, list(range(n)), [5] * n))
    counts = torch.bincount(tokens.cpu(), minlength=8).double()
    expected = reference_filtered(logits, params)
    live = expected > 0
    assert (counts[~live] == 0).all()
    assert float((((counts - n * expected) ** 2)[live] / (n * expected[live])).sum()) < CHI2_7DF_1E4
    big = torch.randn(300, 128_256, device=cuda).to(torch.bfloat16)  # a Llama-3 vocabulary
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    alone = int(sampler(big[7:8], rows([p], [5], [33]))[0][0])
    mixed = [SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(temperature=0.0)] * 150
    mixed[7] = p
    seeds = list(range(300))
    seeds[7] = 5
    positions = [33] * 300
    assert int(sampler(big, rows(mixed, seeds, positions))[0][7]) == alone
