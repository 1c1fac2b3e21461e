"""`rlhf_fast.dpo_loss`: pairwise preference losses in one forward and one backward pass."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import dpo_loss as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_same_shape,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.options import DPO_OPTIONS
from rlhf_fast.types import (
    DPO_LENGTH_NORMALISED_TYPES,
    DPO_REFERENCE_FREE_TYPES,
    DPO_SORTED_TYPES,
    DPOLossOutput,
)


class DPOLossFunction(torch.autograd.Function):
    """Autograd wrapper: the differentiable loss and the detached statistics."""

    @staticmethod
    def forward(ctx, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                chosen_lengths, rejected_lengths, cfg):
        inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                  chosen_lengths, rejected_lengths)
        loss, chosen_rewards, rejected_rewards, stats = kernel.dpo_forward(*inputs, cfg)
        ctx.save_for_backward(*inputs)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, stats)
        return loss, chosen_rewards, rejected_rewards, stats

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_loss, _grad_chosen, _grad_rejected, _grad_stats):
        grads = kernel.dpo_backward(
            grad_loss.contiguous(), *ctx.saved_tensors, ctx.cfg,
            needs_grad=tuple(ctx.needs_input_grad[:4]),
        )
        return (*grads, None, None, None)


def _check_pair_input(name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    check_tensor(name, value, FLOAT_DTYPES)
    check_same_device(name, value, "policy_chosen", like)
    check_same_shape(name, value, "policy_chosen", like)
    return value.contiguous()


@DPO_OPTIONS.keywords
def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, *,
    chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
    **options: Any,
) -> DPOLossOutput:
    """DPO and its pairwise relatives on sequence log-probs: one fused forward, one backward.

    With a = policy_chosen - ref_chosen and b = policy_rejected - ref_rejected (the
    log-ratios of the chosen and the rejected answer), delta = a - b and u = beta * delta:
    "sigmoid" is -log s(u) (DPO; with label_smoothing eps, conservative DPO
    -(1 - eps) log s(u) - eps log s(-u)). Every type's formula and source:
    `rlhf_fast.reference.dpo_loss`. log s(x) is computed as -softplus(-x): finite for
    margins of any size.

    Args:
        policy_chosen, policy_rejected: ``[B]`` log-probs of each pair's chosen and
            rejected answer under the policy (sums over the answer's tokens, e.g. from
            `sequence_logps`); fp32, bf16, fp16 or fp64; differentiable.
        ref_chosen, ref_rejected: ``[B]`` the same under the reference model, or both
            None for a reference-free loss (log pi_ref = 0), allowed for the types whose
            loss depends only on delta: sigmoid, ipo, hinge, robust, exo_pair,
            sigmoid_norm. Differentiable too when they require grad.
        chosen_lengths, rejected_lengths: ``[B]`` answer lengths in tokens (int or float),
            required by the length-normalised types ipo and sigmoid_norm (all four
            log-probs are divided by them, clamped to >= 1) and rejected by the others.
            Negative or NaN lengths raise ValueError on CPU (on CUDA the check would
            need a device sync: negative ones are clamped to 1 like 0, a NaN one gives
            its pair a NaN loss).
        Options: below; beta, at least fp32's smallest normal (1.2e-38).

    Returns:
        `DPOLossOutput`: loss (fp32, fp64 if a policy input is fp64; differentiable),
        chosen_rewards and rejected_rewards ``[B]`` (beta times each log-ratio, on the
        log-probs the loss sees), reward_accuracy (fraction of pairs with chosen reward >
        rejected reward) and reward_margin (mean of their difference), all detached.
        Gradients come back in each input's dtype. A NaN input gives a NaN loss for its
        pair (and so for a mean or sum) and, every loss type alike, a NaN gradient for
        it and for the inputs its loss terms couple it with; other pairs are unaffected.

    Raises:
        ValueError: an empty batch (B = 0), mismatched shapes or devices, an unknown
            loss_type or reduction, an out-of-range beta or label_smoothing, or a missing
            or superfluous reference or lengths argument. TypeError: wrong types.
    """
    check_tensor("policy_chosen", policy_chosen, FLOAT_DTYPES)
    if policy_chosen.dim() != 1 or policy_chosen.shape[0] == 0:
        raise ValueError(
            f"policy_chosen must have shape [B] with B >= 1, got {tuple(policy_chosen.shape)}"
        )
    opt = DPO_OPTIONS.check(options)
    loss_type = opt.loss_type

    policy_chosen = policy_chosen.contiguous()
    policy_rejected = _check_pair_input("policy_rejected", policy_rejected, policy_chosen)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("ref_chosen and ref_rejected must both be tensors or both be None")
    if ref_chosen is None and loss_type not in DPO_REFERENCE_FREE_TYPES:
        raise ValueError(
            f"ref_chosen and ref_rejected are required for loss_type {loss_type!r}; "
            f"reference-free (None) works for {DPO_REFERENCE_FREE_TYPES}"
        )
    if ref_chosen is not None:
        ref_chosen = _check_pair_input("ref_chosen", ref_chosen, policy_chosen)
        ref_rejected = _check_pair_input("ref_rejected", ref_rejected, policy_chosen)

    lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    if loss_type in DPO_LENGTH_NORMALISED_TYPES:
        for name, value in lengths.items():
            if value is None:
                raise ValueError(f"{name} is required for loss_type {loss_type!r}, got None")
            check_tensor(name, value, INDEX_DTYPES + FLOAT_DTYPES)
            check_same_device(name, value, "policy_chosen", policy_chosen)
            check_same_shape(name, value, "policy_chosen", policy_chosen)
            # not (>= 0) catches NaN too, which `< 0` lets through. On CUDA: a device sync.
            if not value.is_cuda and bool((bad := ~(value >= 0)).any()):
                raise ValueError(
                    f"{name} must be token counts >= 0, found {value[bad][0].item()}"
                )
        chosen_lengths = chosen_lengths.contiguous()
        rejected_lengths = rejected_lengths.contiguous()
    else:
        for name, value in lengths.items():
            if value is not None:
                raise ValueError(
                    f"{name} must be None for loss_type {loss_type!r}: only "
                    f"{DPO_LENGTH_NORMALISED_TYPES} normalise by length"
                )

    if not use_triton(policy_chosen):
        return reference.dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, **vars(opt),
        )
    if loss_type in DPO_SORTED_TYPES:
        return sorted_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, opt)
    cfg = kernel.DPOKernelConfig.from_options(opt)
    loss, chosen_rewards, rejected_rewards, stats = DPOLossFunction.apply(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        chosen_lengths, rejected_lengths, cfg,
    )
    return DPOLossOutput(loss, chosen_rewards, rejected_rewards, stats[0], stats[1])


def sorted_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, opt: Any
                ) -> DPOLossOutput:
    """aot and aot_unpaired: the fused sigmoid loss on the margins of the sorted
    log-ratios (torch.sort, differentiable, over the batch), the rewards of the pairs."""
    fp64 = torch.float64 in (policy_chosen.dtype, policy_rejected.dtype)
    pc, pr, rc, rr = (x.to(torch.float64 if fp64 else torch.float32) for x in (
        policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    if opt.loss_type == "aot":
        margin = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    else:
        margin = torch.sort(pc - rc, dim=0).values - torch.sort(pr - rr, dim=0).values
    cfg = kernel.DPOKernelConfig.from_options(SimpleNamespace(**{**vars(opt),
                                                               "loss_type": "sigmoid"}))
    loss = DPOLossFunction.apply(margin.contiguous(), torch.zeros_like(margin), None, None,
                                 None, None, cfg)[0]
    with torch.no_grad():
        chosen, rejected = opt.beta * (pc - rc), opt.beta * (pr - rr)
        accuracy = (chosen > rejected).to(margin.dtype).mean()
    return DPOLossOutput(loss, chosen, rejected, accuracy, (chosen - rejected).mean())
