"""`rlhf_fast.masked_mean`: the mean of the valid entries, fused (conventions:
`rlhf_fast.ops.gae`)."""

from __future__ import annotations

import math

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import masked_mean as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_bool,
    check_int,
    check_mask_like,
    check_some_valid,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton


class MaskedMeanFunction(torch.autograd.Function):
    """Autograd wrapper of the masked-statistics kernels. Inputs validated by `masked_mean`."""

    @staticmethod
    def forward(ctx, x, mask, dim):
        if dim is None:
            rows_x, rows_m = x.reshape(1, -1), mask.reshape(1, -1)
            out_shape: tuple[int, ...] = ()
        else:
            rows_x, rows_m = x.movedim(dim, -1), mask.movedim(dim, -1)
            out_shape = tuple(rows_x.shape[:-1])
            n_rows = math.prod(out_shape)
            rows_x = rows_x.reshape(n_rows, x.shape[dim])
            rows_m = rows_m.reshape(n_rows, x.shape[dim])
        rows_x, rows_m = rows_x.contiguous(), rows_m.contiguous()
        count, mean, _ = kernel.masked_row_stats(rows_x, rows_m, with_std=False)
        ctx.save_for_backward(rows_m, count)
        ctx.dim = dim
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        return mean.view(out_shape)

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        rows_m, count = ctx.saved_tensors
        dx = kernel.masked_mean_backward(grad.reshape(-1).contiguous(), rows_m, count, ctx.x_dtype)
        if ctx.dim is None:
            return dx.view(ctx.x_shape), None, None
        moved = list(ctx.x_shape)
        moved.append(moved.pop(ctx.dim))
        return dx.view(moved).movedim(-1, ctx.dim), None, None


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    *,
    check_mask: bool | None = None,
) -> torch.Tensor:
    """Mean of the valid entries of `x`: over the whole tensor, or along `dim`. Fused.

    One read of x and mask (per-block count / mean, merged in a second tiny launch);
    differentiable w.r.t. `x` (gradient g / n on valid entries, 0 elsewhere, in x's dtype).

    Args:
        x: float tensor of any shape (bf16, fp16, fp32, fp64).
        mask: same shape, bool or numeric; nonzero = valid. Masked entries of x are never
            read into the result (a NaN there does not leak, nor into the gradient).
        dim: None (all valid entries of x) or the dim to reduce (removed from the shape).
        check_mask: with dim=None, raise ValueError if no entry is valid. Default: on for
            CPU tensors, off for CUDA ones (needs a device sync); unchecked, the result is
            NaN. Along a `dim`, a slice with no valid entry is always NaN.

    Returns:
        fp32 (fp64 for fp64 x): a 0-d tensor (dim=None) or x's shape without `dim`.
    """
    check_tensor("x", x, FLOAT_DTYPES)
    check_mask_like(mask, "x", x)
    check_mask = check_bool("check_mask", check_mask, allow_none=True)
    if dim is not None:
        dim = check_int("dim", dim)
        if x.dim() == 0 or not -x.dim() <= dim < x.dim():
            raise ValueError(
                f"dim must be None or in [{-x.dim()}, {x.dim()}) for x of shape "
                f"{tuple(x.shape)}, got {dim}"
            )
        dim %= x.dim()
    elif check_mask is not False:
        check_some_valid(mask, check_mask)

    if not use_triton(x):
        return reference.masked_mean(x, mask, dim)
    return MaskedMeanFunction.apply(x, mask, dim)
