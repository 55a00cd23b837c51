"""The small-batch GEMV kernels (plain, residual-add + RMSNorm prologue, and that plus a packed gate/up
projection with SiLU-and-mul) against their plain-torch references.

Without CUDA the kernels run through Triton's interpreter at small sizes. bfloat16 is held to a few-ulp
tolerance everywhere and the new residual is not compared bit for bit there: the interpreter truncates
float32 → bfloat16 casts instead of rounding them (see test_kernel_elementwise.py). Inputs are NaN-padded
row-strided views, so a read past a row (of x, the residual or a weight) would show up as NaN. The `gpu`
tests repeat the comparisons natively at Llama-3.2-1B sizes, with PDL where the device has it.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel modules: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import pytest

from splitserve.kernels.gemv import (
    INTERPRETED,
    MAX_TOKENS,
    GemvTuning,
    add_rms_norm_gemv,
    add_rms_norm_gemv_reference,
    add_rms_norm_gemv_silu_mul,
    add_rms_norm_gemv_silu_mul_reference,
    default_tuning,
    gemv,
    gemv_reference,
    pdl_supported,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
NAN = float("nan")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (rtol, atol) for outputs of unit scale (weights are scaled by K**-0.5). float32 differs from the
# reference only through summation order and rsqrt/exp/division (a few float32 ulps). float16 and bfloat16
# differ by a flipped rounding of the float32 accumulator (1 ulp), which the SiLU-and-mul epilogue can grow
# to about 3 (gate, silu and up each rounded once more).
TOLERANCES = {
    torch.float32: (1e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
if INTERPRETED:
    # Truncating casts pull every rounding (h, the normalised input, the projection, silu, the product)
    # toward zero by up to an ulp; compounded through SiLU-and-mul they reach 5-8 bfloat16 ulps (6%).
    TOLERANCES[torch.bfloat16] = (8e-2, 6e-2)


def generator(*case: object) -> torch.Generator:
    """A fresh, reproducible random stream per test case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def padded(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """A copy of t [rows, cols] inside a NaN-filled [rows, cols + pad] buffer: a row-strided view, so
    stray reads or writes past a row show up."""
    buf = torch.full((t.shape[0], t.shape[1] + pad), NAN, dtype=t.dtype, device=t.device)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


def padding_of(view: torch.Tensor) -> torch.Tensor:
    rows, cols = view.shape
    return view.as_strided((rows, view.stride(0) - cols), (view.stride(0), 1), view.storage_offset() + cols)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen)).to(device=DEVICE, dtype=dtype)


