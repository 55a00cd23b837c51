"""SiLU-and-mul, the gated MLP activation: the Triton kernel, its launcher and the plain-torch reference.

Owns `silu(gate) * up` for a packed [num_tokens, 2 * intermediate] gate/up projection (gate first), with
torch's rounding: the SiLU computed in float32 and rounded to the input dtype, then the product rounded
again. It does not own the projections around it.

Grid (num_tokens, blocks of the intermediate dimension); it depends only on shapes (CUDA-graph safe), and
the launcher never synchronises with the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, intermediate_size, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    dtype = x_ptr.dtype.element_ty
    x_row = x_ptr + row * stride_x
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    # torch's silu is x / (1 + exp(-x)) in float32, rounded to the input dtype before the product.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [num_tokens, 2 * intermediate] (gate then up; contiguous last dimension, any row stride) →
    silu(gate) * up [num_tokens, intermediate].

    Writes into `out` ([num_tokens, intermediate], x's dtype, contiguous last dimension, any row stride;
    must not overlap x) or, by default, into a new contiguous tensor, and returns it. x is not modified.
    Raises ValueError on bad shapes, dtypes, devices or layouts.
    """
    if x.dim() != 2 or x.shape[1] % 2 != 0:
        raise ValueError(f"x must be [num_tokens, 2 * intermediate], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be one of {_DTYPES}, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"x needs a contiguous last dimension, got strides {x.stride()}")
    num_tokens, intermediate_size = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, intermediate_size, dtype=x.dtype, device=x.device)  # [T, I]
    elif (
        out.shape != (num_tokens, intermediate_size)
        or out.dtype != x.dtype
        or out.device != x.device
        or out.stride(1) != 1
    ):
        raise ValueError(
            f"out must be [{num_tokens}, {intermediate_size}] {x.dtype} on {x.device} with a contiguous "
            f"last dimension, got {tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}"
        )
    if out.numel() == 0:
        return out
    block = min(_MAX_BLOCK, triton.next_power_of_2(intermediate_size))
    grid = (num_tokens, triton.cdiv(intermediate_size, block))
    _silu_and_mul_kernel[grid](
        x,
        out,
        intermediate_size,
        x.stride(0),
        out.stride(0),
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """The engine's torch math: F.silu(gate) * up in the input dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
