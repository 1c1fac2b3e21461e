"""`rlhf_fast.cpo_loss`: CPO in one forward and one backward pass."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import cpo_loss as kernel
from rlhf_fast.ops.pair_losses import pair_loss, register_pair_loss
from rlhf_fast.options import CPO_OPTIONS
from rlhf_fast.types import CPOLossOutput

cpo_loss_op = register_pair_loss("cpo_loss", kernel.CPOKernelConfig,
                                 kernel.LAUNCHERS, kernel.N_STATS)


@CPO_OPTIONS.keywords
def cpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor, **options: Any,
) -> CPOLossOutput:
    """CPO (Xu et al. 2024): a reference-free pairwise loss plus the chosen answers' NLL,
    one fused forward and one backward, as TRL's CPOTrainer computes it.

    With a, b the chosen and rejected log-probs (sums; per-token means for ipo, whose
    formula TRL takes on averaged log-probs), u = beta * (a - b), each pair's term is
    sigmoid -(1 - eps) log s(u) - eps log s(-u), hinge max(0, 1 - u) or ipo
    (a - b - 1 / (2 beta))^2 (`rlhf_fast.reference.cpo_loss`), and its loss that term plus
    alpha * nll, nll = -sum(policy_chosen) / sum(chosen_lengths) the NLL per token of all
    the batch's chosen answers (TRL's cross-entropy over the chosen tokens, Liger's NLL
    term): the "mean" reduction is TRL's losses.mean() + cpo_alpha * nll_loss. Liger's
    LigerFusedLinearCPOLoss has the sigmoid type alone. TRL's AlphaPO reward shape (its
    `alpha`) is not supported; SimPO with an NLL (CPO-SimPO) is `simpo_loss` plus
    alpha * nll_loss.

    Args:
        policy_chosen, policy_rejected: ``[B]`` log-probs of each pair's chosen and
            rejected answer under the policy, sums over the answer's tokens (e.g. from
            `sequence_logps`); fp32, bf16, fp16 or fp64; differentiable.
        chosen_lengths, rejected_lengths: ``[B]`` answer lengths in tokens (int or float),
            clamped to >= 1: the NLL's token count (chosen) and ipo's averaging (both;
            the other types do not read rejected_lengths). Negative or NaN lengths raise
            ValueError on CPU (on CUDA: unchecked).
        Options: below.

    Returns:
        `CPOLossOutput`: loss (fp32, fp64 if a policy input is fp64; differentiable),
        chosen_rewards and rejected_rewards ``[B]`` (beta * a, beta * b),
        reward_accuracy, reward_margin and nll_loss, all detached. Gradients come back
        in each input's dtype. A NaN rejected log-prob gives its pair a NaN loss and
        gradients; a NaN chosen one makes the NLL NaN, so every pair's loss (with
        alpha > 0) and every chosen gradient NaN.

    Raises:
        ValueError: an empty batch (B = 0), mismatched shapes or devices, bad lengths, an
            out-of-range option. TypeError: wrong types.
    """
    return pair_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
                     options, CPO_OPTIONS, reference.cpo_loss, kernel.CPOKernelConfig,
                     cpo_loss_op, CPOLossOutput)
