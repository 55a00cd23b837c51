"""The element-wise kernels (RMSNorm, residual-add + RMSNorm, SiLU-and-mul, RoPE + paged K/V write)
against their plain-torch references, and the references against independent formulas.

Without CUDA the kernels run through Triton's interpreter at small sizes. There float32 and float16 match
the references as on a GPU, but bfloat16 does not: the interpreter (Triton 3.9) truncates float32 →
bfloat16 casts instead of rounding to nearest even, so bfloat16 is held only to a few-ulp tolerance.
The `gpu` tests repeat the comparisons natively at model sizes, where RoPE must match bit for bit.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel modules: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools
import math
import zlib

import pytest

from splitserve.kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from splitserve.kernels.rope_kv import rope_and_store_kv, rope_and_store_kv_reference
from splitserve.kernels.silu_mul import silu_and_mul, silu_and_mul_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
EPS = 1e-6
THETA = 10000.0
MAX_POSITIONS = 256
NAN = float("nan")

# (rtol, atol) for kernel vs reference on inputs of unit scale, where the two are not bit-identical (RoPE
# is, except interpreted bfloat16). float32 differs through reduction order, rsqrt, exp and division (a few
# float32 ulps); float16 and bfloat16 by about two ulps of theirs: a float32 difference that flips one
# rounding (y = x * rstd) grows to up to two ulps after the next rounded op (weight * y). Interpreted
# bfloat16 (truncating casts, see the docstring) stays within the same bound in practice.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 4e-2),
}
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def generator(*case: object) -> torch.Generator:
    """A fresh, reproducible random stream per test case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen)).to(device=DEVICE, dtype=dtype)


def padded(t: torch.Tensor, pad: int = 5) -> torch.Tensor:
    """A copy of t [rows, cols] inside a NaN-filled [rows, cols + pad] buffer: a view with a row stride
    larger than its width, so stray reads or writes past a row show up."""
    buf = torch.full((t.shape[0], t.shape[1] + pad), NAN, dtype=t.dtype, device=t.device)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


