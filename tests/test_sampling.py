"""Sampling math and parameter validation."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.errors import InvalidRequest
from splitserve.engine.sampler import Sampler, apply_top_k_top_p
from splitserve.engine.sampling_params import SamplingParams


def test_top_k_and_top_p_masks_are_exact():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert torch.isinf(apply_top_k_top_p(logits, 2, 1.0)).tolist() == [True, False, False, True]
    # probs ≈ [0.032, 0.644, 0.237, 0.087]: top_p 0.7 keeps the two largest (0.644 < 0.7).
    assert torch.isinf(apply_top_k_top_p(logits, None, 0.7)).tolist() == [True, False, False, True]
    assert torch.isinf(apply_top_k_top_p(logits, None, 0.5)).tolist() == [True, False, True, True]
    assert not torch.isinf(apply_top_k_top_p(logits, None, 1.0)).any()


def test_greedy_and_degenerate_filters_pick_the_argmax():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=2.0, top_p=1e-6),
        SamplingParams(temperature=0.0, top_k=5),
    ]
    assert sampler(logits, params, [None] * 4).tolist() == logits.argmax(-1).tolist()


def test_seeded_requests_do_not_depend_on_their_batch():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(3, 1000)
    p = SamplingParams(temperature=1.0, seed=123)

    def gen():
        return torch.Generator().manual_seed(123)

    alone = [int(sampler(logits[1:2], [p], [gen()])[0]) for _ in range(3)]
    in_batch = int(sampler(logits, [SamplingParams(), p, SamplingParams()], [None, gen(), None])[1])
    assert alone == [alone[0]] * 3 and in_batch == alone[0]


def test_sampling_follows_the_distribution():
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    tokens = sampler(logits, [SamplingParams()] * 4000, [None] * 4000)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


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
