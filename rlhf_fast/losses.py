"""nn.Module wrappers of the fused losses, for drop-in use in an existing trainer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhf_fast.ops.cpo_loss import cpo_loss
from rlhf_fast.ops.dpo_loss import dpo_loss
from rlhf_fast.ops.kto_loss import kto_loss
from rlhf_fast.ops.linear_token_divergence import linear_token_divergence
from rlhf_fast.ops.orpo_loss import orpo_loss
from rlhf_fast.ops.ppo_loss import ppo_loss
from rlhf_fast.ops.simpo_loss import simpo_loss
from rlhf_fast.ops.token_divergence import token_divergence
from rlhf_fast.ops.topk_token_divergence import topk_token_divergence
from rlhf_fast.options import (
    CPO_OPTIONS,
    DIVERGENCE_OPTIONS,
    DPO_OPTIONS,
    KTO_OPTIONS,
    ORPO_OPTIONS,
    PPO_OPTIONS,
    SIMPO_OPTIONS,
    TOPK_DIVERGENCE_OPTIONS,
)
from rlhf_fast.types import (
    CPOLossOutput,
    DPOLossOutput,
    KTOLossOutput,
    ORPOLossOutput,
    PPOLossOutput,
    SimPOLossOutput,
)


class PPOLoss(nn.Module):
    """`rlhf_fast.ppo_loss` with its options held by the module.

    Example::

        criterion = PPOLoss(clip_eps=0.2, kl_coef=0.05, vf_coef=0.5)
        out = criterion(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                        values=values, old_values=old_values, returns=returns)
        out.loss.backward()

    Every option of `ppo_loss` is a constructor argument, checked there (as `ppo_loss`
    would); `forward` takes the tensors and returns a `PPOLossOutput`.
    """

    @PPO_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(PPO_OPTIONS.check(options))  # fail where the module is built

    def forward(
        self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
        mask: torch.Tensor, *, ref_logp: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None, values: torch.Tensor | None = None,
        old_values: torch.Tensor | None = None, returns: torch.Tensor | None = None,
        rollout_logp: torch.Tensor | None = None,
    ) -> PPOLossOutput:
        return ppo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy,
                        values=values, old_values=old_values, returns=returns,
                        rollout_logp=rollout_logp, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DPOLoss(nn.Module):
    """`rlhf_fast.dpo_loss` with its options held by the module.

    Example::

        criterion = DPOLoss(beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
        out = criterion(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        out.loss.backward()

    Every option of `dpo_loss` is a constructor argument, checked there (as `dpo_loss`
    would); `forward` takes `dpo_loss`'s tensors (the ``[B]`` sequence log-probs, and the
    lengths, weights and sft_logps where the options read them) and returns a
    `DPOLossOutput`.
    """

    @DPO_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(DPO_OPTIONS.check(options))  # fail where the module is built

    def forward(
        self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, *,
        chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
        weights: torch.Tensor | None = None, sft_logps: torch.Tensor | None = None,
    ) -> DPOLossOutput:
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                        weights=weights, sft_logps=sft_logps, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class SimPOLoss(nn.Module):
    """`rlhf_fast.simpo_loss` with its options held by the module.

    Example::

        criterion = SimPOLoss(beta=2.0, gamma=1.0)
        out = criterion(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
        out.loss.backward()

    Every option of `simpo_loss` is a constructor argument, checked there; `forward` takes
    the ``[B]`` sequence log-probs and answer lengths and returns a `SimPOLossOutput`.
    """

    @SIMPO_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(SIMPO_OPTIONS.check(options))  # fail where the module is built

    def forward(
        self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
        chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
    ) -> SimPOLossOutput:
        return simpo_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
                          **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class CPOLoss(nn.Module):
    """`rlhf_fast.cpo_loss` with its options held by the module.

    Example::

        criterion = CPOLoss(beta=0.1, loss_type="sigmoid", alpha=1.0)
        out = criterion(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
        out.loss.backward()

    Every option of `cpo_loss` is a constructor argument, checked there; `forward` takes the
    ``[B]`` sequence log-probs and answer lengths and returns a `CPOLossOutput`.
    """

    @CPO_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(CPO_OPTIONS.check(options))  # fail where the module is built

    def forward(
        self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
        chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
    ) -> CPOLossOutput:
        return cpo_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
                    **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class ORPOLoss(nn.Module):
    """`rlhf_fast.orpo_loss` with its options held by the module.

    Example::

        criterion = ORPOLoss(beta=0.1)
        out = criterion(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
        out.loss.backward()

    Every option of `orpo_loss` is a constructor argument, checked there; `forward` takes the
    ``[B]`` sequence log-probs and answer lengths and returns a `ORPOLossOutput`.
    """

    @ORPO_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(ORPO_OPTIONS.check(options))  # fail where the module is built

    def forward(
        self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
        chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
    ) -> ORPOLossOutput:
        return orpo_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths,
                    **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class KTOLoss(nn.Module):
    """`rlhf_fast.kto_loss` with its options held by the module.

    Example::

        criterion = KTOLoss(beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)
        out = criterion(policy_logps, ref_logps, desirable, kl_ref)
        out.loss.backward()

    Every option of `kto_loss` is a constructor argument, checked there; `forward` takes
    the ``[B]`` log-probs, labels and KL estimate and returns a `KTOLossOutput`.
    """

    @KTO_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(KTO_OPTIONS.check(options))  # fail where the module is built

    def forward(
        self, policy_logps: torch.Tensor, ref_logps: torch.Tensor | None,
        desirable: torch.Tensor, kl_ref: torch.Tensor | None = None,
    ) -> KTOLossOutput:
        return kto_loss(policy_logps, ref_logps, desirable, kl_ref, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TokenDivergence(nn.Module):
    """`rlhf_fast.token_divergence` with its options held by the module.

    Example::

        criterion = TokenDivergence(divergence="jsd", beta=0.5, temperature=1.0)
        div = criterion(student_logits, teacher_logits, labels)  # [...] per token
        (div.sum() / (labels != -100).sum()).backward()

    Every option of `token_divergence` is a constructor argument, checked there; `forward`
    takes the two ``[..., V]`` logits tensors, the rows to count and `inplace_backward`,
    and returns the per-token divergence (reduce it as the trainer does).
    """

    @DIVERGENCE_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(DIVERGENCE_OPTIONS.check(options))  # fail where the module is built

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None, *, inplace_backward: bool = False,
    ) -> torch.Tensor:
        return token_divergence(student_logits, teacher_logits, labels,
                                inplace_backward=inplace_backward, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearTokenDivergence(nn.Module):
    """`rlhf_fast.linear_token_divergence` with its options held by the module.

    Example::

        criterion = LinearTokenDivergence(divergence="forward_kl")
        div = criterion(student_hidden, student.lm_head.weight, teacher_hidden,
                        teacher.lm_head.weight, labels)
        (div.sum() / (labels != -100).sum()).backward()

    Every option of `linear_token_divergence` is a constructor argument, checked there;
    `forward` takes both models' hidden states and lm_heads (the biases optional), the rows
    to count, and returns the per-token divergence.
    """

    @DIVERGENCE_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(DIVERGENCE_OPTIONS.check(options))  # fail where the module is built

    def forward(
        self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
        labels: torch.Tensor | None = None, *, student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_token_divergence(student_hidden, student_weight, teacher_hidden,
                                       teacher_weight, labels, student_bias=student_bias,
                                       teacher_bias=teacher_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class TopKTokenDivergence(nn.Module):
    """`rlhf_fast.topk_token_divergence` with its options held by the module.

    Example::

        criterion = TopKTokenDivergence(divergence="reverse_kl", tail="bucket")
        div = criterion(student_logits, teacher_topk_logp, teacher_topk_ids, labels)
        (div.sum() / (labels != -100).sum()).backward()

    Every option of `topk_token_divergence` is a constructor argument, checked there;
    `forward` takes the student's logits, the teacher's top-k log-probs and ids, the rows
    to count and `inplace_backward`, and returns the per-token divergence.
    """

    @TOPK_DIVERGENCE_OPTIONS.keywords
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = vars(TOPK_DIVERGENCE_OPTIONS.check(options))  # fail where built

    def forward(
        self, student_logits: torch.Tensor, teacher_topk_logp: torch.Tensor,
        teacher_topk_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
        inplace_backward: bool = False,
    ) -> torch.Tensor:
        return topk_token_divergence(student_logits, teacher_topk_logp, teacher_topk_ids,
                                     labels, inplace_backward=inplace_backward,
                                     **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
