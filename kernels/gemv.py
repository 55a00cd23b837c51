"""Small-batch GEMV with fused prologues and epilogues: the Triton kernels, their launchers and the
plain-torch references.

Owns y = x @ weight.T (+ bias) for 1..`MAX_TOKENS` rows of activations, the decode-time case where a step
is bound by reading the weights and by kernel launches, optionally fused with what comes before and after
the projection in a decoder layer:
  - `gemv`: the projection alone (o_proj, down_proj, lm_head);
  - `add_rms_norm_gemv`: residual add + RMSNorm, then the projection (input_layernorm + qkv_proj);
  - `add_rms_norm_gemv_silu_mul`: the same prologue, then a packed gate/up projection and SiLU-and-mul
    (post_attention_layernorm + gate_up_proj + act).
Rounding is the engine's, op for op: the norm as in `rms_norm.py` (add rounded to the dtype, statistics and
scaling in float32, the normalised value rounded, then multiplied by the norm weight and rounded again:
that rounded value enters the dot product), float32 accumulation, the projection rounded to the dtype,
then SiLU-and-mul as in `silu_mul.py`. It does not own the weights nor decide which path the model takes.

Each program owns BLOCK_N output columns for every row (rows padded to 16, the smallest `tl.dot` tile)
and walks K in BLOCK_K tiles. With a norm prologue every program first reads its rows of x and residual
over all of K for the sums of squares (a few KiB per row, L2-resident), then re-reads them tile by tile
and normalises on the fly. Optional split-K (`GemvTuning.split_k`) spreads K over more programs for
tall-skinny shapes: each split writes float32 partials and a small second kernel sums them in a fixed
order (deterministic, no atomics) and applies the epilogue.

PDL (programmatic dependent launch, Hopper+, `pdl=True`): each kernel requests its first weight tile (never
written by another kernel), then waits for the previous kernel (`gdc_wait`) before touching anything else;
after its main loop it lets the next kernel launch (`gdc_launch_dependents`). `pdl=True` raises ValueError
where `pdl_supported` is false: without CUDA, before capability 9.0, and under Triton's interpreter.

Grids depend only on shapes (CUDA-graph safe); launchers never synchronise with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from splitserve.kernels.rms_norm import rms_norm_reference
from splitserve.kernels.silu_mul import silu_and_mul_reference

MAX_TOKENS = 16  # rows of x: one 16-row tl.dot tile
BLOCK_M = 16
TARGET_PROGRAMS = 256  # default split-K aims for about two programs per SM of an H100 (132 SMs)
MIN_TILES_PER_SPLIT = 4  # ... but never splits K below this many BLOCK_K tiles per program
_REDUCE_BLOCK_N = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_HAS_PDL = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 3)  # launch_pdl


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class GemvTuning:
    """Launch knobs, the ones `benchmarks/gemv.py` sweeps. `split_k` is a request: K is cut into at most
    that many BLOCK_K-aligned slices, fewer where K is short (1: no partials, no reduce kernel)."""

    block_n: int = 16  # output columns per program (>= 16: a tl.dot tile side)
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if not (_is_power_of_2(value) and value >= 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if not (_is_power_of_2(self.num_warps) and self.num_warps <= 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"num_stages and split_k must be >= 1, got {self.num_stages}, {self.split_k}")


def default_tuning(
    num_tokens: int, out_features: int, in_features: int, *, norm: bool = False, silu: bool = False
) -> GemvTuning:
    """First guesses for an H100 from the shape alone (not yet tuned by measurement; see the benchmark).

    16 columns per program while the activation tile is mostly padding, 32 from 5 rows on so that each
    program's weight bytes outweigh its re-reads of x; K split in two until about TARGET_PROGRAMS programs
    run (the tall-skinny down/o projections), keeping MIN_TILES_PER_SPLIT tiles per split. Kernels with a
    norm prologue also stage x and residual tiles in shared memory (and gate/up two weight tiles), so they
    get one pipeline stage fewer: three programs fit an SM instead of two."""
    block_k = min(256, max(16, triton.next_power_of_2(in_features)))
    block_n = 16 if num_tokens <= 4 else 32
    num_programs = triton.cdiv(out_features, block_n)
    split_k = 1
    while (
        num_programs * split_k < TARGET_PROGRAMS
        and in_features >= 2 * split_k * MIN_TILES_PER_SPLIT * block_k
    ):
        split_k *= 2
    num_stages = 3 if norm or silu else 4
    if num_tokens == 1:
        return _one_row_tuning(out_features, in_features, num_stages)
    return GemvTuning(block_n=block_n, block_k=block_k, num_stages=num_stages, split_k=split_k)


def _one_row_tuning(out_features: int, in_features: int, num_stages: int) -> GemvTuning:
    """The one-row kernel (no tensor-core tile) wants more bytes in flight per program: long K tiles (1024
    elements up to K = 4096, else 512), 8 warps while programs are few, and K split until about
    2 × TARGET_PROGRAMS programs run (four per SM of an H100). From the H100 sweep in docs/benchmarks.md
    (`benchmarks/gemv.py --one-row`): qkv/o best at k1024 w8 no split, down at k512 split 4, lm_head at
    k1024 w4."""
    block_k = min(1024 if in_features <= 4096 else 512, max(16, triton.next_power_of_2(in_features)))
    num_programs = triton.cdiv(out_features, 16)
    split_k = 1
    while (
        num_programs * split_k < 2 * TARGET_PROGRAMS
        and in_features >= 2 * split_k * MIN_TILES_PER_SPLIT * block_k
    ):
        split_k *= 2
    num_warps = 8 if num_programs < 1024 else 4
    return GemvTuning(block_n=16, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                      split_k=split_k)  # fmt: skip


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_weight_tile(rows, offs_k, n_mask, K):
    """[BLOCK_K, BLOCK_N] slice of weight rows (K contiguous), zero past K and past the last row."""
    mask = (offs_k < K)[:, None] & n_mask[None, :]
    return tl.load(rows[None, :] + offs_k[:, None], mask=mask, other=0.0)


@triton.jit
def _residual_sum(x, residual_ptr, offs_m, offs_k, mask, stride_rm, HAS_RESIDUAL: tl.constexpr):
    """float32 x (+ residual, rounded to the input dtype as torch's add rounds)."""
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask, other=0.0)
        h = (h + r.to(tl.float32)).to(x.dtype).to(tl.float32)
    return h