def make_inputs(case: tuple, num_tokens: int, k: int, n: int, dtype: torch.dtype, *, residual: bool):
    """x, residual (or None), norm weight, weight [n, k] (padded views) and bias [n]."""
    gen = generator(*case)
    x = padded(randn(gen, num_tokens, k, dtype=dtype))  # [num_tokens, k], row stride k + 3
    res = padded(randn(gen, num_tokens, k, dtype=dtype), pad=5) if residual else None
    norm_weight = 1.0 + randn(gen, k, dtype=dtype, scale=0.1)
    weight = padded(randn(gen, n, k, dtype=dtype, scale=k**-0.5), pad=2)  # [n, k], row stride k + 2
    bias = randn(gen, n, dtype=dtype, scale=0.5)
    return x, res, norm_weight, weight, bias


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[want.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def assert_new_residual(h, x, residual, want_h) -> None:
    """h is x itself without a residual; otherwise a new tensor equal to x + residual rounded once."""
    if residual is None:
        assert h is x
        return
    assert h.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    assert not h.isnan().any(), "every element written"
    if INTERPRETED and h.dtype == torch.bfloat16:
        assert_close(h, want_h)  # truncating casts
    else:
        assert torch.equal(h, want_h), "one add, rounded as torch rounds it"


# -------------------------------------------------------------------------------------------------- GEMV

SHAPES = [(64, 40, True), (256, 17, False), (200, 77, True)]  # (K, N, bias): K=200 ends in a partial tile


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("k", "n", "with_bias"), SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 8, 16])
def test_gemv_matches_reference(num_tokens, k, n, with_bias, dtype):
    case = ("gemv", num_tokens, k, n, dtype)
    x, _, _, weight, bias = make_inputs(case, num_tokens, k, n, dtype, residual=False)
    bias = bias if with_bias else None
    out = padded(torch.full((num_tokens, n), NAN, dtype=dtype, device=DEVICE), pad=4)
    x_before = x.clone()

    got = gemv(x, weight, bias, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "every element written"
    assert padding_of(out).isnan().all(), "nothing written past a row"
    assert torch.equal(x, x_before)
    assert_close(got, gemv_reference(x, weight, bias))
    assert torch.equal(gemv(x, weight, bias), got), "a fresh output equals a given one"


# (tuning, K): several K tiles with a partial last one; K split in three (the last split short), alone
# and fused with the norm prologue and the SiLU-and-mul epilogue.
TUNINGS = [
    (GemvTuning(block_n=16, block_k=64), 200),
    (GemvTuning(block_n=32, block_k=32, split_k=3), 200),
    (GemvTuning(block_n=16, block_k=64, split_k=8), 256),  # 4 tiles: at most 4 splits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("tuning", "k"), TUNINGS)
def test_tunings_and_split_k_match_reference(tuning, k, dtype):
    num_tokens, n = 3, 40
    case = ("tuning", tuning, k, dtype)
    x, residual, norm_weight, weight, bias = make_inputs(case, num_tokens, k, n, dtype, residual=True)
    out = torch.full((num_tokens, n), NAN, dtype=dtype, device=DEVICE)
    assert_close(gemv(x, weight, bias, out=out, tuning=tuning), gemv_reference(x, weight, bias))

    y, h = add_rms_norm_gemv(x, residual, norm_weight, EPS, weight, bias, tuning=tuning)
    want_y, want_h = add_rms_norm_gemv_reference(x, residual, norm_weight, EPS, weight, bias)
    assert_close(y, want_y)
    assert_new_residual(h, x, residual, want_h)

    act, h = add_rms_norm_gemv_silu_mul(x, residual, norm_weight, EPS, weight, tuning=tuning)
    want_act, want_h = add_rms_norm_gemv_silu_mul_reference(x, residual, norm_weight, EPS, weight)
    assert_close(act, want_act)
    assert_new_residual(h, x, residual, want_h)


# ------------------------------------------------------------------------------ residual add + RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-layer"])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 8, 16])
def test_add_rms_norm_gemv_matches_reference(num_tokens, with_residual, dtype):
    k, n, with_bias = SHAPES[num_tokens % len(SHAPES)]
    case = ("norm", num_tokens, with_residual, dtype)
    x, residual, norm_weight, weight, bias = make_inputs(case, num_tokens, k, n, dtype, residual=True)
    residual = residual if with_residual else None
    bias = bias if with_bias else None
    x_before = x.clone()
    residual_before = None if residual is None else residual.clone()

    y, h = add_rms_norm_gemv(x, residual, norm_weight, EPS, weight, bias)
    want_y, want_h = add_rms_norm_gemv_reference(x, residual, norm_weight, EPS, weight, bias)
    assert y.shape == (num_tokens, n) and y.is_contiguous()
    assert_close(y, want_y)
    assert_new_residual(h, x, residual, want_h)
    assert torch.equal(x, x_before), "x is not modified"
    if residual is not None:
        assert torch.equal(residual, residual_before), "the residual is not modified in place"
        assert padding_of(residual).isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-layer"])
@pytest.mark.parametrize("num_tokens", [1, 3, 8, 16])
def test_add_rms_norm_gemv_silu_mul_matches_reference(num_tokens, with_residual, dtype):
    k, intermediate = (64, 24) if num_tokens % 2 else (256, 33)
    case = ("silu", num_tokens, with_residual, dtype)
    x, residual, norm_weight, gate_up, _ = make_inputs(
        case, num_tokens, k, 2 * intermediate, dtype, residual=with_residual
    )
    x_before = x.clone()

    act, h = add_rms_norm_gemv_silu_mul(x, residual, norm_weight, EPS, gate_up)
    want_act, want_h = add_rms_norm_gemv_silu_mul_reference(x, residual, norm_weight, EPS, gate_up)
    assert act.shape == (num_tokens, intermediate)
    assert_close(act, want_act)
    assert_new_residual(h, x, residual, want_h)
    assert torch.equal(x, x_before)


def test_the_norm_prologue_rounds_before_the_dot():
    """With a weight that picks single columns, y is the normalised input that entered the dot. Rounded as
    rms_norm.py rounds it (h, then h * rstd, then * norm_weight), it matches the reference in all but the
    rare elements where rstd's last bit flips a rounding; a single rounding at the end would differ in
    many (checked here too, so that the comparison can tell the two apart)."""
    dtype, num_tokens, k = torch.float16, 16, 256
    x, residual, norm_weight, _, _ = make_inputs(("pick",), num_tokens, k, 8, dtype, residual=True)
    pick = torch.eye(k, dtype=dtype, device=DEVICE)
    y, _ = add_rms_norm_gemv(x, residual, norm_weight, EPS, pick)
    want, h = add_rms_norm_gemv_reference(x, residual, norm_weight, EPS, pick)
    h32 = h.float()
    rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)
    rounded_once = (norm_weight.float() * h32 * rstd).to(dtype)
    assert (rounded_once != want).float().mean() > 0.05
    assert (y != want).float().mean() < 0.01


def test_the_silu_epilogue_rounds_gate_and_up_first():
    """Gate and up rows that each add two normalised inputs (exact in float32, so summation order cannot
    matter): the kernel rounds gate and up to the dtype before SiLU-and-mul, as the unfused path does, and
    matches the reference in all but rare elements; skipping those roundings would differ in many."""
    dtype, num_tokens, k = torch.float16, 16, 128
    x, residual, norm_weight, _, _ = make_inputs(("two-hot",), num_tokens, k, 8, dtype, residual=True)
    cols = torch.arange(k, device=DEVICE)
    gate_up = torch.zeros(2 * k, k, dtype=dtype, device=DEVICE)
    gate_up[cols, cols] = gate_up[cols, (cols + 1) % k] = 1.0
    gate_up[k + cols, (cols + 2) % k] = gate_up[k + cols, (cols + 5) % k] = 1.0
    act, _ = add_rms_norm_gemv_silu_mul(x, residual, norm_weight, EPS, gate_up)
    want, _ = add_rms_norm_gemv_silu_mul_reference(x, residual, norm_weight, EPS, gate_up)
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    normed, _ = add_rms_norm_gemv_reference(x, residual, norm_weight, EPS, eye)
    gate, up = (normed.float() @ gate_up.float().T).chunk(2, dim=-1)
    unrounded = (torch.nn.functional.silu(gate) * up).to(dtype)
    assert (unrounded != want).float().mean() > 0.05
    assert (act != want).float().mean() < 0.02


def test_zero_tokens_give_empty_outputs():
    x = torch.empty(0, 64, device=DEVICE)
    weight = torch.randn(40, 64, device=DEVICE)
    assert gemv(x, weight).shape == (0, 40)
    y, h = add_rms_norm_gemv(x, x.clone(), torch.ones(64, device=DEVICE), EPS, weight)
    assert y.shape == (0, 40) and h.shape == (0, 64)


# ------------------------------------------------------------------------------------ tuning, validation


def test_default_tuning_splits_tall_skinny_shapes_only():
    down = default_tuning(1, 2048, 8192)  # Llama-3.2-1B down_proj: 128 column blocks of 16
    assert down.split_k > 1 and 8192 // down.split_k >= 4 * down.block_k
    assert default_tuning(1, 128256, 2048).split_k == 1  # lm_head has programs enough
    gate_up = default_tuning(16, 8192, 2048, norm=True, silu=True)
    assert gate_up.block_n == 32 and gate_up.num_stages == 3
    small = default_tuning(3, 40, 64)
    assert small.block_k == 64 and small.split_k == 1


@pytest.mark.parametrize(
    "knobs",
    [{"block_n": 8}, {"block_k": 48}, {"num_warps": 3}, {"num_warps": 32}, {"num_stages": 0}, {"split_k": 0}],
    ids=str,
)
def test_tuning_rejects_bad_knobs(knobs):
    with pytest.raises(ValueError):
        GemvTuning(**knobs)


def _bad_calls():
    f32 = {"device": DEVICE}
    x, w, nw = torch.randn(2, 64, **f32), torch.randn(40, 64, **f32), torch.ones(64, **f32)
    half = {"dtype": torch.float16, "device": DEVICE}
    return {
        "x 3-d": lambda: gemv(x[None], w),
        "too many tokens": lambda: gemv(torch.randn(MAX_TOKENS + 1, 64, **f32), w),
        "integer x": lambda: gemv(x.int(), w.int()),
        "strided x": lambda: gemv(torch.randn(64, 2, **f32).t(), w),
        "weight K": lambda: gemv(x, torch.randn(40, 32, **f32)),
        "weight dtype": lambda: gemv(x, w.half()),
        "weight 1-d": lambda: gemv(x, w[0]),
        "strided weight": lambda: gemv(x, torch.randn(64, 40, **f32).t()),
        "bias shape": lambda: gemv(x, w, torch.randn(41, **f32)),
        "bias dtype": lambda: gemv(x, w, torch.randn(40, **half)),
        "out shape": lambda: gemv(x, w, out=torch.empty(2, 41, **f32)),
        "out dtype": lambda: gemv(x, w, out=torch.empty(2, 40, **half)),
        "empty K": lambda: gemv(torch.randn(2, 0, **f32), torch.randn(40, 0, **f32)),
        "empty N": lambda: add_rms_norm_gemv(x, x, nw, EPS, torch.randn(0, 64, **f32)),
        "residual shape": lambda: add_rms_norm_gemv(x, torch.randn(3, 64, **f32), nw, EPS, w),
        "residual dtype": lambda: add_rms_norm_gemv(x, x.half(), nw, EPS, w),
        "norm weight": lambda: add_rms_norm_gemv(x, x, torch.ones(63, **f32), EPS, w),
        "odd gate_up": lambda: add_rms_norm_gemv_silu_mul(x, x, nw, EPS, torch.randn(41, 64, **f32)),
        "pdl here": lambda: gemv(x, w, pdl=True),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_inputs_raise_value_error(name):
    if name == "pdl here" and pdl_supported(torch.device(DEVICE)):
        pytest.skip("this device runs PDL")
    with pytest.raises(ValueError):
        _bad_calls()[name]()


# -------------------------------------------------------------------------------------- GPU, model sizes

GPU_PDL = [False, True]


def _skip_unsupported_pdl(pdl: bool) -> None:
    if pdl and not pdl_supported(torch.device("cuda")):
        pytest.skip("PDL needs compute capability >= 9.0")


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", GPU_PDL)
@pytest.mark.parametrize(("k", "n"), [(2048, 3072), (8192, 2048), (2048, 2048), (2048, 128256)])
@pytest.mark.parametrize("num_tokens", [1, 4, 16])
def test_gpu_gemv_at_model_sizes(num_tokens, k, n, pdl):
    _skip_unsupported_pdl(pdl)
    dtype = torch.bfloat16
    x, residual, norm_weight, weight, bias = make_inputs(("g", num_tokens, k, n), num_tokens, k, n, dtype,
                                                         residual=True)  # fmt: skip
    out = torch.full((num_tokens, n), NAN, dtype=dtype, device=DEVICE)
    assert_close(gemv(x, weight, out=out, pdl=pdl), gemv_reference(x, weight))
    y, h = add_rms_norm_gemv(x, residual, norm_weight, EPS, weight, bias, pdl=pdl)
    want_y, want_h = add_rms_norm_gemv_reference(x, residual, norm_weight, EPS, weight, bias)
    assert_close(y, want_y)
    assert torch.equal(h, want_h)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", GPU_PDL)
@pytest.mark.parametrize("num_tokens", [1, 4, 16])
def test_gpu_gate_up_silu_at_model_sizes(num_tokens, pdl):
    _skip_unsupported_pdl(pdl)
    dtype, k, intermediate = torch.bfloat16, 2048, 8192
    x, residual, norm_weight, gate_up, _ = make_inputs(("gu", num_tokens), num_tokens, k, 2 * intermediate,
                                                       dtype, residual=True)  # fmt: skip
    act, h = add_rms_norm_gemv_silu_mul(x, residual, norm_weight, EPS, gate_up, pdl=pdl)
    want_act, want_h = add_rms_norm_gemv_silu_mul_reference(x, residual, norm_weight, EPS, gate_up)
    assert_close(act, want_act)
    assert torch.equal(h, want_h)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", GPU_PDL)
def test_gpu_layer_chain_replays_in_a_cuda_graph(pdl):
    """qkv (norm fused) → o → gate_up (norm + SiLU fused) → down, twice, captured with split-K reduces
    between them: a replay equals eager execution bit for bit (with PDL, each kernel waits for its inputs)."""
    _skip_unsupported_pdl(pdl)
    dtype, hidden, inter, num_tokens = torch.bfloat16, 2048, 8192, 4
    gen = generator("chain")

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return randn(gen, rows, cols, dtype=dtype, scale=cols**-0.5)

    def norm_weight() -> torch.Tensor:
        return 1.0 + randn(gen, hidden, dtype=dtype, scale=0.1)

    def layer() -> tuple[torch.Tensor, ...]:  # input norm, qkv, o, post-attention norm, gate_up, down
        attn = (norm_weight(), matrix(3072, hidden), matrix(hidden, hidden))
        return (*attn, norm_weight(), matrix(2 * inter, hidden), matrix(hidden, inter))

    layers = [layer() for _ in range(2)]
    x0 = randn(gen, num_tokens, hidden, dtype=dtype)

    def forward() -> torch.Tensor:
        x, residual = x0, None
        for ln1, qkv_w, o_w, ln2, gate_up_w, down_w in layers:
            qkv, residual = add_rms_norm_gemv(x, residual, ln1, EPS, qkv_w, pdl=pdl)
            x = gemv(qkv[:, :hidden], o_w, pdl=pdl)
            act, residual = add_rms_norm_gemv_silu_mul(x, residual, ln2, EPS, gate_up_w, pdl=pdl)
            x = gemv(act, down_w, pdl=pdl)
        return x + residual

    want = forward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = forward()
    for _ in range(3):
        got.fill_(NAN)
        graph.replay()
        assert torch.equal(got, want)
