"""nn.Module wrappers of the fused losses, for drop-in use in an existing trainer."""

from __future__ import annotations

import torch
from torch import nn

from rlhf_fast.ops.dpo import check_dpo_options, dpo_loss
from rlhf_fast.ops.ppo import check_ppo_options, ppo_loss
from rlhf_fast.reference import DPOLossOutput, PPOLossOutput


class PPOLoss(nn.Module):
    """`rlhf_fast.ppo_loss` with its coefficients held by the module.

    Example::

        criterion = PPOLoss(clip_eps=0.2, kl_coef=0.05, vf_coef=0.5)
        out = criterion(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                        values=values, old_values=old_values, returns=returns)
        out.loss.backward()

    Every keyword of `ppo_loss` but the tensors is a constructor argument, validated
    there (as `ppo_loss` would); `forward` takes the tensors and returns a `PPOLossOutput`.
    """

    def __init__(
        self,
        *,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        dual_clip: float | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        entropy_coef: float = 0.0,
        value_clip: float = 0.2,
        vf_coef: float = 0.5,
        agg: str = "token-mean",
        max_len: int | None = None,
    ) -> None:
        super().__init__()
        self.options = dict(
            clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
            kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
            value_clip=value_clip, vf_coef=vf_coef, agg=agg, max_len=max_len,
        )
        check_ppo_options(**self.options)  # fail where the module is built

    def forward(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        ref_logp: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        old_values: torch.Tensor | None = None,
        returns: torch.Tensor | None = None,
    ) -> PPOLossOutput:
        return ppo_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy,
            values=values, old_values=old_values, returns=returns, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DPOLoss(nn.Module):
    """`rlhf_fast.dpo_loss` with its settings held by the module.

    Example::

        criterion = DPOLoss(beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
        out = criterion(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        out.loss.backward()

    Every keyword of `dpo_loss` but the tensors is a constructor argument, validated
    there (as `dpo_loss` would); `forward` takes the ``[B]`` sequence log-probs (and the
    lengths, for ipo and sigmoid_norm) and returns a `DPOLossOutput`.
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.options = dict(
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
            reduction=reduction,
        )
        check_dpo_options(**self.options)  # fail where the module is built

    def forward(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor | None,
        ref_rejected: torch.Tensor | None,
        *,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
    ) -> DPOLossOutput:
        return dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
