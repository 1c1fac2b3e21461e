"""`rlhf_fast.sequence_logps`: masked per-sequence sums (or means) of token log-probs."""

from __future__ import annotations

import math

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import sequence_logps as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_bool,
    check_same_device,
    check_same_shape,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton


class SequenceLogpsFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels. Inputs validated by `sequence_logps`."""

    @staticmethod
    def forward(ctx, token_logp, mask, average):
        n_rows, T = math.prod(token_logp.shape[:-1]), token_logp.shape[-1]
        rows_x = token_logp.reshape(n_rows, T).contiguous()
        rows_m = mask.reshape(n_rows, T).contiguous()
        out, count = kernel.sequence_logps_forward(rows_x, rows_m, average)
        ctx.save_for_backward(rows_m, count)
        ctx.average = average
        ctx.shape = token_logp.shape
        ctx.dtype = token_logp.dtype
        return out.view(token_logp.shape[:-1])

    @staticmethod
    @differentiable_once
    def backward(ctx, grad):
        rows_m, count = ctx.saved_tensors
        dx = kernel.sequence_logps_backward(
            grad.reshape(-1).contiguous(), rows_m, count, ctx.average, ctx.dtype
        )
        return dx.view(ctx.shape), None, None


def sequence_logps(
    token_logp: torch.Tensor, mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Sum (or mean) of each sequence's valid per-token log-probs, fused, differentiable.

    With `rlhf_fast.logprobs` this gives the log-prob of every answer of a DPO batch from
    the logits: ``sequence_logps(logprobs(logits[:, :-1], labels[:, 1:]), mask[:, 1:])``.

    Args:
        token_logp: ``[..., T]`` per-token log-probs (fp32, bf16, fp16 or fp64).
        mask: ``[..., T]`` bool or numeric, nonzero = a token of the answer. Masked
            entries are never read (a NaN there reaches neither output nor gradient).
        average: False for the sum over valid tokens, True for their mean.

    Returns:
        ``[...]`` fp32 (fp64 for fp64 input). A sequence with no valid token gives 0, and
        its gradient is 0. The gradient w.r.t. token_logp is in token_logp's dtype.
    """
    check_tensor("token_logp", token_logp, FLOAT_DTYPES)
    if token_logp.dim() == 0:
        raise ValueError("token_logp must have shape [..., T] with at least one dim, got []")
    check_tensor("mask", mask, MASK_DTYPES)
    check_same_device("mask", mask, "token_logp", token_logp)
    check_same_shape("mask", mask, "token_logp", token_logp)
    check_bool("average", average)
    if not use_triton(token_logp):
        return reference.sequence_logps(token_logp, mask, average=average)
    return SequenceLogpsFunction.apply(token_logp, mask, average)
