"""Masked whiten: (x - mean) / sqrt(std^2 + eps) over the valid entries, from the masked
statistics of `masked_mean` (one read), then one elementwise pass. The backward reads
(grad, x, mask) twice: per-block sums of g and g * xhat, then the elementwise gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import (
    cast,
    fp64_arg,
    mask_view,
    math_dtype,
    nonzero,
    num_warps,
    split_fp64,
)
from rlhf_fast.kernels.masked_mean import STATS_BLOCK


@triton.jit
def _whiten_stats(count_ptr, mean_ptr, std_ptr, eps_hi, eps_lo):
    mean = tl.load(mean_ptr)
    count = tl.load(count_ptr).to(mean.dtype)
    # 1 / sqrt(std^2 + eps) with std^2 never formed (it overflows fp32 past std ~ 1e19):
    # both terms scaled by the larger of std and sqrt(eps).
    std = tl.load(std_ptr)
    root_eps = tl.sqrt(fp64_arg(eps_hi, eps_lo, mean.dtype))
    big = tl.maximum(std, root_eps)
    rstd = 1.0 / (big * tl.sqrt((std / big) * (std / big) + (root_eps / big) * (root_eps / big)))
    return count, mean, rstd


@triton.jit
def _whiten_fwd_kernel(
    x_ptr, mask_ptr, count_ptr, mean_ptr, std_ptr, out_ptr, N, eps_hi, eps_lo,
    SHIFT_MEAN: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = nonzero(tl.load(mask_ptr + offs, mask=inside, other=0))
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    _, mean, rstd = _whiten_stats(count_ptr, mean_ptr, std_ptr, eps_hi, eps_lo)
    y = (x - mean) * rstd
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=inside)


@triton.jit
def _whiten_bwd_partial_kernel(
    g_ptr, x_ptr, mask_ptr, count_ptr, mean_ptr, std_ptr, part_ptr, N, n_parts, eps_hi, eps_lo,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    part = tl.program_id(0)
    offs = part.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = nonzero(tl.load(mask_ptr + offs, mask=inside, other=0))
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    _, mean, rstd = _whiten_stats(count_ptr, mean_ptr, std_ptr, eps_hi, eps_lo)
    g = tl.where(valid, g, 0.0)
    xhat = tl.where(valid, (x - mean) * rstd, 0.0)
    tl.store(part_ptr + part, tl.sum(g, axis=0))
    tl.store(part_ptr + n_parts + part, tl.sum(g * xhat, axis=0))


@triton.jit
def _whiten_bwd_kernel(
    g_ptr, x_ptr, mask_ptr, count_ptr, mean_ptr, std_ptr, sums_ptr, dx_ptr, N, eps_hi, eps_lo,
    SHIFT_MEAN: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    valid = nonzero(tl.load(mask_ptr + offs, mask=inside, other=0))
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    count, mean, rstd = _whiten_stats(count_ptr, mean_ptr, std_ptr, eps_hi, eps_lo)
    g_mean = tl.load(sums_ptr) / tl.maximum(count, 1.0)
    gx_term = tl.load(sums_ptr + 1) / tl.maximum(count - 1.0, 1.0)
    xhat = (x - mean) * rstd
    # d/dx_i of (x - mean) / sqrt(var + eps) with var = sum (x - mean)^2 / (n - 1).
    dx = rstd * (g - g_mean - xhat * gx_term)
    if not SHIFT_MEAN:
        dx += g_mean
    dx = tl.where(valid, dx, 0.0)
    tl.store(dx_ptr + offs, cast(dx, dx_ptr.dtype.element_ty), mask=inside)



# ----------------------------------------------------------------- launchers

def masked_whiten_forward(
    x: torch.Tensor,
    mask: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    shift_mean: bool,
    eps: float,
) -> torch.Tensor:
    """Whitened contiguous flat ``x [N]`` from its (count, mean, std) ``[1]`` each; fp32 (fp64
    for fp64 x); 0 where ``mask [N]`` is 0."""
    (N,) = x.shape
    out = torch.empty(N, dtype=math_dtype(x), device=x.device)
    if N == 0:
        return out
    _whiten_fwd_kernel[(triton.cdiv(N, STATS_BLOCK),)](
        x, mask_view(mask), *stats, out, N, *split_fp64(float(eps)),
        SHIFT_MEAN=shift_mean, FP64=out.dtype == torch.float64,
        BLOCK=STATS_BLOCK, num_warps=num_warps(STATS_BLOCK),
    )
    return out


def masked_whiten_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    shift_mean: bool,
    eps: float,
) -> torch.Tensor:
    """Gradient w.r.t. flat ``x [N]`` (in x's dtype) of masked_whiten, from ``grad [N]``.

    Two reads of (grad, x, mask): per-block sums of g and g * xhat over valid entries (summed
    in torch, a few hundred numbers), then the elementwise gradient.
    """
    (N,) = x.shape
    dx = torch.empty(N, dtype=x.dtype, device=x.device)
    if N == 0:
        return dx
    n_parts = triton.cdiv(N, STATS_BLOCK)
    fp64 = math_dtype(x) == torch.float64
    parts = torch.empty((2, n_parts), dtype=math_dtype(x), device=x.device)
    mask = mask_view(mask)
    _whiten_bwd_partial_kernel[(n_parts,)](
        grad, x, mask, *stats, parts, N, n_parts, *split_fp64(float(eps)),
        FP64=fp64, BLOCK=STATS_BLOCK, num_warps=num_warps(STATS_BLOCK),
    )
    sums = parts.sum(dim=1)
    _whiten_bwd_kernel[(n_parts,)](
        grad, x, mask, *stats, sums, dx, N, *split_fp64(float(eps)),
        SHIFT_MEAN=shift_mean, FP64=fp64, BLOCK=STATS_BLOCK, num_warps=num_warps(STATS_BLOCK),
    )
    return dx