@triton.jit
def _row_rstd(
    x_ptr, residual_ptr, h_ptr, offs_m, m_mask, K, eps, stride_xm, stride_rm, stride_hm, num_h_rows,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """1 / rms of every row of h = x + residual over all of K; also stores the first `num_h_rows` rows of
    h (all of them in one program, none in the others)."""
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        h = _residual_sum(x, residual_ptr, offs_m, offs_k, mask, stride_rm, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            h_mask = mask & (offs_m < num_h_rows)[:, None]
            tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :], h.to(x.dtype), mask=h_mask)
        sum_sq += tl.sum(h * h, axis=1)
    return tl.rsqrt(sum_sq / K + eps)


@triton.jit
def _activation_tile(
    x_ptr, residual_ptr, norm_weight_ptr, offs_m, m_mask, offs_k, K, rstd, stride_xm, stride_rm,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """[BLOCK_M, BLOCK_K] tile entering the dot: x, or norm_weight * rms_norm(x + residual) rounded as
    `rms_norm.py` rounds it."""
    k_mask = offs_k < K
    mask = m_mask[:, None] & k_mask[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    if HAS_NORM:
        h = _residual_sum(x, residual_ptr, offs_m, offs_k, mask, stride_rm, HAS_RESIDUAL)
        normed = (h * rstd[:, None]).to(x.dtype).to(tl.float32)
        w = tl.load(norm_weight_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        x = (w[None, :] * normed).to(x.dtype)
    return x


@triton.jit
def _mac(acc, a, w, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_DOT: tl.constexpr):
    """acc + a @ w in float32. UPCAST works around the interpreter's broken bfloat16 tl.dot: products of
    bfloat16 values are exact in float32, so the result is the tensor-core one up to summation order.
    Without USE_DOT (one row: a 16-row tensor-core tile would be 15/16 padding) the products are summed on
    the CUDA cores, in float32."""
    if not USE_DOT:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if UPCAST:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(a, w, acc, input_precision=DOT_PRECISION)


@triton.jit
def _epilogue(acc, acc_up, bias_ptr, out_ptr, offs_n, n_mask, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """float32 accumulators → out's dtype: + bias, or silu(gate) * up rounded as `silu_mul.py` rounds."""
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        gate = acc.to(dtype).to(tl.float32)  # each projection output is rounded, as a GEMV writes it
        up = acc_up.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        return (act * up).to(dtype)
    return acc.to(dtype)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, residual_ptr, norm_weight_ptr, w_ptr, bias_ptr, out_ptr, h_ptr, partial_ptr,
    M, N, K, k_per_split, up_shift, eps, stride_xm, stride_rm, stride_wn, stride_om, stride_hm,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    SPLIT: tl.constexpr, USE_PDL: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (column block, K split): out[:, block] (or float32 partials) for every row of x. With SILU
    the block is gate rows n.. and up rows n + I.. (`up_shift` = I * stride_wn elements further)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    gate_rows = w_ptr + offs_n.to(tl.int64) * stride_wn  # [BLOCK_N] row starts
    up_rows = gate_rows + up_shift
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # Weights are never written by a kernel: the first tile is requested before waiting on the previous one.
    w_gate = _load_weight_tile(gate_rows, offs_k, n_mask, K)
    w_up = w_gate
    if SILU:
        w_up = _load_weight_tile(up_rows, offs_k, n_mask, K)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x and residual are the previous kernels' outputs
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_NORM:
        num_h_rows = tl.where((pid_n == 0) & (pid_k == 0), M, 0)  # one program writes the new residual
        rstd = _row_rstd(x_ptr, residual_ptr, h_ptr, offs_m, m_mask, K, eps, stride_xm, stride_rm, stride_hm,
                         num_h_rows, HAS_RESIDUAL, BLOCK_M, BLOCK_K)  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a = _activation_tile(x_ptr, residual_ptr, norm_weight_ptr, offs_m, m_mask, offs_k, K, rstd, stride_xm,
                         stride_rm, HAS_NORM, HAS_RESIDUAL)  # fmt: skip
    USE_DOT: tl.constexpr = BLOCK_M >= 16
    acc = _mac(acc, a, w_gate, DOT_PRECISION, UPCAST, USE_DOT)
    if SILU:
        acc_up = _mac(acc_up, a, w_up, DOT_PRECISION, UPCAST, USE_DOT)
    for k in range(k_start + BLOCK_K, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        a = _activation_tile(x_ptr, residual_ptr, norm_weight_ptr, offs_m, m_mask, offs_k, K, rstd,
                             stride_xm, stride_rm, HAS_NORM, HAS_RESIDUAL)  # fmt: skip
        acc = _mac(acc, a, _load_weight_tile(gate_rows, offs_k, n_mask, K), DOT_PRECISION, UPCAST, USE_DOT)
        if SILU:
            w_up = _load_weight_tile(up_rows, offs_k, n_mask, K)
            acc_up = _mac(acc_up, a, w_up, DOT_PRECISION, UPCAST, USE_DOT)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start its weight loads
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:  # partials [num_splits, M, N] (SILU: [num_splits, M, 2 * N], gate then up columns)
        width = 2 * N if SILU else N
        part = partial_ptr + (pid_k * M + offs_m[:, None]) * width + offs_n[None, :]
        tl.store(part, acc, mask=mask)
        if SILU:
            tl.store(part + N, acc_up, mask=mask)
    else:
        y = _epilogue(acc, acc_up, bias_ptr, out_ptr, offs_n, n_mask, HAS_BIAS, SILU)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _split_k_reduce_kernel(
    partial_ptr, bias_ptr, out_ptr, M, N, num_splits, stride_om,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (column block): sums the splits' float32 partials in split order, then the epilogue."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    width = 2 * N if SILU else N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    for s in range(num_splits):
        part = partial_ptr + (s * M + offs_m[:, None]) * width + offs_n[None, :]
        acc += tl.load(part, mask=mask, other=0.0)
        if SILU:
            acc_up += tl.load(part + N, mask=mask, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    y = _epilogue(acc, acc_up, bias_ptr, out_ptr, offs_n, n_mask, HAS_BIAS, SILU)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mask)


INTERPRETED = not isinstance(_gemv_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at import


def pdl_supported(device: torch.device) -> bool:
    """Whether launches on `device` may use programmatic dependent launch: compiled Triton >= 3.3 on a
    CUDA device of compute capability >= 9.0. Never under the interpreter (it cannot run the PTX)."""
    return (
        _TRITON_HAS_PDL
        and not INTERPRETED
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


# --------------------------------------------------------------------------------------------- launchers


def _check_matching(name: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if tuple(t.shape) != shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must be {list(shape)} {like.dtype} on {like.device}, "
            f"got {tuple(t.shape)} {t.dtype} on {t.device}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")


def _check_x_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pdl: bool) -> None:
    if x.dim() != 2 or x.shape[0] > MAX_TOKENS or x.shape[1] == 0:
        raise ValueError(f"x must be [num_tokens <= {MAX_TOKENS}, in_features >= 1], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be one of {_DTYPES}, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"x needs a contiguous last dimension, got strides {x.stride()}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [out_features >= 1, {x.shape[1]}], got {tuple(weight.shape)}")
    _check_matching("weight", weight, (weight.shape[0], x.shape[1]), x)
    if bias is not None:
        _check_matching("bias", bias, (weight.shape[0],), x)
    if pdl and not pdl_supported(x.device):
        raise ValueError(
            f"pdl=True needs compiled Triton >= 3.3 on a CUDA device of capability >= 9.0 (device "
            f"{x.device}, interpreted: {INTERPRETED}, triton {triton.__version__})"
        )


def _check_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor) -> None:
    if residual is not None:
        _check_matching("residual", residual, tuple(x.shape), x)
    _check_matching("norm_weight", norm_weight, (x.shape[1],), x)


def _launch(x, residual, norm_weight, eps, weight, bias, out, h, *, silu, pdl, tuning) -> None:
    """One GEMV (+ the split-K reduce), writing `out` [M, N] (and `h` when there is a residual)."""
    M, K = x.shape
    N = out.shape[1]
    if M == 0:
        return
    tuning = tuning or default_tuning(M, N, K, norm=norm_weight is not None, silu=silu)
    k_per_split = triton.cdiv(triton.cdiv(K, tuning.split_k), tuning.block_k) * tuning.block_k
    num_splits = triton.cdiv(K, k_per_split)  # every split gets at least one K element
    split = num_splits > 1
    partial = out  # unused placeholder without split-K
    if split:
        width = 2 * N if silu else N
        partial = torch.empty(num_splits, M, width, dtype=torch.float32, device=x.device)  # [S, M, width]
    has_norm = norm_weight is not None
    block_m = 1 if M == 1 else BLOCK_M  # one row: no tensor-core tile (see `_mac`)
    pdl_kwargs = {"launch_pdl": True} if pdl else {}  # the interpreter does not take the keyword
    _gemv_kernel[(triton.cdiv(N, tuning.block_n), num_splits)](
        x, x if residual is None else residual, weight if norm_weight is None else norm_weight, weight,
        weight if bias is None else bias, out, out if h is None else h, partial,
        M, N, K, k_per_split, N * weight.stride(0) if silu else 0, eps,
        x.stride(0), 0 if residual is None else residual.stride(0), weight.stride(0), out.stride(0),
        0 if h is None else h.stride(0),
        HAS_NORM=has_norm, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        SILU=silu, SPLIT=split, USE_PDL=pdl, UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or INTERPRETED else "tf32",
        BLOCK_M=block_m, BLOCK_N=tuning.block_n, BLOCK_K=tuning.block_k,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
        enable_fp_fusion=False,  # no FMA contraction: the norm rounds as torch's separate ops do
        **pdl_kwargs,
    )  # fmt: skip
    if split:
        _split_k_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK_N),)](
            partial, weight if bias is None else bias, out, M, N, num_splits, out.stride(0),
            HAS_BIAS=bias is not None, SILU=silu, USE_PDL=pdl, BLOCK_M=block_m, BLOCK_N=_REDUCE_BLOCK_N,
            num_warps=4, enable_fp_fusion=False, **pdl_kwargs,
        )  # fmt: skip


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    pdl: bool = False,
    tuning: GemvTuning | None = None,
) -> torch.Tensor:
    """y = x @ weight.T (+ bias) in x's dtype with float32 accumulation.

    x [num_tokens <= MAX_TOKENS, K] (contiguous last dimension, any row stride), weight [N, K] and bias [N]
    in x's dtype on its device, contiguous last dimensions. Writes into `out` ([num_tokens, N], contiguous
    last dimension, any row stride; must not overlap x) or, by default, a new contiguous tensor, and
    returns it; nothing else is modified. `tuning` defaults to `default_tuning`. Raises ValueError on bad
    shapes, dtypes, devices or layouts, and on `pdl=True` where `pdl_supported` is false.
    """
    _check_x_weight(x, weight, bias, pdl)
    shape = (x.shape[0], weight.shape[0])
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)  # [num_tokens, N]
    else:
        _check_matching("out", out, shape, x)
    _launch(x, None, None, 0.0, weight, bias, out, None, silu=False, pdl=pdl, tuning=tuning)
    return out


def _new_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    # A new buffer: other programs still read `residual` while one program column writes h.
    return x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [M, K]


def add_rms_norm_gemv(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pdl: bool = False,
    tuning: GemvTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = x + residual (x itself when residual is None: the first layer), y = rms_norm(h) @
    weight.T (+ bias), with the rounding of `add_rms_norm_gemv_reference`.

    x and residual [num_tokens <= MAX_TOKENS, K] (contiguous last dimensions, any row strides), norm_weight
    [K], weight [N, K], bias [N], all of x's dtype and device. Returns y [num_tokens, N] and h, both new
    contiguous tensors (except h is x when residual is None); x and residual are not modified. Raises
    ValueError as `gemv` does.
    """
    _check_x_weight(x, weight, bias, pdl)
    _check_norm(x, residual, norm_weight)
    y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)  # [num_tokens, N]
    h = _new_residual(x, residual)
    _launch(x, residual, norm_weight, eps, weight, bias, y, None if residual is None else h,
            silu=False, pdl=pdl, tuning=tuning)  # fmt: skip
    return y, h


def add_rms_norm_gemv_silu_mul(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    *,
    pdl: bool = False,
    tuning: GemvTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(act, h): h as in `add_rms_norm_gemv`, gate/up = rms_norm(h) @ gate_up_weight.T, each rounded to the
    dtype, act = silu(gate) * up [num_tokens, I] with `silu_mul.py`'s rounding.

    gate_up_weight is packed [2 * I, K], the I gate rows first; `tuning.block_n` counts columns of act
    (each program reads block_n gate and block_n up rows). Otherwise as `add_rms_norm_gemv`.
    """
    _check_x_weight(x, gate_up_weight, None, pdl)
    if gate_up_weight.shape[0] % 2:
        raise ValueError(f"gate_up_weight must be [2 * intermediate, K], got {tuple(gate_up_weight.shape)}")
    _check_norm(x, residual, norm_weight)
    act = torch.empty(x.shape[0], gate_up_weight.shape[0] // 2, dtype=x.dtype, device=x.device)  # [M, I]
    h = _new_residual(x, residual)
    _launch(x, residual, norm_weight, eps, gate_up_weight, None, act, None if residual is None else h,
            silu=True, pdl=pdl, tuning=tuning)  # fmt: skip
    return act, h


# ------------------------------------------------------------------------------------------- references


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The engine's torch math: F.linear."""
    return F.linear(x, weight, bias)


def add_rms_norm_gemv_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rms_norm(h)), h) with h = x + residual (x when residual is None); inputs unmodified."""
    h = x if residual is None else x + residual
    return F.linear(rms_norm_reference(h, norm_weight, eps), weight, bias), h


def add_rms_norm_gemv_silu_mul_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu_and_mul(F.linear(rms_norm(h), gate_up_weight)), h), composed as the engine composes it."""
    gate_up, h = add_rms_norm_gemv_reference(x, residual, norm_weight, eps, gate_up_weight)
    return silu_and_mul_reference(gate_up), h
