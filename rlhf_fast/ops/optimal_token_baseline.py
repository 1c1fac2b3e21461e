"""`rlhf_fast.optimal_token_baseline`: verl's optimal token baseline, one launch
(conventions: `rlhf_fast.ops.gae`)."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import optimal_token_baseline as kernel
from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_2d,
    check_int,
    check_mask_like,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import kernel_op
from rlhf_fast.options import OPTIMAL_TOKEN_BASELINE_OPTIONS


@kernel_op("optimal_token_baseline")
def optimal_token_baseline_op(
    rewards: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
    log_sum_p2: torch.Tensor, rollout_is_weights: torch.Tensor | None, group_size: int,
    handle_zero_tail: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) ``[B, T]``, fp32 (fp64 if an input is fp64). Not
    differentiable: the caller passes detached tensors."""
    return kernel.optimal_token_baseline_forward(
        rewards.contiguous(), mask.contiguous(), old_logp.contiguous(),
        log_sum_p2.contiguous(),
        None if rollout_is_weights is None else rollout_is_weights.contiguous(),
        group_size, handle_zero_tail, eps)


@optimal_token_baseline_op.register_fake
def _(rewards, mask, old_logp, log_sum_p2, rollout_is_weights, *args):
    inputs = (rewards, old_logp, log_sum_p2) + (
        () if rollout_is_weights is None else (rollout_is_weights,))
    dtype = math_dtype(*inputs)
    return (rewards.new_empty(rewards.shape, dtype=dtype),
            rewards.new_empty(rewards.shape, dtype=dtype))


@OPTIMAL_TOKEN_BASELINE_OPTIONS.keywords
def optimal_token_baseline(
    rewards: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
    log_sum_p2: torch.Tensor, group_size: int, *,
    rollout_is_weights: torch.Tensor | None = None, **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages against verl's optimal token baseline (OTB), critic-free, per position.

    Each token's return G_t (the sum of the answer's rewards from t on) against a baseline
    per position of its group: the group's returns there, weighted by each answer's path
    variance so far, W_t = sum_{j <= t} (1 - 2 pi_j + sum_k pi_k^2) (verl's proxy of the
    squared score norm): B_t = sum_i G W / (sum_i W + eps). Formula and options:
    `rlhf_fast.reference.optimal_token_baseline` (checked against verl's
    ``compute_optimal_token_baseline_advantage``). One kernel launch.

    Args:
        rewards: ``[B, T]`` float, token-level rewards (an outcome reward: on the last
            valid token).
        mask: ``[B, T]`` bool or numeric; nonzero = valid token (masked entries are never
            read).
        old_logp: ``[B, T]`` float, the rollout policy's log-prob of each sampled token.
        log_sum_p2: ``[B, T]`` float, log sum_k pi_k^2 of each position's distribution
            (``logprobs(..., return_sum_p2=True)``; verl's ``sum_pi_squared`` is its exp).
        group_size: rows per prompt (consecutive), an int >= 1 dividing B.
        rollout_is_weights: optional ``[B, T]`` float, the rollout correction's IS weights
            rho (w is scaled by rho^2, as verl).
        Options: below.

    Returns:
        ``(advantages, returns)`` ``[B, T]`` fp32 (fp64 if an input is fp64), detached,
        exactly 0 at masked positions. A NaN at a valid position reaches its group's
        positions at and before it (through the baseline); other groups never.
    """
    check_tensor("rewards", rewards, FLOAT_DTYPES)
    check_2d("rewards", rewards)
    check_mask_like(mask, "rewards", rewards)
    tensors = {"old_logp": old_logp, "log_sum_p2": log_sum_p2}
    if rollout_is_weights is not None:
        tensors["rollout_is_weights"] = rollout_is_weights
    for name, value in tensors.items():
        check_tensor(name, value, FLOAT_DTYPES)
        check_same_shape(name, value, "rewards", rewards)
        check_same_device(name, value, "rewards", rewards)
    group_size = check_int("group_size", group_size)
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_size must be an int >= 1 dividing rewards.shape[0] = "
                         f"{rewards.shape[0]}, got {group_size}")
    opt = OPTIMAL_TOKEN_BASELINE_OPTIONS.check(options)

    if not use_triton(rewards):
        with torch.no_grad():
            return reference.optimal_token_baseline(
                rewards, mask, old_logp, log_sum_p2, group_size,
                rollout_is_weights=rollout_is_weights, **vars(opt))
    return optimal_token_baseline_op(
        rewards.detach(), mask.detach(), old_logp.detach(), log_sum_p2.detach(),
        None if rollout_is_weights is None else rollout_is_weights.detach(), group_size,
        opt.handle_zero_tail, opt.eps)
