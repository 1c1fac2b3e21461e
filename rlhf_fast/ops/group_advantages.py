"""`rlhf_fast.group_advantages`: critic-free (GRPO) advantages within groups of one prompt
(conventions: `rlhf_fast.ops.gae`)."""

from __future__ import annotations

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import group_advantages as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_int,
    check_positive,
    check_tensor,
)
from rlhf_fast.ops.dispatch import use_triton


def group_advantages(
    scores: torch.Tensor, group_size: int, *, scale: str | None = "std", eps: float = 1e-6
) -> torch.Tensor:
    """Critic-free (GRPO) advantages: scores normalised within groups of one prompt.

    Groups are `group_size` consecutive entries. scale="std":
    A_i = (s_i - mean_g) / (std_g + eps), with the unbiased (n - 1) std as ``torch.std``
    (what GRPO implementations use); a group of one has std 0 and advantage 0 (torch.std
    would give NaN). scale=None: A_i = s_i - mean_g (Dr. GRPO). One kernel launch.

    Args:
        scores: ``[B]`` float (bf16, fp16, fp32, fp64), B a multiple of `group_size`.
        group_size: samples per prompt, an int >= 1 dividing B.
        scale: "std" or None.
        eps: added to the std, > 0 (checked even with scale=None).

    Returns:
        ``[B]`` fp32 (fp64 for fp64 scores), detached. A group of equal scores gives
        exactly 0 (not a rounded mean's residue over a std as small). A NaN in a group
        gives NaN for that group only. Finite for any finite scores whose group sums
        and differences stay within fp32 (the sum of squared deviations, which overflows
        fp32 past ~1e19, is never formed).
    """
    check_tensor("scores", scores, FLOAT_DTYPES)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape [B], got {tuple(scores.shape)}")
    group_size = check_int("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size must divide the number of scores: scores.shape[0] = "
            f"{scores.shape[0]} is not a multiple of group_size = {group_size}"
        )
    if scale not in ("std", None):
        raise ValueError(f'scale must be "std" or None, got {scale!r}')
    eps = check_positive("eps", eps)

    if not use_triton(scores):
        with torch.no_grad():
            return reference.group_advantages(scores, group_size, scale=scale, eps=eps)
    return kernel.group_advantages_forward(
        scores.detach().contiguous(), group_size, scale == "std", eps
    )
