"""The sort-free sampler: the Triton kernel against its plain-torch reference token for token, the
reference's distribution against an independent float64 formula, and the counter-based draws against
their formula in Python integers.

Kernel and reference agree bit for bit by construction (integer masses, the same float32 operations for
the exp), so every comparison here is exact. Without CUDA the kernel runs through Triton's interpreter at
small sizes and small blocks (a vocabulary spans several blocks); the `gpu` tests repeat the comparison
at a model's vocabulary and check the kernel's own distribution with many more rows.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernel modules: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import numpy as np
import pytest

from splitserve.kernels.sampling import (
    MASS_BITS,
    MAX_VOCAB,
    SamplingTuning,
    _weights_reference,
    draw_bits,
    sample,
    sample_reference,
    uniforms,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASK64 = (1 << 64) - 1
# Chi-square critical values at p = 1e-4 by degrees of freedom (checked against the regularised gamma).
CHI2_CRITICAL = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745, 6: 27.856, 7: 29.878}
MODES = ("greedy", "temperature", "top_k", "top_p", "min_p", "all", "mixed")


def generator(*case: object) -> torch.Generator:
    """A fresh, reproducible random stream per test case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def small_tuning(vocab: int) -> SamplingTuning:
    """About four blocks per row, one program per row: several blocks at interpreter-sized vocabularies."""
    return SamplingTuning(block=max(16, min(1024, 1 << max(vocab // 4, 1).bit_length())), target_programs=1)


def make_params(gen: torch.Generator, num_rows: int, mode: str) -> dict[str, torch.Tensor]:
    """Per-row sampling values for one of MODES ("mixed": each row its own mix, greedy rows included)."""
    temperature = 0.3 + 1.4 * torch.rand(num_rows, generator=gen)
    top_k = torch.zeros(num_rows, dtype=torch.int32)
    top_p = torch.ones(num_rows)
    min_p = torch.zeros(num_rows)
    if mode == "greedy":
        temperature.zero_()
    if mode in ("top_k", "all", "mixed"):
        top_k = torch.randint(1, 40, (num_rows,), generator=gen, dtype=torch.int32)
    if mode in ("top_p", "all", "mixed"):
        top_p = 0.05 + 0.9 * torch.rand(num_rows, generator=gen)
    if mode in ("min_p", "all", "mixed"):
        min_p = 0.3 * torch.rand(num_rows, generator=gen)
    if mode == "mixed":  # each filter off in some rows, some rows greedy
        top_k[torch.rand(num_rows, generator=gen) < 0.5] = 0
        top_p[torch.rand(num_rows, generator=gen) < 0.4] = 1.0
        min_p[torch.rand(num_rows, generator=gen) < 0.5] = 0.0
        temperature[torch.rand(num_rows, generator=gen) < 0.15] = 0.0
    values = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "seeds": torch.randint(0, 2**63 - 1, (num_rows,), generator=gen),
        "positions": torch.randint(0, 1 << 20, (num_rows,), generator=gen),
    }
    return {name: value.to(DEVICE) for name, value in values.items()}


def args_of(logits: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    names = ("temperature", "top_k", "top_p", "min_p", "seeds", "positions")
    return (logits, *(params[name] for name in names))


def padded(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """t [rows, cols] inside a NaN-filled [rows, cols + pad] buffer: a row stride larger than the width."""
    buf = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


def check_kernel_matches_reference(
    logits: torch.Tensor, params: dict[str, torch.Tensor], tuning: SamplingTuning
) -> torch.Tensor:
    args = args_of(logits, params)
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=DEVICE)
    got = sample(*args, out=out, tuning=tuning)
    want = sample_reference(*args)
    assert got is out
    mismatched = (got != want).nonzero().flatten().tolist()
    assert not mismatched, (
        f"rows {mismatched}: kernel {got[mismatched].tolist()} != {want[mismatched].tolist()}"
    )
    assert ((got >= 0) & (got < logits.shape[1])).all()
    return want


# --------------------------------------------------------------------------------------------- draws


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def test_uniforms_follow_the_formula():
    seeds = np.array([0, 1, 12345, 2**62 + 7, 2**63 - 1], dtype=np.int64)
    positions = np.array([0, 5, 99999, 3, 1 << 40], dtype=np.int64)
    for rnd in (0, 1, 17):
        got = uniforms(seeds, positions, rnd)
        assert got.dtype == np.float32
        for seed, position, u in zip(seeds.tolist(), positions.tolist(), got.tolist(), strict=True):
            h = splitmix64(((splitmix64(seed) ^ position) + rnd * 0x9E3779B97F4A7C15) & MASK64)
            assert u == (h >> 40) * 2.0**-24
        assert np.array_equal(draw_bits(seeds, positions, rnd).astype(np.float32) * 2**-24, got)
        assert np.array_equal(uniforms(seeds, positions, rnd), got), "deterministic"


def test_uniforms_are_uniform_and_differ_by_round_and_position():
    seeds = np.arange(20000, dtype=np.int64) * 7919
    positions = np.arange(20000, dtype=np.int64) % 97
    u0, u1 = uniforms(seeds, positions, 0), uniforms(seeds, positions, 1)
    assert ((u0 >= 0) & (u0 < 1)).all()
    assert (u0 != u1).mean() > 0.999
    assert (u0 != uniforms(seeds, positions + 1, 0)).mean() > 0.999
    assert np.array_equal(u0 * 2**24, np.floor(u0 * 2**24)), "24 bits, exact in float32"
    counts = np.bincount((u0 * 10).astype(int), minlength=10)
    assert ((counts - 2000) ** 2 / 2000).sum() < 33.7, "chi-square, 9 degrees of freedom, p = 1e-4"


def test_weights_are_exp_monotone_and_exact_at_the_max():
    grid = np.concatenate(
        [
            -np.linspace(0, 90, 400001),
            np.arange(-60, 1, dtype=np.float64) / np.log2(np.e),  # d where d * log2(e) ~ an integer
            -np.logspace(-30, 0, 1000),
        ]
    )
    d = torch.from_numpy(np.sort(np.unique(grid.astype(np.float32))))
    weights = _weights_reference(d.clone()).double() * 2.0**-MASS_BITS
    assert weights[-1] == 1.0 and d[-1] == 0.0, "w = 1 exactly at the maximum"
    assert (weights.diff() >= 0).all(), "non-decreasing in d"
    live = d > -87
    exact = torch.exp(d.double())
    # Within 2e-7 (the polynomial) of 2^t for t = d * log2(e), which float32 holds to 2^-24 relative and
    # log2(e) to 1.4e-8: an error in t of |t| * (2^-24 + 1.4e-8), ln 2 times that in 2^t.
    bound = 2e-7 + (d.double() * np.log2(np.e)).abs() * (2.0**-24 + 1.4e-8) * np.log(2)
    assert ((weights[live] / exact[live] - 1).abs() <= bound[live]).all()
    assert (weights[d < -88.1] < 2.0**-126).all()
    assert _weights_reference(torch.tensor([float("-inf")])).item() < 2.0 ** (MASS_BITS - 126)


# ---------------------------------------------------------------------------- kernel against reference

VOCABS = {"greedy": 100, "temperature": 777, "top_k": 2999, "top_p": 777, "min_p": 100, "all": 2999}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_kernel_matches_reference(mode, dtype):
    num_rows, vocab = (48, 300) if mode == "mixed" else (16, VOCABS[mode])
    gen = generator("match", mode, dtype)
    logits = (3.0 * torch.randn(num_rows, vocab, generator=gen)).to(DEVICE, dtype)
    params = make_params(gen, num_rows, mode)
    want = check_kernel_matches_reference(padded(logits), params, small_tuning(vocab))
    greedy = params["temperature"] == 0
    assert torch.equal(want[greedy], logits[greedy].argmax(dim=1))


@pytest.mark.parametrize("mode", ["top_k", "top_p", "min_p", "all", "mixed"])
def test_kernel_matches_reference_with_ties(mode):
    """bfloat16 logits on a coarse grid: every row holds long runs of exactly equal scores."""
    num_rows, vocab = 24, 400
    gen = generator("ties", mode)
    logits = torch.randint(-8, 9, (num_rows, vocab), generator=gen).to(DEVICE, torch.bfloat16) * 0.5
    logits[:4] = logits[:4].amax(dim=1, keepdim=True)  # rows of a single value
    check_kernel_matches_reference(logits, make_params(gen, num_rows, mode), small_tuning(vocab))


def test_tokens_do_not_depend_on_the_tuning():
    num_rows, vocab = 12, 1000
    gen = generator("tuning")
    logits = (2.0 * torch.randn(num_rows, vocab, generator=gen)).to(DEVICE)
    args = args_of(logits, make_params(gen, num_rows, "mixed"))
    want = sample_reference(*args)
    for tuning in (SamplingTuning(block=128, target_programs=48), SamplingTuning(block=512, num_warps=4)):
        assert torch.equal(sample(*args, tuning=tuning), want)


def test_a_row_samples_the_same_alone_and_in_a_batch():
    num_rows, vocab = 12, 500
    gen = generator("batch")
    logits = (2.0 * torch.randn(num_rows, vocab, generator=gen)).to(DEVICE, torch.bfloat16)
    params = make_params(gen, num_rows, "mixed")
    tuning = SamplingTuning(block=128)  # a lone row splits into more programs than a batch's rows
    batch = sample(*args_of(logits, params), tuning=tuning)
    order = torch.randperm(num_rows, generator=gen).to(DEVICE)
    shuffled = {name: value[order] for name, value in params.items()}
    assert torch.equal(sample(*args_of(logits[order], shuffled), tuning=tuning), batch[order])
    assert torch.equal(sample_reference(*args_of(logits[order], shuffled)), batch[order])
    for row in (0, 5, 11):
        alone = {name: value[row : row + 1] for name, value in params.items()}
        assert sample(*args_of(logits[row : row + 1], alone), tuning=tuning).item() == batch[row].item()


# ----------------------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize("sampler", [sample, sample_reference], ids=["kernel", "reference"])
def test_degenerate_filters_give_the_argmax(sampler):
    num_rows, vocab = 8, 300
    gen = generator("degenerate")
    logits = torch.randn(num_rows, vocab, generator=gen).to(DEVICE)  # no ties
    argmax = logits.argmax(dim=1)
    for name, value in (("top_k", 1), ("top_p", 1e-6), ("min_p", 1.0), ("temperature", 0.0)):
        params = make_params(gen, num_rows, "temperature")
        params[name].fill_(value)
        assert torch.equal(sampler(*args_of(logits, params)), argmax), name


@pytest.mark.parametrize("sampler", [sample, sample_reference], ids=["kernel", "reference"])
def test_minus_infinity_is_never_drawn(sampler):
    num_rows, vocab = 16, 200
    gen = generator("-inf")
    logits = torch.randn(num_rows, vocab, generator=gen)
    logits[torch.rand(num_rows, vocab, generator=gen) < 0.9] = float("-inf")
    logits[:, 7] = 0.0  # a finite token in every row
    logits[0] = float("-inf")  # a row of no mass: the first index of its maximum, as torch.argmax
    logits, params = logits.to(DEVICE), make_params(gen, num_rows, "temperature")
    params["temperature"].fill_(50.0)  # nearly flat over the finite tokens
    tokens = sampler(*args_of(logits, params))
    assert tokens[0] == 0
    assert torch.isfinite(logits[1:].gather(1, tokens[1:, None])).all()


def test_greedy_takes_the_first_index_of_the_maximum():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -7.0]])
    params = make_params(generator("greedy"), 3, "greedy")
    for sampler in (sample, sample_reference):
        assert sampler(*args_of(logits.to(DEVICE), params)).tolist() == [1, 0, 0]


# ------------------------------------------------------------------------------------- distributions


def kept_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float):
    """The definition in float64, straight from the scores: probabilities over one row's tokens."""
    s = (logits.float() / torch.tensor(temperature, dtype=torch.float32)).double().numpy()
    w = np.exp(s - s.max())
    above = s[None, :] > s[:, None]  # [i, j]: token j above token i
    above_mass, above_count = (above * w[None, :]).sum(axis=1), above.sum(axis=1)
    # The filters' boundaries must not be within rounding of a token, or the test would be ambiguous.
    assert top_p >= 1 or (np.abs(above_mass - top_p * w.sum()) > 1e-4 * w.sum()).all()
    assert min_p == 0 or (np.abs(w - min_p) > 1e-4).all()
    keep = (top_k <= 0) | (above_count < top_k)
    keep &= (top_p >= 1) | (above_mass < top_p * w.sum())
    keep &= w >= min_p
    return np.where(keep, w, 0.0) / np.where(keep, w, 0.0).sum()


