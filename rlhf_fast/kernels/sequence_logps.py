"""Masked per-sequence sums (or means) of per-token log-probs, fwd / bwd.

Math, per row r of x [R, T] with mask m (n_r = sum_t m[r, t]):

    sum:   y_r = sum_t m[r, t] x[r, t]          d x[r, t] = g_r m[r, t]
    mean:  y_r = (sum_t m[r, t] x[r, t]) / n_r  d x[r, t] = g_r m[r, t] / n_r
    n_r = 0: y_r = 0 and d x[r, :] = 0.

The forward is one program per row, reading the row once in blocks and summing in fp32
(fp64 for fp64 x); masked entries are never read. The backward writes the gradient
elementwise over a 2-D grid, reading only the mask and the row counts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import cast, mask_view, nonzero


@triton.jit
def _sequence_logps_fwd_kernel(
    x_ptr, mask_ptr, out_ptr, count_ptr, T,
    AVERAGE: tl.constexpr, FP64: tl.constexpr, BLOCK_T: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    total = tl.zeros([BLOCK_T], acc_dtype)
    count = tl.zeros([BLOCK_T], tl.int32)
    for start in range(0, T, BLOCK_T):
        offs = start + tl.arange(0, BLOCK_T)
        valid = nonzero(tl.load(mask_ptr + base + offs, mask=offs < T, other=0))
        total += tl.load(x_ptr + base + offs, mask=valid, other=0.0).to(acc_dtype)
        count += valid.to(tl.int32)
    n = tl.sum(count, axis=0)
    out = tl.sum(total, axis=0)
    if AVERAGE:
        out = tl.where(n > 0, out / tl.maximum(n, 1).to(acc_dtype), 0.0)
    tl.store(out_ptr + row, out)
    tl.store(count_ptr + row, n)


@triton.jit
def _sequence_logps_bwd_kernel(
    grad_ptr, mask_ptr, count_ptr, dx_ptr, T,
    AVERAGE: tl.constexpr, FP64: tl.constexpr, BLOCK_T: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = offs < T
    g = tl.load(grad_ptr + row).to(acc_dtype)
    if AVERAGE:
        g = g / tl.maximum(tl.load(count_ptr + row), 1).to(acc_dtype)
    valid = nonzero(tl.load(mask_ptr + row * T + offs, mask=in_row, other=0))
    dx = tl.where(valid, g, 0.0)
    tl.store(dx_ptr + row * T + offs, cast(dx, dx_ptr.dtype.element_ty), mask=in_row)


MAX_BLOCK_T = 1024


def block_size(T: int) -> int:
    """BLOCK_T for rows of length T: a function of T alone, so a row's sum does not
    depend on the other rows (batch invariance)."""
    return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(T)))


def _num_warps(block: int) -> int:
    return 4 if block >= 512 else 2


def sequence_logps_forward(
    x: torch.Tensor, mask: torch.Tensor, average: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row sums (or means) of contiguous ``x [R, T]`` over ``mask [R, T]``.

    Returns (out [R] fp32 (fp64 for fp64 x), count [R] int32 valid tokens per row).
    """
    R, T = x.shape
    fp64 = x.dtype == torch.float64
    out = torch.empty(R, dtype=torch.float64 if fp64 else torch.float32, device=x.device)
    count = torch.empty(R, dtype=torch.int32, device=x.device)
    if R == 0:
        return out, count
    if T == 0:
        return out.zero_(), count.zero_()
    block = block_size(T)
    _sequence_logps_fwd_kernel[(R,)](
        x, mask_view(mask), out, count, T,
        AVERAGE=average, FP64=fp64, BLOCK_T=block, num_warps=_num_warps(block),
    )
    return out, count


def sequence_logps_backward(
    grad: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, average: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """d x [R, T] in `dtype` from the upstream gradient ``grad [R]`` of the forward."""
    R, T = mask.shape
    dx = torch.empty((R, T), dtype=dtype, device=mask.device)
    if R == 0 or T == 0:
        return dx
    block = block_size(T)
    _sequence_logps_bwd_kernel[(R, triton.cdiv(T, block))](
        grad, mask_view(mask), count, dx, T,
        AVERAGE=average, FP64=grad.dtype == torch.float64, BLOCK_T=block,
        num_warps=_num_warps(block),
    )
    return dx
