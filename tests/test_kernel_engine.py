"""The engine on its Triton kernels gives the reference path's tokens; CUDA graphs change nothing.

On CPU the kernels run through Triton's interpreter (conftest switches it on; slow, so a tiny model and a
few steps); on a GPU the same comparisons run natively, plus CUDA-graph replay against eager execution.
"""

from __future__ import annotations

import random

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.engine.cuda_graphs import batch_buckets
from splitserve.engine.ops import TorchOps
from splitserve.engine.triton_ops import TritonOps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def prompts(lengths, vocab, seed):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(n)]} for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_kernels_match_the_torch_reference(tiny_model, arch):
    path = str(tiny_model(arch))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    common = dict(device=DEVICE, dtype="float32", num_blocks=64, block_size=16, enforce_eager=True)
    reference = LLM(path, kernels="torch", **common)
    kernels = LLM(path, kernels="triton", **common)
    batch = prompts([3, 20, 37], reference.engine.model_config.vocab_size, seed=0)
    want = [o.outputs[0].token_ids for o in reference.generate(batch, params)]
    got = [o.outputs[0].token_ids for o in kernels.generate(batch, params)]
    assert got == want


@pytest.mark.parametrize("num_tokens", [4, 5])
def test_triton_ops_fuse_the_projections_of_small_batches_only(num_tokens):
    """Up to `fused_gemv_max_tokens` rows the fused GEMV kernels run and leave their inputs alone (the new
    residual is a new tensor); above it the in-place add_rms_norm kernel and F.linear do. Both paths give
    the reference's values."""
    ops, reference = TritonOps(fused_gemv_max_tokens=4, pdl=False), TorchOps()
    fused = num_tokens <= 4
    gen = torch.Generator().manual_seed(num_tokens)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE)

    hidden, out_features, inter, eps = 64, 80, 48, 1e-6
    x, residual = randn(num_tokens, hidden), randn(num_tokens, hidden)  # [num_tokens, hidden]
    norm_weight = 1 + randn(hidden, scale=0.1)
    weight, bias = randn(out_features, hidden, scale=hidden**-0.5), randn(out_features)
    gate_up = randn(2 * inter, hidden, scale=hidden**-0.5)

    want = reference.add_norm_linear(x, residual, norm_weight, eps, weight, bias)
    x_in, residual_in = x.clone(), residual.clone()
    got = ops.add_norm_linear(x_in, residual_in, norm_weight, eps, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(residual_in, residual) == fused, "only the fallback adds into the residual in place"

    want = reference.add_norm_gate_up_silu(x, residual, norm_weight, eps, gate_up)
    x_in, residual_in = x.clone(), residual.clone()
    got = ops.add_norm_gate_up_silu(x_in, residual_in, norm_weight, eps, gate_up)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(residual_in, residual) == fused
    torch.testing.assert_close(ops.linear(x, weight, bias), reference.linear(x, weight, bias))


def test_triton_ops_reject_bad_options():
    with pytest.raises(ValueError):
        TritonOps(fused_gemv_max_tokens=17)
    if not torch.cuda.is_available():
        assert TritonOps().pdl is False, "no PDL without a GPU"
        with pytest.raises(ValueError):
            TritonOps(pdl=True)


def test_batch_buckets_cover_every_batch_size():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(100)[-3:] == [80, 96, 100]
    assert batch_buckets(512)[-4:] == [416, 448, 480, 512] and len(batch_buckets(512)) == 31
    assert 256 in batch_buckets(512) and batch_buckets(300)[-3:] == [256, 288, 300]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("sampling", ["greedy", "mixed"])
def test_cuda_graph_decode_equals_eager(tiny_model, dtype, sampling):
    """Graphs equal eager steps, greedy and with the graph sampling: seeded filters of every kind, a
    penalized request (sampled eagerly after the replay) and logprobs in one batch."""
    path = str(tiny_model("llama", hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2))
    common = {"max_tokens": 24, "ignore_eos": True}
    mix = [SamplingParams(temperature=0.0, **common), SamplingParams(temperature=0.9, seed=1, **common),
           SamplingParams(temperature=0.8, top_p=0.9, seed=2, logprobs=2, **common),
           SamplingParams(temperature=1.2, top_k=5, min_p=0.05, seed=3, **common),
           SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=4, **common)]  # fmt: skip
    if sampling == "greedy":
        mix = mix[:1]

    def params(n):
        return [mix[i % len(mix)] for i in range(n)]

    eager = LLM(path, dtype=dtype, device="cuda", num_blocks=512, max_num_seqs=16, enforce_eager=True)
    graphs = LLM(path, dtype=dtype, device="cuda", num_blocks=512, max_num_seqs=16)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    # 1, 3, 11 sequences: exact and padded buckets; lengths that cross block boundaries mid-decode.
    for lengths in ([5], [1, 30, 64], [7 * i + 1 for i in range(11)]):
        batch = prompts(lengths, eager.engine.model_config.vocab_size, seed=len(lengths))
        want = eager.generate(batch, params(len(batch)))
        got = graphs.generate(batch, params(len(batch)))
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        for g, w in zip(got, want, strict=True):  # logits may differ in the last bits (other GEMM shapes)
            assert (g.outputs[0].logprobs is None) == (w.outputs[0].logprobs is None)
            for g_lp, w_lp in zip(g.outputs[0].logprobs or (), w.outputs[0].logprobs or (), strict=True):
                assert g_lp.keys() == w_lp.keys()
                assert all(abs(g_lp[t].logprob - w_lp[t].logprob) < 1e-3 for t in g_lp)
    pool = graphs.engine.block_pool
    assert pool.num_free_blocks == pool.num_usable_blocks


def test_the_engine_option_reaches_the_triton_ops():
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.ops import select_ops

    ops = select_ops(torch.device("cpu"), "triton", fused_gemv_max_tokens=4)
    assert isinstance(ops, TritonOps) and ops.fused_gemv_max_tokens == 4
    assert not isinstance(select_ops(torch.device("cpu"), "auto", 4), TritonOps)  # CPU auto: the reference
    for bad in (-1, 17):
        with pytest.raises(ValueError, match="fused_gemv_max_tokens"):
            EngineConfig(model="m", fused_gemv_max_tokens=bad)
