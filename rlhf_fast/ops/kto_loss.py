"""`rlhf_fast.kto_loss`: KTO in one forward and one backward pass."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import kto_loss as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_batch,
    check_like,
    check_same_device,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.options import KTO_OPTIONS
from rlhf_fast.types import KTOLossOutput


class KTOLossFunction(torch.autograd.Function):
    """Autograd wrapper: the differentiable loss and the detached statistics."""

    @staticmethod
    def forward(ctx, policy_logps, ref_logps, desirable, kl_ref, cfg):
        inputs = (policy_logps, ref_logps, desirable, kl_ref)
        loss, rewards, stats = kernel.kto_forward(*inputs, cfg)
        ctx.save_for_backward(*inputs)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(rewards, stats)
        return loss, rewards, stats

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_loss, _grad_rewards, _grad_stats):
        grads = kernel.kto_backward(grad_loss.contiguous(), *ctx.saved_tensors, ctx.cfg,
                                    needs_grad=tuple(ctx.needs_input_grad[:2]))
        return (*grads, None, None, None)  # kl_ref: detached, as TRL's


@KTO_OPTIONS.keywords
def kto_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, desirable: torch.Tensor,
    kl_ref: torch.Tensor | None = None, **options: Any,
) -> KTOLossOutput:
    """KTO (Ethayarajh et al. 2024): unpaired desirable / undesirable examples against a
    reference point, one fused forward and one backward, as TRL's KTOTrainer computes it.

    With r = policy_logps - ref_logps, z = max(kl_ref, 0) (no gradient) and
    u = beta * (r - z), a desirable example's loss is desirable_weight * (1 - s(u)) and an
    undesirable one's undesirable_weight * (1 - s(-u)); "mean" is over all B examples
    (TRL's mean of the two groups' concatenated losses; TRL takes nanmean, which skips
    NaN losses: here a NaN stays NaN). Liger's LigerFusedLinearKTOLoss is the same loss
    without the group weights.

    Args:
        policy_logps: ``[B]`` log-probs of each example's answer under the policy (TRL:
            sums over the answer's tokens; Liger by default per-token means: the loss
            takes what it is given); fp32, bf16, fp16 or fp64; differentiable.
        ref_logps: ``[B]`` the same under the reference model (differentiable too when
            it requires grad, the negative of policy_logps' gradient), or None for a
            reference-free loss (log pi_ref = 0, as Liger allows).
        desirable: ``[B]`` bool, True for a desirable (chosen) example, False for an
            undesirable one (TRL's `label`, Liger's `preference_labels`).
        kl_ref: the reference point KL(pi || pi_ref) estimate (TRL's z_ref / `kl`, from
            mismatched prompt-completion pairs), a float tensor of one element (0-d or
            ``[1]``) on the batch's device; clamped at 0 and detached, as TRL does. None
            is 0: TRL's loss_type="apo_zero_unpaired" (its KL is off).
        Options: below.

    Returns:
        `KTOLossOutput`: loss (fp32, fp64 if policy_logps is fp64; differentiable),
        rewards ``[B]`` (beta * r), chosen_reward and rejected_reward (the mean reward of
        each group, NaN for an empty group), reward_margin and kl (the z used), all
        detached. Gradients come back in each input's dtype. A NaN log-prob gives its
        example a NaN loss and gradient (a NaN kl_ref: every example); the others are
        unaffected.

    Raises:
        ValueError: an empty batch (B = 0), mismatched shapes or devices, a kl_ref of
            more than one element, an out-of-range option. TypeError: wrong types.
    """
    policy_logps = check_batch("policy_logps", policy_logps)
    opt = KTO_OPTIONS.check(options)
    if ref_logps is not None:
        ref_logps = check_like("ref_logps", ref_logps, "policy_logps", policy_logps)
    desirable = check_like("desirable", desirable, "policy_logps", policy_logps,
                           (torch.bool,))
    if kl_ref is not None:
        check_tensor("kl_ref", kl_ref, FLOAT_DTYPES)
        check_same_device("kl_ref", kl_ref, "policy_logps", policy_logps)
        if kl_ref.dim() > 1 or kl_ref.numel() != 1:
            raise ValueError(
                f"kl_ref must be a 0-d or [1] tensor, got shape {tuple(kl_ref.shape)}")
        kl_ref = kl_ref.detach().reshape(1).contiguous()
    if not use_triton(policy_logps):
        return reference.kto_loss(policy_logps, ref_logps, desirable, kl_ref, **vars(opt))
    loss, rewards, stats = KTOLossFunction.apply(
        policy_logps, ref_logps, desirable, kl_ref, kernel.KTOKernelConfig.from_options(opt))
    return KTOLossOutput(loss, rewards, *stats.unbind())
