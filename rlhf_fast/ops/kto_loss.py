"""`rlhf_fast.kto_loss`: KTO in one forward and one backward pass."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import kto_loss as kernel
from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.kernels.dpo_loss import REDUCTION_CODES
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    check_batch,
    check_like,
    check_same_device,
    check_tensor,
    contiguous,
    differentiable_once,
    fake_grads,
    fake_loss_outputs,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import config_args, config_from_args, empty_like_absent, kernel_op
from rlhf_fast.options import KTO_OPTIONS
from rlhf_fast.types import KTOLossOutput


@kernel_op("kto_loss")
def kto_loss_op(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, desirable: torch.Tensor,
    kl_ref: torch.Tensor | None, config: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward on [B] inputs (desirable bool, kl_ref one element or None),
    `config` a `kernels.kto_loss.KTOKernelConfig` as `config_args`: (loss: 0-d or [B] for
    reduction "none", rewards [B], stats [4] = (chosen_reward, rejected_reward,
    reward_margin, kl)), fp32 (fp64 when policy_logps is fp64)."""
    return kernel.kto_forward(*contiguous(policy_logps, ref_logps, desirable, kl_ref),
                              config_from_args(kernel.KTOKernelConfig, config))


@kto_loss_op.register_fake
def _(policy_logps, ref_logps, desirable, kl_ref, config):
    cfg = config_from_args(kernel.KTOKernelConfig, config)
    return fake_loss_outputs(policy_logps, math_dtype(policy_logps),
                             cfg.reduction_code == REDUCTION_CODES["none"], 1, 4)


@kernel_op("kto_loss_backward")
def kto_loss_backward_op(
    grad_loss: torch.Tensor, policy_logps: torch.Tensor, ref_logps: torch.Tensor | None,
    desirable: torch.Tensor, kl_ref: torch.Tensor | None, config: list[float],
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients w.r.t. (policy_logps, ref_logps), each [B] in its input's dtype where
    `needs_grad` asks for it (else empty), from the upstream gradient of the loss."""
    grads = kernel.kto_backward(
        grad_loss.contiguous(), *contiguous(policy_logps, ref_logps, desirable, kl_ref),
        config_from_args(kernel.KTOKernelConfig, config), needs_grad=tuple(needs_grad))
    return tuple(empty_like_absent(policy_logps) if g is None else g for g in grads)


@kto_loss_backward_op.register_fake
def _(grad_loss, policy_logps, ref_logps, desirable, kl_ref, config, needs_grad):
    return fake_grads((policy_logps, ref_logps), needs_grad, policy_logps)


def _setup_kto_loss(ctx, inputs, output):
    *tensors, ctx.config = inputs
    ctx.save_for_backward(*tensors)
    ctx.mark_non_differentiable(*output[1:])


@differentiable_once
def _kto_loss_backward(ctx, grad_loss, _grad_rewards, _grad_stats):
    needs = list(ctx.needs_input_grad[:2])
    grads = kto_loss_backward_op(grad_loss, *ctx.saved_tensors, ctx.config, needs)
    # kl_ref: detached, as TRL's
    return (*(g if needed else None for g, needed in zip(grads, needs)), None, None, None)


kto_loss_op.register_autograd(_kto_loss_backward, setup_context=_setup_kto_loss)


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
    loss, rewards, stats = kto_loss_op(
        policy_logps, ref_logps, desirable, kl_ref,
        config_args(kernel.KTOKernelConfig.from_options(opt)))
    return KTOLossOutput(loss, rewards, *stats.unbind())
