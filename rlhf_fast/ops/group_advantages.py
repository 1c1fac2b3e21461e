"""`rlhf_fast.group_advantages`: critic-free (GRPO) advantages within groups of one prompt
(conventions: `rlhf_fast.ops.gae`)."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import group_advantages as kernel
from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_int,
    check_same_device,
    check_tensor,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import kernel_op
from rlhf_fast.options import GROUP_ADVANTAGE_OPTIONS


@kernel_op("group_advantages")
def group_advantages_op(
    scores: torch.Tensor, group_size: int, estimator: str, scale: str | None, eps: float,
    lengths: torch.Tensor | None, baselines: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """The advantages ``[B]``, fp32 (fp64 for fp64 scores), of `scores` (``[B]``, ``[B, K]``
    for gdpo) for the checked options: one kernel launch (gpg and scale "batch": after a
    torch reduction; remax: a subtraction). Not differentiable: the caller passes
    detached tensors."""
    dtype = math_dtype(scores)
    if estimator == "gdpo":  # every reward's column at once: [K, B] is K * B / n groups of n
        per_reward = kernel.group_advantages_forward(
            scores.T.contiguous().view(-1), group_size, "grpo", scale, eps)
        per_reward = per_reward.view(scores.shape[1], scores.shape[0])
        return per_reward.sum(0) if weights is None else (
            weights.to(dtype)[:, None] * per_reward).sum(0)
    if estimator == "remax":
        return scores.to(dtype) - baselines.to(dtype)
    if estimator == "reinforce_plus_plus_baseline":
        estimator, scale = "grpo", None
    return kernel.group_advantages_forward(
        scores.contiguous(), group_size, estimator, scale, eps,
        None if lengths is None else lengths.contiguous(),
        _batch_statistic(scores, estimator, scale))


@group_advantages_op.register_fake
def _(scores, *args):
    return scores.new_empty(scores.shape[:1], dtype=math_dtype(scores))


@GROUP_ADVANTAGE_OPTIONS.keywords
def group_advantages(
    scores: torch.Tensor, group_size: int, *, lengths: torch.Tensor | None = None,
    baselines: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """Critic-free (outcome) advantages: each score against its group's baseline.

    Groups are `group_size` consecutive entries (the samples of one prompt). The
    estimators, verl's names, each formula in `rlhf_fast.reference.group_advantages`:
    grpo (scale "std": (s - mean) / (std + eps) with the unbiased std as ``torch.std``;
    "batch": the batch's std; None: s - mean, Dr. GRPO), rloo, opo (needs `lengths`),
    grpo_passk, gpg, reinforce_plus_plus_baseline (s - mean; whiten it over the tokens
    with `masked_whiten`), remax (needs `baselines`), gdpo (``scores [B, K]``, one column
    per reward, each column's grpo advantage summed with `weights`; whiten the sum over
    the tokens as verl). A group of one has advantage 0.
    One kernel launch (gpg and scale="batch": one torch reduction before it, no host sync;
    remax: one subtraction).

    Args:
        scores: ``[B]`` float (bf16, fp16, fp32, fp64), B a multiple of `group_size`;
            ``[B, K]`` for gdpo.
        group_size: samples per prompt, an int >= 1 dividing B.
        lengths: ``[B]`` float or int, each answer's length (opo).
        baselines: ``[B]`` float, the greedy answer's score of each sample's prompt (remax).
        weights: ``[K]`` float, gdpo's weight of each reward (None: 1 each).
        Options: below.

    Returns:
        ``[B]`` fp32 (fp64 for fp64 scores), detached. A group of equal scores gives
        exactly 0 (not a rounded mean's residue over a std as small). A NaN in a group
        gives NaN for that group only (for every group with gpg or scale="batch", which
        read the batch). Finite for any finite scores whose group sums and differences
        stay within fp32 (the sum of squared deviations, which overflows fp32 past ~1e19,
        is never formed).
    """
    check_tensor("scores", scores, FLOAT_DTYPES)
    gdpo = options.get("estimator") == "gdpo"
    if scores.dim() != (2 if gdpo else 1):
        expected = "[B, K] (one column per reward) for gdpo" if gdpo else "[B]"
        raise ValueError(f"scores must have shape {expected}, got {tuple(scores.shape)}")
    group_size = check_int("group_size", group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"group_size must divide the number of scores: scores.shape[0] = "
            f"{scores.shape[0]} is not a multiple of group_size = {group_size}"
        )
    opt = GROUP_ADVANTAGE_OPTIONS.check(options)
    lengths = _per_score("lengths", lengths, scores, opt.estimator == "opo",
                         FLOAT_DTYPES + INDEX_DTYPES)
    baselines = _per_score("baselines", baselines, scores, opt.estimator == "remax",
                           FLOAT_DTYPES)
    if gdpo:
        weights = _gdpo_weights(weights, scores, opt)
    scores = scores.detach()
    if not use_triton(scores):
        with torch.no_grad():
            return reference.group_advantages(scores, group_size, lengths=lengths,
                                              baselines=baselines, weights=weights,
                                              **vars(opt))
    return group_advantages_op(scores, group_size, opt.estimator, opt.scale, opt.eps,
                               lengths, baselines, weights if gdpo else None)


def _per_score(name: str, value: torch.Tensor | None, scores: torch.Tensor, needed: bool,
               dtypes: tuple[torch.dtype, ...]) -> torch.Tensor | None:
    """An estimator's extra ``[B]`` input: checked, contiguous; required by `needed`."""
    if value is None:
        if needed:
            raise ValueError(f"{name} is required for this estimator")
        return None
    check_tensor(name, value, dtypes)
    check_same_device(name, value, "scores", scores)
    if value.shape != scores.shape:
        raise ValueError(f"{name} must have scores' shape {tuple(scores.shape)}, got "
                         f"{tuple(value.shape)}")
    return value.detach().contiguous()


def _gdpo_weights(weights: torch.Tensor | None, scores: torch.Tensor, opt: Any
                  ) -> torch.Tensor | None:
    if opt.scale == "batch":
        raise ValueError('scale must be "std" or None for estimator "gdpo" (each reward is '
                         "normalised within its groups), got 'batch'")
    if weights is None:
        return None
    check_tensor("weights", weights, FLOAT_DTYPES)
    check_same_device("weights", weights, "scores", scores)
    if weights.shape != scores.shape[1:]:
        raise ValueError(f"weights must have shape [K] = {tuple(scores.shape[1:])}, got "
                         f"{tuple(weights.shape)}")
    return weights.detach()


def _batch_statistic(scores: torch.Tensor, estimator: str, scale: str | None
                     ) -> torch.Tensor | None:
    """The 0-d batch statistic the kernel reads: gpg's alpha, or the batch's std."""
    dtype = math_dtype(scores)
    if estimator == "gpg":
        return scores.numel() / torch.count_nonzero(scores).clamp(min=1).to(dtype)
    if scale == "batch" and estimator in ("grpo", "grpo_passk"):
        if scores.numel() < 2:
            return torch.zeros((), dtype=dtype, device=scores.device)
        return scores.to(dtype).std()
    return None
