"""`rlhf_fast.simpo_loss`: SimPO in one forward and one backward pass."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import simpo_loss as kernel
from rlhf_fast.ops.pair_losses import pair_loss, register_pair_loss
from rlhf_fast.options import SIMPO_OPTIONS
from rlhf_fast.types import SimPOLossOutput

simpo_loss_op = register_pair_loss("simpo_loss", kernel.SimPOKernelConfig,
                                   kernel.LAUNCHERS, kernel.N_STATS)


@SIMPO_OPTIONS.keywords
def simpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor, **options: Any,
) -> SimPOLossOutput:
    """SimPO (Meng et al. 2024): a reference-free pairwise loss on per-token-mean log-probs
    with a target margin, one fused forward and one backward.

    With a = policy_chosen / chosen_lengths and b = policy_rejected / rejected_lengths
    (lengths clamped to >= 1) and z = beta * (a - b) - gamma, each pair's loss is
    -(1 - eps) log s(z) - eps log s(-z), eps = label_smoothing: TRL's CPOTrainer with
    loss_type="simpo" (its simpo_gamma is gamma; it adds cpo_alpha times an NLL, which
    `cpo_loss` has and SimPO drops) and Liger's LigerFusedLinearSimPOLoss (same gamma).
    The SimPO code's gamma_beta_ratio r is gamma = r * beta. gamma = 0 is `dpo_loss` with
    loss_type="sigmoid_norm" and no reference.

    Args:
        policy_chosen, policy_rejected: ``[B]`` log-probs of each pair's chosen and
            rejected answer under the policy, sums over the answer's tokens (e.g. from
            `sequence_logps`); fp32, bf16, fp16 or fp64; differentiable.
        chosen_lengths, rejected_lengths: ``[B]`` answer lengths in tokens (int or float),
            clamped to >= 1. For log-probs that are already per-token means (TRL's and
            Liger's `average_log_prob`), pass ones. Negative or NaN lengths raise
            ValueError on CPU (on CUDA: unchecked, a NaN gives its pair a NaN loss).
        Options: below.

    Returns:
        `SimPOLossOutput`: loss (fp32, fp64 if a policy input is fp64; differentiable),
        chosen_rewards and rejected_rewards ``[B]`` (beta times each mean log-prob),
        reward_accuracy and reward_margin, all detached. Gradients come back in each
        input's dtype. A NaN input gives its pair a NaN loss and gradients (and so a NaN
        mean or sum); other pairs are unaffected.

    Raises:
        ValueError: an empty batch (B = 0), mismatched shapes or devices, bad lengths, an
            out-of-range option. TypeError: wrong types.
    """
    return pair_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
                     options, SIMPO_OPTIONS, reference.simpo_loss, kernel.SimPOKernelConfig,
                     simpo_loss_op, SimPOLossOutput)
