"""`rlhf_fast.sequence_logps`: masked per-sequence sums (or means) of token log-probs."""

from __future__ import annotations

import math

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import sequence_logps as kernel
from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    MASK_DTYPES,
    check_bool,
    check_same_device,
    check_same_shape,
    check_tensor,
    register_masked_reduction_autograd,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import kernel_op


def rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` as contiguous ``[R, T]`` rows."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]).contiguous()


@kernel_op("sequence_logps")
def sequence_logps_op(token_logp: torch.Tensor, mask: torch.Tensor, average: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, count): the sums (means) ``[...]``, fp32 (fp64 for fp64 token_logp); count
    ``[R]`` int32, each row's valid tokens, for the backward."""
    out, count = kernel.sequence_logps_forward(rows(token_logp), rows(mask), average)
    return out.view(token_logp.shape[:-1]), count


@sequence_logps_op.register_fake
def _(token_logp, mask, average):
    shape = token_logp.shape[:-1]
    return (token_logp.new_empty(shape, dtype=math_dtype(token_logp)),
            token_logp.new_empty((math.prod(shape),), dtype=torch.int32))


@kernel_op("sequence_logps_backward")
def sequence_logps_backward_op(grad: torch.Tensor, mask: torch.Tensor, count: torch.Tensor,
                               average: bool, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d token_logp (a new tensor of mask's shape, in `dtype`: token_logp's) from
    the upstream gradient of the sums."""
    dx = kernel.sequence_logps_backward(grad.reshape(-1).contiguous(), rows(mask), count,
                                        average, dtype)
    return dx.view(mask.shape)


@sequence_logps_backward_op.register_fake
def _(grad, mask, count, average, dtype):
    return mask.new_empty(mask.shape, dtype=dtype)


register_masked_reduction_autograd(sequence_logps_op, sequence_logps_backward_op)


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
    out, _ = sequence_logps_op(token_logp, mask, average)
    return out