def padding_of(view: torch.Tensor) -> torch.Tensor:
    """The columns of `padded`'s buffer outside the view."""
    rows, cols = view.shape
    return view.as_strided((rows, view.stride(0) - cols), (view.stride(0), 1), view.storage_offset() + cols)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[want.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


def rope_tables(head_dim: int, max_positions: int = MAX_POSITIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin [max_positions, head_dim] built as the engine's rotary module builds them."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


# ---------------------------------------------------------------------------------------------- RMSNorm


def check_rms_norm(num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    gen = generator("rms", num_tokens, hidden, dtype)
    x = padded(randn(gen, num_tokens, hidden, dtype=dtype))  # [num_tokens, hidden], row stride hidden + 5
    weight = 1.0 + randn(gen, hidden, dtype=dtype, scale=0.1)
    out = padded(torch.full((num_tokens, hidden), NAN, dtype=dtype, device=DEVICE))
    x_before = x.clone()

    got = rms_norm(x, weight, EPS, out=out)
    want = rms_norm_reference(x, weight, EPS)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "every element written"
    assert padding_of(out).isnan().all(), "nothing written past a row"
    assert torch.equal(x, x_before)
    assert_close(got, want)
    assert torch.equal(rms_norm(x, weight, EPS), got), "a fresh output equals a given one"


def check_add_rms_norm(num_tokens: int, hidden: int, dtype: torch.dtype) -> None:
    gen = generator("add_rms", num_tokens, hidden, dtype)
    x = padded(randn(gen, num_tokens, hidden, dtype=dtype))  # [num_tokens, hidden]
    residual = padded(randn(gen, num_tokens, hidden, dtype=dtype), pad=3)
    weight = 1.0 + randn(gen, hidden, dtype=dtype, scale=0.1)
    want_normed, want_residual = add_rms_norm_reference(x, residual, weight, EPS)

    normed, new_residual = add_rms_norm(x, residual, weight, EPS)
    assert normed is x and new_residual is residual, "both results are written in place"
    assert padding_of(x).isnan().all() and padding_of(residual).isnan().all()
    assert_close(normed, want_normed)
    assert_close(new_residual, want_residual)
    if not (INTERPRETED and dtype == torch.bfloat16):
        assert torch.equal(new_residual, want_residual), "one add, rounded as torch rounds it"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 200])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_rms_norm_matches_reference(num_tokens, hidden, dtype):
    check_rms_norm(num_tokens, hidden, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 200])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_add_rms_norm_matches_reference(num_tokens, hidden, dtype):
    check_add_rms_norm(num_tokens, hidden, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_on_head_views_of_a_packed_projection(dtype):
    """Qwen3's q/k norms: [num_tokens, heads, head_dim] strided views, normalised per head."""
    num_tokens, num_heads, num_kv_heads, head_dim = 7, 4, 2, 24
    gen = generator("qk_norm", dtype)
    qkv = randn(gen, num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )  # [num_tokens, num_kv_heads, head_dim], token stride (num_heads + 2 * num_kv_heads) * head_dim
    weight = 1.0 + randn(gen, head_dim, dtype=dtype, scale=0.1)
    qkv_before = qkv.clone()

    got = rms_norm(k, weight, EPS)
    assert got.is_contiguous() and torch.equal(qkv, qkv_before)
    assert_close(got, rms_norm_reference(k, weight, EPS))
    out = torch.full_like(got, NAN)
    rms_norm(k, weight, EPS, out=out)
    assert torch.equal(out, got)
    rms_norm(k, weight, EPS, out=k)  # in place, inside the packed tensor
    assert torch.equal(k, got)
    k_cols = slice(num_heads * head_dim, (num_heads + num_kv_heads) * head_dim)
    untouched = torch.ones(qkv.shape[1], dtype=torch.bool)
    untouched[k_cols] = False
    assert torch.equal(qkv[:, untouched], qkv_before[:, untouched])


def test_rms_norm_reference_matches_the_formula():
    gen = generator("rms_formula")
    x, residual = randn(gen, 5, 96, dtype=torch.float32), randn(gen, 5, 96, dtype=torch.float32)
    weight = 1.0 + randn(gen, 96, dtype=torch.float32, scale=0.1)
    s = (x.double() + residual.double()).float().double()
    want = weight.double() * s / torch.sqrt((s * s).mean(-1, keepdim=True) + EPS)
    normed, new_residual = add_rms_norm_reference(x, residual, weight, EPS)
    assert torch.equal(new_residual, x + residual)
    torch.testing.assert_close(normed.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rms_norm_reference(s.float(), weight, EPS), normed, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- SiLU and mul


def check_silu_and_mul(num_tokens: int, intermediate: int, dtype: torch.dtype) -> None:
    gen = generator("silu", num_tokens, intermediate, dtype)
    x = padded(randn(gen, num_tokens, 2 * intermediate, dtype=dtype, scale=3.0))  # [T, 2 * I]
    out = padded(torch.full((num_tokens, intermediate), NAN, dtype=dtype, device=DEVICE))
    x_before = x.clone()

    got = silu_and_mul(x, out=out)
    want = silu_and_mul_reference(x)
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any() and padding_of(out).isnan().all()
    assert torch.equal(x, x_before)
    assert_close(got, want)
    fresh = silu_and_mul(x)
    assert fresh.shape == (num_tokens, intermediate) and fresh.is_contiguous() and torch.equal(fresh, got)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("intermediate", [64, 96, 200, 1500])  # 1500: two column blocks
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_silu_and_mul_matches_reference(num_tokens, intermediate, dtype):
    check_silu_and_mul(num_tokens, intermediate, dtype)


def test_silu_and_mul_reference_matches_the_formula():
    gen = generator("silu_formula")
    x = randn(gen, 5, 2 * 96, dtype=torch.float32, scale=4.0)
    gate, up = x.double().chunk(2, dim=-1)
    want = gate / (1.0 + torch.exp(-gate)) * up
    torch.testing.assert_close(silu_and_mul_reference(x).double(), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ RoPE + K/V write


def make_rope_case(gen, num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    """Packed qkv with q/k/v views, NaN-poisoned cache, distinct random slots and random positions."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = randn(gen, num_tokens, width, dtype=dtype)  # [num_tokens, (num_heads + 2 * num_kv_heads) * D]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)  # [num_tokens, num_heads, head_dim], strided
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    num_blocks = math.ceil(num_tokens / block_size) + 3  # spare blocks stay poisoned
    cache_shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.full(cache_shape, NAN, dtype=dtype, device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)  # [num_tokens]
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(DEVICE)
    return qkv, q, k, v, kv_cache, slots, positions


def check_rope_and_store_kv(
    num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, in_place: bool = True
) -> None:
    gen = generator("rope", num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    qkv, q, k, v, kv_cache, slots, positions = make_rope_case(
        gen, num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    cos, sin = rope_tables(head_dim)
    want_cache = kv_cache.clone()
    want_q = rope_and_store_kv_reference(positions, q, k, v, cos, sin, want_cache, slots)
    qkv_before = qkv.clone()

    # q_out: a NaN-poisoned view with padded heads and tokens, so stray writes show up.
    q_buf = torch.full((num_tokens, num_heads + 1, head_dim + 3), NAN, dtype=dtype, device=DEVICE)
    q_out = q_buf[:, :num_heads, :head_dim]  # [num_tokens, num_heads, head_dim]
    got_q = rope_and_store_kv(positions, q, k, v, cos, sin, kv_cache, slots, q_out=q_out)
    assert got_q is q_out and not got_q.isnan().any(), "every element of q written"
    assert q_buf[:, num_heads].isnan().all() and q_buf[..., head_dim:].isnan().all(), "and nothing else"
    assert torch.equal(qkv, qkv_before), "q, k and v are read only"
    written = ~kv_cache.isnan()
    assert torch.equal(written, ~want_cache.isnan()), "exactly the mapped slots are written"
    assert written.sum() == 2 * num_tokens * num_kv_heads * head_dim
    exact = not (INTERPRETED and dtype == torch.bfloat16)
    if exact:  # every op rounded as torch rounds it
        assert torch.equal(got_q, want_q)
        assert torch.equal(kv_cache[written], want_cache[written])
    else:
        assert_close(got_q, want_q)
        assert_close(kv_cache, want_cache)
        assert torch.equal(kv_cache[1][written[1]], want_cache[1][written[1]]), "v is copied unchanged"

    if not in_place:
        return
    # In place: rotated q written back into the packed tensor; k and v columns untouched.
    assert rope_and_store_kv(positions, q, k, v, cos, sin, kv_cache, slots, q_out=q) is q
    assert torch.equal(q, got_q)
    assert torch.equal(qkv[:, num_heads * head_dim :], qkv_before[:, num_heads * head_dim :])


HEADS = [(4, 2), (8, 1), (2, 2), (6, 3)]  # (6, 3): masked head tiles
ROPE_GRID = list(itertools.product([1, 7, 33], HEADS, [16, 24, 64], [8, 16]))
# float32 over the whole grid; the half types over a slice of it that still covers every heads/D/block.
ROPE_CASES = [(*c, torch.float32) for c in ROPE_GRID] + [
    (*c, dtype)
    for dtype in (torch.float16, torch.bfloat16)
    for c in itertools.product([7], HEADS, [16, 24, 64], [8, 16])
]


@pytest.mark.parametrize(
    ("num_tokens", "heads", "head_dim", "block_size", "dtype"),
    ROPE_CASES,
    ids=[f"T{c[0]}-h{c[1][0]}x{c[1][1]}-D{c[2]}-bs{c[3]}-{str(c[4])[6:]}" for c in ROPE_CASES],
)
def test_rope_and_store_kv_matches_reference(num_tokens, heads, head_dim, block_size, dtype):
    # The in-place variant on the 7-token cases only, to keep the interpreter's time down.
    check_rope_and_store_kv(num_tokens, *heads, head_dim, block_size, dtype, in_place=num_tokens == 7)


def test_rope_and_store_kv_takes_int32_indices_and_allocates_by_default():
    gen = generator("rope_int32")
    _, q, k, v, kv_cache, slots, positions = make_rope_case(gen, 5, 4, 2, 16, 8, torch.float32)
    cos, sin = rope_tables(16)
    want_cache = kv_cache.clone()
    want_q = rope_and_store_kv_reference(positions, q, k, v, cos, sin, want_cache, slots)
    buf = torch.full((5, 4, 20), NAN, device=DEVICE)
    q_out = buf[..., :16]  # [5, 4, 16], head stride 20

    got = rope_and_store_kv(positions.int(), q, k, v, cos, sin, kv_cache, slots.int(), q_out=q_out)
    assert got is q_out and torch.equal(got, want_q)
    assert buf[..., 16:].isnan().all()
    assert torch.equal(kv_cache.isnan(), want_cache.isnan())
    assert torch.equal(kv_cache.nan_to_num(), want_cache.nan_to_num())
    fresh = rope_and_store_kv(positions, q, k, v, cos, sin, kv_cache, slots)  # default: a new tensor
    assert fresh.is_contiguous() and fresh.data_ptr() != q.data_ptr() and torch.equal(fresh, want_q)


def test_rope_and_store_kv_reference_matches_the_formula():
    """The rotation as a complex product per pair (x[j], x[j + D/2]), angles in float64."""
    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 6, 4, 2, 16, 8
    gen = generator("rope_formula")
    _, q, k, v, kv_cache, slots, positions = make_rope_case(
        gen, num_tokens, num_heads, num_kv_heads, head_dim, block_size, torch.float32
    )
    cos, sin = rope_tables(head_dim)
    got_q = rope_and_store_kv_reference(positions, q, k, v, cos, sin, kv_cache, slots)

    half = head_dim // 2
    inv_freq = THETA ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angles = positions.cpu().double()[:, None, None] * inv_freq  # [num_tokens, 1, half]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.cpu().double()
        z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
        return torch.cat((z.real, z.imag), dim=-1)

    # float32 angles (position * inv_freq) carry ~1e-7 relative error: up to ~3e-5 at position 255.
    torch.testing.assert_close(got_q.cpu().double(), rotate(q), rtol=0, atol=2e-4)
    want_k = rotate(k)
    for t, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, block_size)
        torch.testing.assert_close(kv_cache[0, block, offset].cpu().double(), want_k[t], rtol=0, atol=2e-4)
        assert torch.equal(kv_cache[1, block, offset], v[t])


# --------------------------------------------------------------------------------------------- Errors


def test_launchers_reject_bad_inputs():
    x = torch.zeros(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(64, device=DEVICE, dtype=torch.float16), EPS)
    with pytest.raises(ValueError, match="rows"):
        rms_norm(torch.zeros(2, 8193, device=DEVICE), torch.ones(8193, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(
            x, torch.zeros(4, 64, device=DEVICE, dtype=torch.float16), torch.ones(64, device=DEVICE), EPS
        )
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.zeros(64, 4, device=DEVICE).t(), torch.ones(64, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul(torch.zeros(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        silu_and_mul(x, out=torch.empty(4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="one of"):
        silu_and_mul(torch.zeros(4, 8, dtype=torch.int32, device=DEVICE))

    gen = generator("rope_errors")
    _, q, k, v, kv_cache, slots, positions = make_rope_case(gen, 3, 4, 2, 16, 8, torch.float32)
    cos, sin = rope_tables(16)
    args = (positions, q, k, v, cos, sin, kv_cache, slots)
    with pytest.raises(ValueError, match="float32"):
        rope_and_store_kv(*args[:4], cos.half(), sin.half(), *args[6:])
    with pytest.raises(ValueError, match="kv_cache"):
        rope_and_store_kv(*args[:6], kv_cache[:, :, :, :1], slots)
    with pytest.raises(ValueError, match="kv_cache"):
        rope_and_store_kv(*args[:6], kv_cache.half(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_and_store_kv(*args[:7], slots[:2])
    with pytest.raises(ValueError, match="positions"):
        rope_and_store_kv(positions.float(), *args[1:])
    with pytest.raises(ValueError, match="contiguous"):
        rope_and_store_kv(positions, q.transpose(1, 2).contiguous().transpose(1, 2), *args[2:])
    with pytest.raises(ValueError, match="q_out"):
        rope_and_store_kv(*args, q_out=torch.empty(3, 4, 8, device=DEVICE))


# ----------------------------------------------------------------------------------- GPU, model sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [2048, 4096, 8192])
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_rms_norms_at_model_sizes(num_tokens, hidden, dtype):
    check_rms_norm(num_tokens, hidden, dtype)
    check_add_rms_norm(num_tokens, hidden, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("intermediate", [8192, 14336])
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_silu_and_mul_at_model_sizes(num_tokens, intermediate, dtype):
    check_silu_and_mul(num_tokens, intermediate, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(32, 8), (28, 4), (64, 8)])
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
def test_rope_and_store_kv_at_model_sizes(num_tokens, heads, head_dim, dtype):
    check_rope_and_store_kv(num_tokens, *heads, head_dim, 16, dtype)