DISTRIBUTIONS = {  # (temperature, top_k, top_p, min_p)
    "temperature": (0.7, 0, 1.0, 0.0),
    "top_k": (1.0, 5, 1.0, 0.0),
    "top_p": (1.3, 0, 0.8, 0.0),
    "min_p": (1.0, 0, 1.0, 0.15),
    "all": (1.2, 6, 0.8, 0.1),
}
ROW_LOGITS = torch.tensor([1.5, -0.3, 2.0, 0.4, 1.1, -1.2, 0.9, 1.7])


def chi_square_rows(name: str, num_rows: int) -> tuple[tuple[torch.Tensor, ...], np.ndarray]:
    """num_rows copies of ROW_LOGITS under one parameter set, each row its own seed; and the
    expected probabilities."""
    temperature, top_k, top_p, min_p = DISTRIBUTIONS[name]
    full = lambda value, dtype=torch.float32: torch.full((num_rows,), value, dtype=dtype, device=DEVICE)  # noqa: E731
    gen = generator("chi2", name)
    args = (
        ROW_LOGITS.to(DEVICE).expand(num_rows, -1),
        full(temperature),
        full(top_k, torch.int32),
        full(top_p),
        full(min_p),
        torch.randint(0, 2**63 - 1, (num_rows,), generator=gen).to(DEVICE),
        torch.randint(0, 1 << 20, (num_rows,), generator=gen).to(DEVICE),
    )
    return args, kept_probabilities(ROW_LOGITS, temperature, top_k, top_p, min_p)


