"""`rlhf_fast.orpo_loss`: ORPO in one forward and one backward pass."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import orpo_loss as kernel
from rlhf_fast.ops.pair_losses import pair_loss, register_pair_loss
from rlhf_fast.options import ORPO_OPTIONS
from rlhf_fast.types import ORPOLossOutput

orpo_loss_op = register_pair_loss("orpo_loss", kernel.ORPOKernelConfig,
                                  kernel.LAUNCHERS, kernel.N_STATS)


@ORPO_OPTIONS.keywords
def orpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor, **options: Any,
) -> ORPOLossOutput:
    """ORPO (Hong et al. 2024): the chosen answers' NLL plus an odds-ratio term per pair, one
    fused forward and one backward, as TRL's ORPOTrainer.odds_ratio_loss computes it.

    With lc, lr the per-token-mean log-probs (policy_chosen / chosen_lengths, lengths
    clamped to >= 1), log_odds = (lc - lr) - (log(1 - e^lc) - log(1 - e^lr)) (log(1 - e^x)
    computed without cancellation: log1p(-e^x) below -ln 2, log(-expm1(x)) above, as TRL's
    log1mexp; Liger's log1p(-exp(x)) loses precision as x -> 0), each pair's loss is
    nll - beta * log s(log_odds), nll = -sum(policy_chosen) / sum(chosen_lengths) the NLL
    per token of all the batch's chosen answers: the "mean" reduction is TRL's
    policy_nll_loss - losses.mean() and Liger's LigerFusedLinearORPOLoss (alpha 1).
    TRL's NLL also covers the prompt tokens (Liger's, by default, the answers only, as
    here).

    A mean log-prob of exactly 0 (a certain answer): lc = 0 gives log_odds = +inf, that
    pair's odds-ratio term 0 and the gradient's limit d/d lc = -beta e^lr / (1 - e^lr)
    (TRL's autograd gives NaN there); lr = 0 gives an infinite loss; both, or a
    positive mean log-prob, NaN.

    Args:
        policy_chosen, policy_rejected: ``[B]`` log-probs of each pair's chosen and
            rejected answer under the policy, sums over the answer's tokens (e.g. from
            `sequence_logps`); fp32, bf16, fp16 or fp64; differentiable.
        chosen_lengths, rejected_lengths: ``[B]`` answer lengths in tokens (int or float),
            clamped to >= 1: the averaging of both and the NLL's token count (chosen).
            Negative or NaN lengths raise ValueError on CPU (on CUDA: unchecked).
        Options: below.

    Returns:
        `ORPOLossOutput`: loss (fp32, fp64 if a policy input is fp64; differentiable),
        chosen_rewards and rejected_rewards ``[B]`` (beta * lc, beta * lr),
        reward_accuracy, reward_margin, nll_loss, log_odds_ratio (mean log s(log_odds))
        and log_odds_chosen (mean log_odds), all detached. Gradients come back in each
        input's dtype. A NaN rejected log-prob gives its pair a NaN loss and gradients; a
        NaN chosen one makes the NLL, so every loss and chosen gradient, NaN.

    Raises:
        ValueError: an empty batch (B = 0), mismatched shapes or devices, bad lengths, an
            out-of-range option. TypeError: wrong types.
    """
    return pair_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
                     options, ORPO_OPTIONS, reference.orpo_loss, kernel.ORPOKernelConfig,
                     orpo_loss_op, ORPOLossOutput)
