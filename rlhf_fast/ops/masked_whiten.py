"""`rlhf_fast.masked_whiten`: whitening over the valid entries, fused (conventions:
`rlhf_fast.ops.gae`)."""

from __future__ import annotations

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import masked_mean as stats_kernel
from rlhf_fast.kernels import masked_whiten as kernel
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


class MaskedWhitenFunction(torch.autograd.Function):
    """Autograd wrapper of the whitening kernels. Inputs validated by `masked_whiten`."""

    @staticmethod
    def forward(ctx, x, mask, shift_mean, eps):
        flat_x = x.reshape(-1).contiguous()
        flat_m = mask.reshape(-1).contiguous()
        stats = stats_kernel.masked_row_stats(flat_x.view(1, -1), flat_m.view(1, -1), with_std=True)
        out = kernel.masked_whiten_forward(flat_x, flat_m, stats, shift_mean, eps)
        ctx.save_for_backward(flat_x, flat_m, *stats)
        ctx.shift_mean = shift_mean
        ctx.eps = eps
        return out.view(x.shape)

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        flat_x, flat_m, *stats = ctx.saved_tensors
        dx = kernel.masked_whiten_backward(
            grad.reshape(-1).contiguous(), flat_x, flat_m, tuple(stats), ctx.shift_mean, ctx.eps
        )
        return dx.view(grad.shape), None, None, None


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
    return MaskedWhitenFunction.apply(x, mask, shift_mean, eps)
