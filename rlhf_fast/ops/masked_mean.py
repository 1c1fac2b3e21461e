"""`rlhf_fast.masked_mean`: the mean of the valid entries, fused (conventions:
`rlhf_fast.ops.gae`)."""

from __future__ import annotations

import math

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import masked_mean as kernel
from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_bool,
    check_int,
    check_mask_like,
    check_some_valid,
    check_tensor,
    register_masked_reduction_autograd,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import kernel_op


def rows(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """`t` as contiguous ``[R, L]`` rows: the whole tensor as one row (dim None), else its
    slices along `dim`, that dim moved last."""
    if dim is None:
        return t.reshape(1, -1).contiguous()
    return t.movedim(dim, -1).reshape(math.prod(reduced_shape(t.shape, dim)),
                                      t.shape[dim]).contiguous()


def reduced_shape(shape: torch.Size, dim: int | None) -> tuple[int, ...]:
    """The means' shape: `shape` without `dim`, () for dim None."""
    return () if dim is None else (*shape[:dim], *shape[dim + 1:])


def unrows(dx: torch.Tensor, shape: torch.Size, dim: int | None) -> torch.Tensor:
    """The inverse of `rows` for a fresh ``[R, L]`` tensor: a view of it in `shape`."""
    if dim is None:
        return dx.view(shape)
    moved = list(shape)
    moved.append(moved.pop(dim))
    return dx.view(moved).movedim(-1, dim)


@kernel_op("masked_mean")
def masked_mean_op(x: torch.Tensor, mask: torch.Tensor, dim: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, count): the means, fp32 (fp64 for fp64 x), in x's shape without `dim` (0-d
    for dim None); count ``[R]`` int64, the valid entries of each reduced slice, for the
    backward."""
    count, mean, _ = kernel.masked_row_stats(rows(x, dim), rows(mask, dim), with_std=False)
    return mean.view(reduced_shape(x.shape, dim)), count


@masked_mean_op.register_fake
def _(x, mask, dim):
    shape = reduced_shape(x.shape, dim)
    return (x.new_empty(shape, dtype=math_dtype(x)),
            x.new_empty((math.prod(shape),), dtype=torch.int64))


@kernel_op("masked_mean_backward")
def masked_mean_backward_op(grad: torch.Tensor, mask: torch.Tensor, count: torch.Tensor,
                            dim: int | None, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d x (a new tensor of mask's shape, in `dtype`: x's) from the upstream
    gradient of the means: grad / count on valid entries, 0 elsewhere."""
    dx = kernel.masked_mean_backward(grad.reshape(-1).contiguous(), rows(mask, dim), count,
                                     dtype)
    return unrows(dx, mask.shape, dim)


@masked_mean_backward_op.register_fake
def _(grad, mask, count, dim, dtype):
    length = mask.numel() if dim is None else mask.shape[dim]
    n_rows = 1 if dim is None else math.prod(reduced_shape(mask.shape, dim))
    return unrows(mask.new_empty((n_rows, length), dtype=dtype), mask.shape, dim)


register_masked_reduction_autograd(masked_mean_op, masked_mean_backward_op)


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
    mean, _ = masked_mean_op(x, mask, dim)
    return mean