def assert_distribution(tokens: torch.Tensor, probs: np.ndarray) -> None:
    counts = np.bincount(tokens.cpu().numpy(), minlength=len(probs))
    assert (counts[probs == 0] == 0).all(), f"drew outside the kept set: {counts} for {probs}"
    kept = probs > 0
    expected = probs[kept] * len(tokens)
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_CRITICAL[int(kept.sum()) - 1], f"chi-square {chi2:.1f}: {counts} for {probs}"


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_reference_draws_the_defined_distribution(name):
    args, probs = chi_square_rows(name, 20000)
    assert_distribution(sample_reference(*args), probs)
    if name == "all":
        assert (probs > 0).sum() == 5, "the filters bind"
    # The kernel on a slice of the same rows: equal tokens, so the same distribution.
    few = 20000 if DEVICE == "cuda" else 40
    assert torch.equal(sample(*(a[:few] for a in args)), sample_reference(*(a[:few] for a in args)))


# -------------------------------------------------------------------------------------------- errors


def test_launchers_reject_bad_inputs():
    num_rows, vocab = 4, 50
    params = make_params(generator("errors"), num_rows, "all")
    logits = torch.zeros(num_rows, vocab, device=DEVICE)
    for sampler in (sample, sample_reference):
        with pytest.raises(ValueError, match="rows, vocab"):
            sampler(*args_of(logits[0], params))
        with pytest.raises(ValueError, match="one of"):
            sampler(*args_of(logits.double(), params))
        with pytest.raises(ValueError, match="contiguous last"):
            sampler(*args_of(torch.zeros(vocab, num_rows, device=DEVICE).t(), params))
        with pytest.raises(ValueError, match="vocab"):
            sampler(*args_of(torch.zeros(num_rows, 0, device=DEVICE), params))
        for name, bad in (
            ("temperature", params["temperature"].double()),
            ("top_k", params["top_k"].long()),
            ("top_p", params["top_p"][:2]),
            ("min_p", params["min_p"].half()),
            ("seeds", params["seeds"].int()),
            ("positions", torch.zeros(2 * num_rows, dtype=torch.int64, device=DEVICE)[::2]),
        ):
            with pytest.raises(ValueError, match=name):
                sampler(*args_of(logits, {**params, name: bad}))
        with pytest.raises(ValueError, match="out"):
            sampler(*args_of(logits, params), out=torch.zeros(num_rows, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="block"):
        sample(*args_of(torch.zeros(1, 20 * 1024, device=DEVICE), make_params(generator(), 1, "all")),
               tuning=SamplingTuning(block=16))  # fmt: skip
    with pytest.raises(ValueError, match="block"):
        SamplingTuning(block=100)
    assert MAX_VOCAB << MASS_BITS == 1 << 53, "a row's mass stays exact in float64"


def test_no_rows():
    params = make_params(generator("empty"), 0, "all")
    for sampler in (sample, sample_reference):
        assert sampler(*args_of(torch.zeros(0, 10, device=DEVICE), params)).shape == (0,)


# ----------------------------------------------------------------------------------- GPU, model sizes


def model_logits(gen: torch.Generator, num_rows: int, vocab: int) -> torch.Tensor:
    """A broad background with a few much likelier tokens per row, as a model's logits look."""
    logits = 2.0 * torch.randn(num_rows, vocab, generator=gen)
    top = torch.randint(0, vocab, (num_rows, 16), generator=gen)
    logits.scatter_add_(1, top, torch.linspace(14, 4, 16).expand(num_rows, 16).contiguous())
    return logits.to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["temperature", "top_k", "top_p", "all", "mixed"])
@pytest.mark.parametrize("num_rows", [1, 64, 256])
def test_kernel_matches_reference_at_model_sizes(num_rows, mode):
    gen = generator("model", num_rows, mode)
    logits = model_logits(gen, num_rows, 128256).to(DEVICE)
    params = make_params(gen, num_rows, mode)
    args = args_of(logits, params)
    got = sample(*args)
    assert torch.equal(got.cpu(), sample_reference(*(a.cpu() for a in args))), "against the CPU reference"
    assert torch.equal(got, sample_reference(*args)), "against the reference on the GPU"


@pytest.mark.gpu
@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_kernel_draws_the_defined_distribution(name):
    args, probs = chi_square_rows(name, 200000)
    assert_distribution(sample(*args), probs)


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph():
    gen = generator("graph")
    num_rows = 64
    args = args_of(model_logits(gen, num_rows, 128256).to(DEVICE), make_params(gen, num_rows, "mixed"))
    out = torch.empty(num_rows, dtype=torch.int64, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample(*args, out=out)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample(*args, out=out)
    out.fill_(-1)
    graph.replay()
    assert torch.equal(out, sample_reference(*args))
