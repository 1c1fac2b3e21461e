"""`rlhf_fast.masked_whiten`: whitening over the valid entries, fused (conventions:
`rlhf_fast.ops.gae`)."""

from __future__ import annotations

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import masked_mean as stats_kernel
from rlhf_fast.kernels import masked_whiten as kernel
from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_bool,
    check_mask_like,
    check_positive,
    check_some_valid,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import kernel_op


def flat(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous 1-D tensor (the kernels whiten over every entry at once)."""
    return t.reshape(-1).contiguous()


@kernel_op("masked_whiten")
def masked_whiten_op(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(whitened, count, mean, std): whitened in x's shape, fp32 (fp64 for fp64 x); the
    statistics of the valid entries ``[1]`` each (count int64), for the backward."""
    flat_x, flat_m = flat(x), flat(mask)
    stats = stats_kernel.masked_row_stats(flat_x.view(1, -1), flat_m.view(1, -1),
                                          with_std=True)
    out = kernel.masked_whiten_forward(flat_x, flat_m, stats, shift_mean, eps)
    return (out.view(x.shape), *stats)


@masked_whiten_op.register_fake
def _(x, mask, shift_mean, eps):
    dtype = math_dtype(x)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty((1,), dtype=torch.int64),
            x.new_empty((1,), dtype=dtype), x.new_empty((1,), dtype=dtype))


@kernel_op("masked_whiten_backward")
def masked_whiten_backward_op(
    grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor,
    mean: torch.Tensor, std: torch.Tensor, shift_mean: bool, eps: float,
) -> torch.Tensor:
    """d loss / d x (a new tensor of x's shape and dtype) from the upstream gradient of
    the whitened values and the forward's statistics."""
    dx = kernel.masked_whiten_backward(flat(grad), flat(x), flat(mask), (count, mean, std),
                                       shift_mean, eps)
    return dx.view(x.shape)


@masked_whiten_backward_op.register_fake
def _(grad, x, *args):
    return x.new_empty(x.shape)


def _setup_masked_whiten(ctx, inputs, output):
    x, mask, ctx.shift_mean, ctx.eps = inputs
    _, count, mean, std = output
    ctx.save_for_backward(x, mask, count, mean, std)
    ctx.mark_non_differentiable(count, mean, std)


@differentiable_once
def _masked_whiten_backward(ctx, grad, *_grad_stats):
    return (masked_whiten_backward_op(grad, *ctx.saved_tensors, ctx.shift_mean, ctx.eps),
            None, None, None)


masked_whiten_op.register_autograd(_masked_whiten_backward, setup_context=_setup_masked_whiten)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    check_mask: bool | None = None,
) -> torch.Tensor:
    """Whiten the valid entries of `x` with their mean and std over the whole tensor. Fused.

    y = (x - mean) / sqrt(var + eps), mean and var over all valid entries, var unbiased
    (n - 1), as TRL's ``masked_whiten``; one valid entry has var 0 (TRL raises). With
    shift_mean=False the mean is added back (rescale only). Statistics in one read of the
    data (per-block count / mean / M2, Chan-merged), then one elementwise pass.
    Differentiable w.r.t. `x` through the mean and the std.

    Args:
        x: float tensor of any shape (bf16, fp16, fp32, fp64).
        mask: same shape, bool or numeric; nonzero = valid.
        shift_mean: False adds the mean back after scaling.
        eps: > 0, added to the variance.
        check_mask: raise ValueError if no entry is valid. Default: on for CPU tensors, off
            for CUDA ones (needs a device sync); unchecked, the output is all zeros.

    Returns:
        x's shape, fp32 (fp64 for fp64 x); exactly 0 at masked positions, and at every
        valid one when the valid entries are all equal (x itself with shift_mean=False).
        Finite for any finite x whose sums and differences stay within fp32 (the sum of
        squared deviations, which overflows fp32 past ~1e19, is never formed).
    """
    check_tensor("x", x, FLOAT_DTYPES)
    check_mask_like(mask, "x", x)
    shift_mean = check_bool("shift_mean", shift_mean)
    check_mask = check_bool("check_mask", check_mask, allow_none=True)
    eps = check_positive("eps", eps)
    if check_mask is not False:
        check_some_valid(mask, check_mask)

    if not use_triton(x):
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    out, *_ = masked_whiten_op(x, mask, shift_mean, eps)
    return out
