"""Sort-free batched token sampling: temperature, top-k, top-p, min-p and counter-based random draws, for
logits [rows, vocab]. The Triton kernels, their launcher and the plain-torch reference.

Owns the definition of the sampled distribution and the draw that realises it. It does not own penalties,
logprobs or where the per-request values come from (the engine's sampler builds them).

Definition, per row with temperature T > 0: s_i = float32(logit_i) / T (IEEE division), m = max s,
w_i = exp(s_i - m) and a token's mass W_i = trunc(w_i * 2^MASS_BITS), an integer. The kept set holds the
tokens i with count(s > s_i) < top_k (top_k <= 0: off), Σ_{s_j > s_i} W_j < top_p * Σ W (top_p >= 1: off)
and w_i >= min_p; the argmax is always kept (also with top_p <= 0 or min_p > 1), ties are kept or dropped
together. A token is drawn from the kept set with probability W_i / Σ_kept W. Rows with T <= 0, and rows
of no mass (all -inf), take the first index of the raw logits' maximum, as torch.argmax does. NaN logits,
and s overflowing to inf, are not supported (the token is then unspecified but in range, and the kernel's
loop still ends).

Two choices make the kernel and the reference agree bit for bit, on any device, and make a row's token
independent of the batch, BLOCK, the grid and reduction order:
  - masses are integers in units of 2^-35 of the most likely token, and a row's total stays below 2^53
    (vocab <= MAX_VOCAB), so every sum, prefix sum and comparison is exact, in int64 or float64. Tokens
    below 2^-35 of the most likely one get no mass: at most vocab * 2^-35 (4.4e-6 at 152k) of the
    probability moves, against 2^-24 for the resolution of a draw;
  - w is exp2(float32(d * log2 e)) by a degree-5 polynomial of the fraction (relative error below 2e-7
    beyond the rounding of d * log2 e; below 2^-126 it is flushed to about 2^-127, of no mass), built from
    IEEE float32 multiplies, adds, floor and exponent bits only (no FMA, no library exp), the same
    operations in the same order in the kernel and in torch. It never decreases as d grows, so every
    filter keeps an upper set of s.

Algorithm: rejection sampling with a rising pivot (as FlashInfer samples top-p). Each round draws u in
[0, 1) from (seed, position, round) and takes the first token in vocabulary order whose prefix sum of
candidate masses exceeds floor(u * candidate mass); the candidates are the tokens above the pivot. If the
draw j is outside the kept set, every token with s <= s_j is too: the pivot rises to s_j and the next
round draws again. So the accepted draw has exactly the kept set's distribution; rounds are few for top-p
and min-p, and O(log vocab) for a small top-k (a quickselect). The argmax is always accepted, so the loop
ends (no cap on rounds).

Kernels, all with grids that depend only on shapes (CUDA-graph safe); the launcher never synchronises:
  1. `_block_max_kernel` (rows, splits): each block's maximum raw logit (max s = that / T: division by
     T > 0 is monotone);
  2. `_block_mass_kernel` (rows, splits): each block's mass Σ W, given the row's m;
  3. `_sample_kernel` (rows): the rounds. A draw reads only its block, found from the block masses; the
     "above the draw" pass reads only the blocks whose maximum is above the draw, and leaves the next
     round's block masses.
Splits spread a row over several programs when there are few rows (batch 1 uses ~vocab / BLOCK programs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

MASS_BITS = 35
MAX_VOCAB = 1 << (53 - MASS_BITS)  # Σ W <= vocab * 2^35 <= 2^53: exact in float64 too
MAX_BLOCKS = 1024  # blocks per row: the sampling program holds one mass per block in registers
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The exp that defines w, in float32-exact constants shared by the kernel and the reference:
# 2^f = 1 + f * (C1 + f * (C2 + f * (C3 + f * (C4 + f * C5)))) on [0, 1], a minimax fit whose coefficients
# are positive (so it never decreases in f) and whose value at 1 stays below 2 (so w never decreases in d).
_LOG2E = tl.constexpr(1.4426950216293335)
_C1 = tl.constexpr(0.6931512951850891)
_C2 = tl.constexpr(0.24016444385051727)
_C3 = tl.constexpr(0.05579991266131401)
_C4 = tl.constexpr(0.009017030708491802)
_C5 = tl.constexpr(0.0018671300495043397)
_MASS_SCALE = tl.constexpr(float(1 << MASS_BITS))
# n + this holds n + 127 + MASS_BITS in its low mantissa bits: shifted into the exponent, 2^(n + MASS_BITS).
_EXPONENT_BIAS = tl.constexpr(float((1 << 23) + 127 + MASS_BITS))

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@dataclass(frozen=True)
class SamplingTuning:
    """Launch knobs, picked by `default_tuning`. They change speed only: the sampled tokens do not
    depend on them."""

    block: int = 4096  # tokens per block, a power of two
    num_warps: int = 16  # the sampling kernel's (one program per row)
    split_warps: int = 8  # the block max / block mass kernels'
    target_programs: int = 2048  # split rows until about this many programs (~16 per SM of an H100/H200)

    def __post_init__(self) -> None:
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {self.block}")
        for name in ("num_warps", "split_warps"):
            value = getattr(self, name)
            if value < 1 or value > 32 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two <= 32, got {value}")
        if self.target_programs < 1:
            raise ValueError(f"target_programs must be >= 1, got {self.target_programs}")


def default_tuning(num_rows: int) -> SamplingTuning:
    """Measured on an H200 at vocab 128256 (bfloat16, CUDA-graph replay, a model-like row): 4096-token
    blocks are faster for a few rows (11 against 15 us at batch 1), 8192 from a few dozen rows on (at
    batch 256: 129 us, against 143 with 4096)."""
    return SamplingTuning(block=4096 if num_rows < 32 else 8192)


# ------------------------------------------------------------------------------------------ random draws


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    return x ^ (x >> np.uint64(31))


def draw_bits(seeds: np.ndarray, positions: np.ndarray, round: int = 0) -> np.ndarray:
    """The 24 random bits (uint64 in [0, 2^24)) of each (seed, position)'s draw in round `round`:
    h = splitmix64(splitmix64(seed) ^ position + round * golden), bits = h >> 40, uint64 wrap-around."""
    return _round_bits(_draw_base(seeds, positions), round)


def _draw_base(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        return _splitmix64(np.asarray(seeds).astype(np.uint64)) ^ np.asarray(positions).astype(np.uint64)


def _round_bits(base: np.ndarray, round: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _splitmix64(base + np.uint64(round) * np.uint64(_GOLDEN)) >> np.uint64(40)


def uniforms(seeds: np.ndarray, positions: np.ndarray, round: int = 0) -> np.ndarray:
    """One float32 uniform in [0, 1) per (seed, position) for round `round`: draw_bits * 2^-24 (exact)."""
    return draw_bits(seeds, positions, round).astype(np.float32) * np.float32(2.0**-24)


@triton.jit
def _splitmix64_device(x):
    x = x + 0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


# ---------------------------------------------------------------------------------------------- masses


@triton.jit
def _block_masses(row_ptr, b, vocab, temperature, shift, BLOCK: tl.constexpr):
    """Block b's scores s = float32(logit) / T (-inf past the vocabulary), weights w * 2^MASS_BITS with
    w = exp(s - shift), and masses W = trunc(w * 2^MASS_BITS), each [BLOCK]; shift is the row's max score
    (0 if that is -inf).

    The exp is `_weights_reference`'s float32 operations in the same order; the launch disables FMA
    contraction. One function rather than three: the interpreter pays per call."""
    offs = b * BLOCK + tl.arange(0, BLOCK)  # < 2^31: vocab <= MAX_VOCAB
    x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    s = tl.math.div_rn(x, temperature)
    t = tl.maximum((s - shift) * _LOG2E, -127.0)
    n = tl.floor(t)
    f = t - n
    q = _C4 + f * _C5
    q = _C3 + f * q
    q = _C2 + f * q
    q = _C1 + f * q
    p = 1.0 + f * q
    scale = ((n + _EXPONENT_BIAS).to(tl.int32, bitcast=True) << 23).to(tl.float32, bitcast=True)
    weight = p * scale  # w * 2^MASS_BITS, exactly
    return s, weight, weight.to(tl.int64)


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _block_max_kernel(
    logits_ptr, block_max_ptr, vocab, stride_row, num_blocks, per_program, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * per_program
    for b in range(first, tl.minimum(first + per_program, num_blocks)):
        offs = b * BLOCK + tl.arange(0, BLOCK)  # < 2^31: vocab <= MAX_VOCAB
        x = tl.load(logits_ptr + row * stride_row + offs, mask=offs < vocab, other=float("-inf"))
        tl.store(block_max_ptr + row * num_blocks + b, tl.max(x.to(tl.float32), 0))


@triton.jit
def _block_mass_kernel(
    logits_ptr,
    temperature_ptr,
    block_max_ptr,
    block_mass_ptr,
    vocab,
    stride_row,
    num_blocks,
    per_program,
    BLOCK: tl.constexpr,
    NUM_BLOCKS_P2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * per_program
    temperature = tl.load(temperature_ptr + row)
    idx = tl.arange(0, NUM_BLOCKS_P2)
    block_max = tl.load(block_max_ptr + row * num_blocks + idx, mask=idx < num_blocks, other=float("-inf"))
    m = tl.math.div_rn(tl.max(block_max, 0), tl.where(temperature > 0, temperature, 1.0))
    shift = tl.where(m == float("-inf"), 0.0, m)
    for b in range(first, tl.minimum(first + per_program, num_blocks)):
        mass = tl.full((), 0, tl.int64)
        if temperature > 0:  # greedy rows get no mass: the sampling kernel takes their argmax
            _, _, masses = _block_masses(logits_ptr + row * stride_row, b, vocab, temperature, shift, BLOCK)
            mass = tl.sum(masses, 0)
        tl.store(block_mass_ptr + row * num_blocks + b, mass)


@triton.jit
def _mass_above(
    row_ptr, threshold, block_top, vocab, temperature, shift, BLOCK: tl.constexpr, NB: tl.constexpr
):
    """Σ W and the count over the tokens with s > threshold, and that mass per block [NB]; reads only the
    blocks whose top score (block_top [NB], -inf past the last block) is above the threshold."""
    idx = tl.arange(0, NB)
    block_mass = tl.zeros((NB,), tl.int64)
    total = tl.full((), 0, tl.int64)
    count = tl.full((), 0, tl.int32)
    b = tl.min(tl.where(block_top > threshold, idx, NB), 0)
    while b < NB:
        s, _, masses = _block_masses(row_ptr, b, vocab, temperature, shift, BLOCK)
        above = s > threshold
        mass = tl.sum(tl.where(above, masses, 0), 0)
        count += tl.sum(above.to(tl.int32), 0)
        total += mass
        block_mass = tl.where(idx == b, mass, block_mass)
        b = tl.min(tl.where((block_top > threshold) & (idx > b), idx, NB), 0)
    return total, count, block_mass


@triton.jit
def _reject(
    row_ptr,
    temperature,
    top_k,
    top_p,
    min_p,
    seed,
    position,
    block_top,
    block_mass,
    vocab,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
):
    """The rounds of rejection sampling for one row of mass Σ block_mass > 0; returns the token.
    block_top [NB]: each block's raw maximum (-inf past the last block)."""
    block_top = tl.math.div_rn(block_top, temperature)  # a block's top score: division is monotone
    m = tl.max(block_top, 0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    base = _splitmix64_device(seed.to(tl.uint64, bitcast=True)) ^ position.to(tl.uint64, bitcast=True)
    cand = tl.sum(block_mass, 0)
    top_p_mass = top_p.to(tl.float64) * cand.to(tl.float64)
    min_weight = min_p * _MASS_SCALE  # w >= min_p, in the weights' units (exact)
    idx = tl.arange(0, NB)
    lanes = tl.arange(0, BLOCK)
    pivot = tl.full((), float("-inf"), tl.float32)
    rnd = tl.full((), 0, tl.int64)
    token = tl.full((), 0, tl.int64)
    done = tl.full((), 0, tl.int32)
    while done == 0:
        # The draw: the first candidate whose prefix mass exceeds the target, found block, then lane.
        # target = floor(u * cand) exactly, for this round's u = bits * 2^-24 (cand <= 2^53)
        bits = (_splitmix64_device(base + rnd.to(tl.uint64) * 0x9E3779B97F4A7C15) >> 40).to(tl.int64)
        target = (cand >> 24) * bits + (((cand & 0xFFFFFF) * bits) >> 24)
        b = tl.sum((tl.cumsum(block_mass, 0) <= target).to(tl.int32), 0)
        before = tl.sum(tl.where(idx < b, block_mass, 0), 0)
        s, weight, masses = _block_masses(row_ptr, b, vocab, temperature, shift, BLOCK)
        prefix = tl.cumsum(tl.where(s > pivot, masses, 0), 0) + before
        lane = tl.sum((prefix <= target).to(tl.int32), 0)
        s_j = tl.max(tl.where(lanes == lane, s, float("-inf")), 0)
        weight_j = tl.max(tl.where(lanes == lane, weight, 0.0), 0)
        above_mass, above_count, block_mass = _mass_above(
            row_ptr, s_j, block_top, vocab, temperature, shift, BLOCK, NB
        )
        kept = (
            ((top_k <= 0) | (above_count < top_k))
            & ((top_p >= 1.0) | (above_mass.to(tl.float64) < top_p_mass))
            & (weight_j >= min_weight)
        )
        # A draw not above the pivot only comes of NaN logits: accept it, so that the loop still ends.
        accept = (above_count == 0) | kept | ~(s_j > pivot)
        token = tl.where(accept, tl.minimum(b * BLOCK + lane, vocab - 1).to(tl.int64), token)
        done = accept.to(tl.int32)
        pivot = s_j
        cand = above_mass
        rnd += 1
    return token


@triton.jit
def _sample_kernel(
    logits_ptr,
    temperature_ptr,
    top_k_ptr,
    top_p_ptr,
    min_p_ptr,
    seed_ptr,
    position_ptr,
    block_max_ptr,
    block_mass_ptr,
    out_ptr,
    vocab,
    stride_row,
    stride_out,
    num_blocks,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    idx = tl.arange(0, NB)
    block_max = tl.load(block_max_ptr + row * num_blocks + idx, mask=idx < num_blocks, other=float("-inf"))
    block_mass = tl.load(block_mass_ptr + row * num_blocks + idx, mask=idx < num_blocks, other=0)
    if tl.sum(block_mass, 0) > 0:
        token = _reject(
            row_ptr,
            tl.load(temperature_ptr + row),
            tl.load(top_k_ptr + row),
            tl.load(top_p_ptr + row),
            tl.load(min_p_ptr + row),
            tl.load(seed_ptr + row),
            tl.load(position_ptr + row),
            block_max,
            block_mass,
            vocab,
            BLOCK,
            NB,
        )
    else:  # greedy, or no mass: the first index of the raw maximum
        top = tl.max(block_max, 0)
        b = tl.min(tl.where(block_max == top, idx, NB), 0)
        offs = b * BLOCK + tl.arange(0, BLOCK)  # < 2^31: vocab <= MAX_VOCAB
        x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        token = tl.minimum(tl.min(tl.where(x == top, offs, vocab), 0), vocab - 1).to(tl.int64)
    tl.store(out_ptr + row * stride_out, token)


# -------------------------------------------------------------------------------------------- launcher


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    tuning: SamplingTuning | None = None,
) -> torch.Tensor:
    """One token per row of logits [rows, vocab] (float32/float16/bfloat16, contiguous last dimension,
    any row stride), drawn as the module docstring defines; the per-row values are contiguous [rows]
    tensors on the logits' device: temperature, top_p, min_p float32, top_k int32, seeds and positions
    int64 (seeds read as uint64).

    Writes into `out` ([rows] int64 on the device, any stride) or a new tensor, and returns it; reads
    nothing else back. Allocates two [rows, vocab / block] scratch tensors. Raises ValueError on bad
    shapes, dtypes, devices or layouts; never synchronises with the device.
    """
    num_rows, vocab = _check_inputs(logits, temperature, top_k, top_p, min_p, seeds, positions)
    out = _check_out(out, num_rows, logits.device)
    if num_rows == 0:
        return out
    tuning = tuning or default_tuning(num_rows)
    block = max(16, min(tuning.block, triton.next_power_of_2(vocab)))
    num_blocks = triton.cdiv(vocab, block)
    if num_blocks > MAX_BLOCKS:
        raise ValueError(f"a vocabulary of {vocab} needs a block of at least {vocab // MAX_BLOCKS + 1}")
    splits = min(num_blocks, triton.cdiv(tuning.target_programs, num_rows))
    per_program = triton.cdiv(num_blocks, splits)
    grid = (num_rows, triton.cdiv(num_blocks, per_program))
    block_max = torch.empty(num_rows, num_blocks, dtype=torch.float32, device=logits.device)
    block_mass = torch.empty(num_rows, num_blocks, dtype=torch.int64, device=logits.device)
    blocks_p2 = triton.next_power_of_2(num_blocks)
    common = {"enable_fp_fusion": False}  # _exp_neg must round every multiply and add, as torch does
    _block_max_kernel[grid](
        logits,
        block_max,
        vocab,
        logits.stride(0),
        num_blocks,
        per_program,
        BLOCK=block,
        num_warps=tuning.split_warps,
        **common,
    )
    _block_mass_kernel[grid](
        logits,
        temperature,
        block_max,
        block_mass,
        vocab,
        logits.stride(0),
        num_blocks,
        per_program,
        BLOCK=block,
        NUM_BLOCKS_P2=blocks_p2,
        num_warps=tuning.split_warps,
        **common,
    )
    _sample_kernel[(num_rows,)](
        logits,
        temperature,
        top_k,
        top_p,
        min_p,
        seeds,
        positions,
        block_max,
        block_mass,
        out,
        vocab,
        logits.stride(0),
        out.stride(0),
        num_blocks,
        BLOCK=block,
        NB=blocks_p2,
        num_warps=tuning.num_warps,
        **common,
    )
    return out


def _check_inputs(logits, temperature, top_k, top_p, min_p, seeds, positions) -> tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, vocab], got {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be one of {_DTYPES}, got {logits.dtype}")
    num_rows, vocab = logits.shape
    if not 0 < vocab <= MAX_VOCAB:
        raise ValueError(f"vocab must be in [1, {MAX_VOCAB}], got {vocab}")
    if logits.stride(1) != 1 and vocab > 1:
        raise ValueError(f"logits need a contiguous last dimension, got strides {logits.stride()}")
    per_row = {
        "temperature": (temperature, torch.float32),
        "top_k": (top_k, torch.int32),
        "top_p": (top_p, torch.float32),
        "min_p": (min_p, torch.float32),
        "seeds": (seeds, torch.int64),
        "positions": (positions, torch.int64),
    }
    for name, (value, dtype) in per_row.items():
        if (
            value.shape != (num_rows,)
            or value.dtype != dtype
            or value.device != logits.device
            or not value.is_contiguous()
        ):
            raise ValueError(
                f"{name} must be a contiguous [{num_rows}] {dtype} tensor on {logits.device}, got "
                f"{tuple(value.shape)} {value.dtype} on {value.device}, strides {value.stride()}"
            )
    return num_rows, vocab


def _check_out(out: torch.Tensor | None, num_rows: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(num_rows, dtype=torch.int64, device=device)
    if out.shape != (num_rows,) or out.dtype != torch.int64 or out.device != device:
        raise ValueError(
            f"out must be [{num_rows}] int64 on {device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


# ------------------------------------------------------------------------------------------- reference


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sample` in plain torch, on any device, with the same tokens bit for bit: vectorised over rows,
    one Python iteration per round over the rows still drawing. Synchronises (it keeps the per-row
    state on the host). Same arguments, validation and `out` contract as `sample`.

    Masses are float32 and their sums float64 (exact integers, see the module docstring). A draw finds
    its block of `_REFERENCE_BLOCK` tokens from the block sums, so a round's only full-width work is the
    pass over the tokens above the draw, which leaves the next round's block sums."""
    num_rows, _ = _check_inputs(logits, temperature, top_k, top_p, min_p, seeds, positions)
    out = _check_out(out, num_rows, logits.device)
    sampled = temperature.cpu().numpy() > 0
    rows = np.flatnonzero(sampled)
    on_device = torch.from_numpy(rows).to(logits.device)
    s, weights, masses = _reference_masses(
        logits if sampled.all() else logits.index_select(0, on_device), temperature[on_device]
    )
    block_mass = _block_sums(masses)
    cand = block_mass.sum(dim=1).cpu().numpy()
    sampled[rows[cand == 0]] = False  # rows of no mass
    if not sampled.all():  # greedy rows and rows of no mass: the first index of the raw maximum
        rest = torch.from_numpy(np.flatnonzero(~sampled)).to(logits.device)
        out[rest] = logits.index_select(0, rest).argmax(dim=1)
    live = np.flatnonzero(cand > 0)  # the rows of weights (never compacted) still drawing
    if live.size < rows.size:
        keep = torch.from_numpy(live).to(logits.device)
        s, masses, block_mass = (t.index_select(0, keep) for t in (s, masses, block_mass))
    rows, cand = rows[live], cand[live]
    k, p = top_k.cpu().numpy()[rows], top_p.cpu().numpy()[rows].astype(np.float64)
    min_weight = min_p.cpu().numpy()[rows].astype(np.float64) * _MASS_SCALE.value  # exact
    top_p_mass = p * cand
    base = _draw_base(seeds.cpu().numpy()[rows], positions.cpu().numpy()[rows])
    pivot = None  # round 0 draws among all tokens
    rnd = 0
    done_rows, done_tokens = [], []
    while rows.size:
        drawn, s_j = _reference_draw(s, masses, block_mass, cand, pivot, _round_bits(base, rnd))
        # The tokens above the draw, 1.0 where s > s_j (finite), in one pass.
        above = (s - s_j).clamp_(min=0.0).sign_()
        above_count = above.sum(dim=1).cpu().numpy()
        block_mass = _block_sums(above.mul_(masses))
        above_mass = block_mass.sum(dim=1).cpu().numpy()
        drawn = drawn.squeeze(1)
        weight_j = weights[torch.from_numpy(live).to(s.device), drawn].cpu().numpy()
        kept = (
            ((k <= 0) | (above_count < k))
            & ((p >= 1.0) | (above_mass < top_p_mass))
            & (weight_j >= min_weight)
        )
        accept = (above_count == 0) | kept
        done_rows.append(rows[accept])
        done_tokens.append(drawn.cpu().numpy()[accept])
        if accept.any():
            again = np.flatnonzero(~accept)
            on_device = torch.from_numpy(again).to(s.device)
            s, masses, block_mass, s_j = (t.index_select(0, on_device) for t in (s, masses, block_mass, s_j))
            rows, live, k, p, min_weight, top_p_mass, base, above_mass = (
                a[again] for a in (rows, live, k, p, min_weight, top_p_mass, base, above_mass)
            )
        cand, pivot = above_mass, s_j
        rnd += 1
    if done_rows:
        tokens = torch.from_numpy(np.concatenate(done_tokens)).to(out.device)
        out[torch.from_numpy(np.concatenate(done_rows)).to(out.device)] = tokens
    return out


def _reference_draw(
    s: torch.Tensor,
    masses: torch.Tensor,
    block_mass: torch.Tensor,
    cand: np.ndarray,
    pivot: torch.Tensor | None,
    bits: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's draw among its tokens above the pivot ([n, 1]; None: all tokens) of mass cand, with
    block sums block_mass: the first token whose prefix mass exceeds floor(u * cand), u = bits * 2^-24.
    Returns its index and its score, each [n, 1]."""
    cand_int, bits = cand.astype(np.int64), bits.astype(np.int64)
    target = ((cand_int >> 24) * bits + (((cand_int & 0xFFFFFF) * bits) >> 24)).astype(np.float64)
    target = torch.from_numpy(target).to(s.device)[:, None]  # exact: below 2^53
    ends = block_mass.cumsum(dim=1)
    block = torch.searchsorted(ends, target, right=True)  # [n, 1]: the first block ending above it
    before = (ends - block_mass).gather(1, block)
    cols = block * _REFERENCE_BLOCK + torch.arange(_REFERENCE_BLOCK, device=s.device)  # [n, block]
    block_s, block_m = s.gather(1, cols), masses.gather(1, cols)
    if pivot is not None:
        block_m = block_m * (block_s > pivot)
    lane = torch.searchsorted(block_m.cumsum(dim=1, dtype=torch.float64).add_(before), target, right=True)
    return cols.gather(1, lane), block_s.gather(1, lane)


_REFERENCE_BLOCK = 64  # any size gives the same tokens


def _reference_masses(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Scores s, weights w * 2^MASS_BITS and masses W (float32), each [n, vocab padded to the block with
    -inf, 0, 0]."""
    num_rows, vocab = logits.shape
    padded = triton.cdiv(vocab, _REFERENCE_BLOCK) * _REFERENCE_BLOCK
    if padded == vocab:
        s = logits / temperature[:, None]  # float32 (IEEE division)
    else:
        s = torch.full((num_rows, padded), float("-inf"), dtype=torch.float32, device=logits.device)
        torch.div(logits, temperature[:, None], out=s[:, :vocab])
    m = s.amax(dim=1, keepdim=True) if num_rows else s[:, :1]
    weights = _weights_reference(s - m.masked_fill(m == float("-inf"), 0.0))
    return s, weights, weights.trunc()


def _block_sums(x: torch.Tensor) -> torch.Tensor:
    """[n, num_blocks] float64 sums of x [n, num_blocks * _REFERENCE_BLOCK] (exact for masses)."""
    return x.view(x.shape[0], x.shape[1] // _REFERENCE_BLOCK, _REFERENCE_BLOCK).sum(
        dim=2, dtype=torch.float64
    )


def _weights_reference(d: torch.Tensor) -> torch.Tensor:
    """exp(d) * 2^MASS_BITS as `_block_masses` computes it: the same float32 operations in the same
    order (IEEE + and * commute exactly). Consumes d."""
    t = d.mul_(_LOG2E.value).clamp_(min=-127.0)
    n = t.floor()
    f = t.sub_(n)
    q = f * _C5.value
    for c in (_C4, _C3, _C2, _C1):
        q.add_(c.value).mul_(f)
    p = q.add_(1.0)
    scale = n.add_(_EXPONENT_BIAS.value).view(torch.int32).bitwise_left_shift_(23).view(torch.float32)
    return p.mul_(scale)
