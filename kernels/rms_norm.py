"""RMSNorm and fused residual-add + RMSNorm: the Triton kernel, its launchers and the plain-torch reference.

Owns the normalisation of rows of activations, optionally preceded by the residual add, with the engine's
exact rounding steps: the add in the input dtype, the statistics and the scaling in float32, the result
cast back to the input dtype and only then multiplied by the weight in the input dtype. It does not own
the weights or decide where a norm goes in the model.

One program per row, the whole row in registers (BLOCK = next power of two of the row length, at most
`MAX_HIDDEN_SIZE`). Rows are the last dimension of a [num_tokens, hidden] or [num_tokens, heads, head_dim]
tensor with a contiguous last dimension and any other strides (e.g. per-head q/k views of a packed
projection). Grids depend only on shapes (CUDA-graph safe); launchers never synchronise with the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN_SIZE = 8192
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    num_inner,  # rows per outer index: 1 for [T, H], heads for [T, heads, H]
    stride_x_outer,
    stride_x_inner,
    stride_r_outer,
    stride_r_inner,
    stride_o_outer,
    stride_o_inner,
    hidden_size,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // num_inner
    inner = row % num_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + outer * stride_x_outer + inner * stride_x_inner
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_row = residual_ptr + outer * stride_r_outer + inner * stride_r_inner
        r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(dtype).to(tl.float32)  # the add rounds to the input dtype, as torch's does
        tl.store(r_row + cols, x.to(dtype), mask=mask)
    mean_sq = tl.sum(x * x, axis=0) / hidden_size
    normed = (x * tl.rsqrt(mean_sq + eps)).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    o_row = out_ptr + outer * stride_o_outer + inner * stride_o_inner
    tl.store(o_row + cols, (w * normed).to(dtype), mask=mask)


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(outer, inner) row strides of a [T, H] or [T, N, H] tensor."""
    return (t.stride(0), 0) if t.dim() == 2 else (t.stride(0), t.stride(1))


def _check(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must match x: got {tuple(t.shape)} {t.dtype} on {t.device}, "
            f"x is {tuple(like.shape)} {like.dtype} on {like.device}"
        )
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")


def _check_x_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(
            f"x must be [num_tokens, hidden] or [num_tokens, heads, hidden], got {tuple(x.shape)}"
        )
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be one of {_DTYPES}, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"x needs a contiguous last dimension, got strides {x.stride()}")
    if not 0 < x.shape[-1] <= MAX_HIDDEN_SIZE:
        raise ValueError(f"rows of 1..{MAX_HIDDEN_SIZE} elements are supported, got {x.shape[-1]}")
    if weight.shape != x.shape[-1:] or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"weight must be [{x.shape[-1]}] {x.dtype} on {x.device}, "
            f"got {tuple(weight.shape)} {weight.dtype} on {weight.device}"
        )
    if weight.stride(0) != 1:
        raise ValueError("weight must be contiguous")


def _launch(x, residual, weight, out, eps: float) -> None:
    hidden_size = x.shape[-1]
    num_inner = 1 if x.dim() == 2 else x.shape[1]
    num_rows = x.shape[0] * num_inner
    if num_rows == 0:
        return
    block = triton.next_power_of_2(hidden_size)
    has_residual = residual is not None
    residual = residual if has_residual else x  # unused when HAS_RESIDUAL is false
    _rms_norm_kernel[(num_rows,)](
        x,
        residual,
        weight,
        out,
        num_inner,
        *_row_strides(x),
        *_row_strides(residual),
        *_row_strides(out),
        hidden_size,
        eps,
        HAS_RESIDUAL=has_residual,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
        enable_fp_fusion=False,  # no FMA contraction: the same roundings as torch's separate ops
    )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension of x [num_tokens, hidden] or [num_tokens, heads, head_dim].

    Writes into `out` (same shape and dtype as x, contiguous last dimension, any other strides; `out=x`
    normalises in place) or, by default, into a new contiguous tensor, and returns it. x is not modified
    unless it is `out`. Raises ValueError on bad shapes, dtypes, devices or layouts.
    """
    _check_x_weight(x, weight)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [num_tokens, (heads,) hidden]
    else:
        _check("out", out, x)
    _launch(x, None, weight, out, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm, both in place: returns (x, residual) after
    `residual <- x + residual` (rounded to the input dtype) and `x <- rms_norm(residual)`.

    The caller hands over both buffers: x's old contents (the sublayer output) and residual's are
    overwritten, and the returned tensors are x and residual themselves. Shapes [num_tokens, hidden] or
    [num_tokens, heads, head_dim], equal for both, contiguous last dimensions, any other strides; x and
    residual must not overlap. Raises ValueError on bad shapes, dtypes, devices or layouts.
    """
    _check_x_weight(x, weight)
    _check("residual", residual, x)
    _launch(x, residual, weight, x, eps)
    return x, residual


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The engine's torch math, op for op (transformers' LlamaRMSNorm)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) as new tensors; the inputs are not modified."""
    residual = x + residual
    return rms_norm_reference(residual, weight, eps), residual
