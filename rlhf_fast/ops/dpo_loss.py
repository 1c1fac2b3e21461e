"""`rlhf_fast.dpo_loss`: pairwise preference losses in one forward and one backward pass."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import dpo_loss as kernel
from rlhf_fast.kernels.common import math_dtype
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_same_shape,
    check_tensor,
    contiguous,
    differentiable_once,
    fake_grads,
    fake_loss_outputs,
    host_checks_by_default,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import config_args, config_from_args, empty_like_absent, kernel_op
from rlhf_fast.options import DPO_OPTIONS, Checked, dpo_terms
from rlhf_fast.types import (
    DPO_LABEL_SMOOTHING_TYPES,
    DPO_LENGTH_NORMALISED_TYPES,
    DPO_REFERENCE_FREE_TYPES,
    DPO_SFT,
    DPO_SORTED_TYPES,
    DPOLossOutput,
)


@kernel_op("dpo_loss")
def dpo_loss_op(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None, rejected_lengths: torch.Tensor | None,
    config: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pairwise loss type's fused forward on [B] inputs (refs and lengths may be None),
    `config` a `kernels.dpo_loss.DPOKernelConfig` as `config_args`: (loss: 0-d or [B] for
    reduction "none", chosen_rewards [B], rejected_rewards [B], stats [2] = (accuracy,
    margin)), fp32 (fp64 when a policy input is fp64)."""
    return kernel.dpo_forward(*contiguous(policy_chosen, policy_rejected, ref_chosen,
                                          ref_rejected, chosen_lengths, rejected_lengths),
                              config_from_args(kernel.DPOKernelConfig, config))


@dpo_loss_op.register_fake
def _(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
      rejected_lengths, config):
    cfg = config_from_args(kernel.DPOKernelConfig, config)
    return fake_loss_outputs(policy_chosen, math_dtype(policy_chosen, policy_rejected),
                             cfg.reduction_code == kernel.REDUCTION_CODES["none"], 2, 2)


@kernel_op("dpo_loss_backward")
def dpo_loss_backward_op(
    grad_loss: torch.Tensor, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None, rejected_lengths: torch.Tensor | None,
    config: list[float], needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients w.r.t. (policy_chosen, policy_rejected, ref_chosen, ref_rejected),
    each [B] in its input's dtype where `needs_grad` asks for it (else empty), from the
    upstream gradient of the loss."""
    inputs = contiguous(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                        chosen_lengths, rejected_lengths)
    needs = tuple(needed and x is not None for x, needed in zip(inputs, needs_grad))
    grads = kernel.dpo_backward(grad_loss.contiguous(), *inputs,
                                config_from_args(kernel.DPOKernelConfig, config), needs)
    return tuple(empty_like_absent(policy_chosen) if g is None else g for g in grads)


@dpo_loss_backward_op.register_fake
def _(grad_loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
      rejected_lengths, config, needs_grad):
    return fake_grads((policy_chosen, policy_rejected, ref_chosen, ref_rejected), needs_grad,
                      policy_chosen)


def _setup_dpo_loss(ctx, inputs, output):
    *tensors, ctx.config = inputs
    ctx.save_for_backward(*tensors)
    ctx.mark_non_differentiable(*output[1:])


@differentiable_once
def _dpo_loss_backward(ctx, grad_loss, _grad_chosen, _grad_rejected, _grad_stats):
    needs = list(ctx.needs_input_grad[:4])
    grads = dpo_loss_backward_op(grad_loss, *ctx.saved_tensors, ctx.config, needs)
    return (*(g if needed else None for g, needed in zip(grads, needs)), None, None, None)


dpo_loss_op.register_autograd(_dpo_loss_backward, setup_context=_setup_dpo_loss)


def _check_pair_input(name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    check_tensor(name, value, FLOAT_DTYPES)
    check_same_device(name, value, "policy_chosen", like)
    check_same_shape(name, value, "policy_chosen", like)
    return value.contiguous()


def _check_lengths(name: str, value: torch.Tensor | None, like: torch.Tensor,
                   needed_by: list[str], loss_type: Any) -> torch.Tensor | None:
    """Token counts where a type of the mix reads them (`needed_by`), None where none does."""
    if not needed_by:
        if value is not None:
            raise ValueError(
                f"{name} must be None for loss_type {loss_type!r}: only "
                f"{DPO_LENGTH_NORMALISED_TYPES} normalise by length"
                + (" (and sft reads chosen_lengths)" if name == "chosen_lengths" else ""))
        return None
    if value is None:
        raise ValueError(f"{name} is required for loss_type {needed_by[0]!r}, got None")
    check_tensor(name, value, INDEX_DTYPES + FLOAT_DTYPES)
    check_same_device(name, value, "policy_chosen", like)
    check_same_shape(name, value, "policy_chosen", like)
    # not (>= 0) catches NaN too, which `< 0` lets through. On CUDA: a device sync.
    if host_checks_by_default(value) and bool((bad := ~(value >= 0)).any()):
        raise ValueError(f"{name} must be token counts >= 0, found {value[bad][0].item()}")
    return value.contiguous()


@DPO_OPTIONS.keywords
def dpo_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, *,
    chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
    weights: torch.Tensor | None = None, sft_logps: torch.Tensor | None = None,
    **options: Any,
) -> DPOLossOutput:
    """DPO and its pairwise relatives on sequence log-probs: one fused forward, one backward.

    With a = policy_chosen - ref_chosen and b = policy_rejected - ref_rejected (the
    log-ratios of the chosen and the rejected answer), delta = a - b and u = beta * delta:
    "sigmoid" is -log s(u) (DPO; with label_smoothing eps, conservative DPO
    -(1 - eps) log s(u) - eps log s(-u)). Every type's formula and source:
    `rlhf_fast.reference.dpo_loss`. log s(x) is computed as -softplus(-x): finite for
    margins of any size. A list of types (TRL's MPO), rpo_alpha (RPO) and `weights`
    (WPO) combine the [B] losses of each type's fused kernel: the sum over the types of
    loss_weight * losses * weights, then the reduction.

    Args:
        policy_chosen, policy_rejected: ``[B]`` log-probs of each pair's chosen and
            rejected answer under the policy (sums over the answer's tokens, e.g. from
            `sequence_logps`, or LD-DPO's weighted sums from `pair_logps`); fp32, bf16,
            fp16 or fp64; differentiable.
        ref_chosen, ref_rejected: ``[B]`` the same under the reference model, or both
            None for a reference-free loss (log pi_ref = 0), allowed when every type
            depends only on delta (or is sft): sigmoid, ipo, hinge, robust, exo_pair,
            sigmoid_norm, discopop. Differentiable too when they require grad.
        chosen_lengths, rejected_lengths: ``[B]`` answer lengths in tokens (int or float),
            required where a type reads them (ipo and sigmoid_norm divide all four
            log-probs by them, clamped to >= 1; sft divides by chosen_lengths' sum) and
            refused otherwise. Negative or NaN lengths raise ValueError on CPU (on CUDA
            the check would need a device sync: negative ones are clamped to 1 like 0, a
            NaN one gives its pair a NaN loss).
        weights: ``[B]`` float, each pair's losses multiplied by it before the reduction
            (WPO: `pair_logps(..., log_sum_p2=...)` gives TRL's weights); not
            differentiated; refused with aot and aot_unpaired (sorted positions, not pairs).
        sft_logps: ``[B]`` float, the chosen answers' plain log-prob sums the sft term
            reads where policy_chosen is LD-DPO's weighted sum (`pair_logps` returns
            them); default policy_chosen. Only with sft (or rpo_alpha); differentiable.
        Options: below; beta, at least fp32's smallest normal (1.2e-38).

    Returns:
        `DPOLossOutput`: loss (fp32, fp64 if a policy input is fp64; differentiable),
        chosen_rewards and rejected_rewards ``[B]`` (beta times each log-ratio, on the
        log-probs the first non-sft type sees), reward_accuracy (fraction of pairs with
        chosen reward > rejected reward) and reward_margin (mean of their difference), all
        detached. Gradients come back in each input's dtype. A NaN input gives a NaN loss
        for its pair (and so for a mean or sum; sft: for every pair) and, every loss type
        alike, a NaN gradient for it and for the inputs its loss terms couple it with;
        other pairs are unaffected.

    Raises:
        ValueError: an empty batch (B = 0), mismatched shapes or devices, an unknown
            loss_type or reduction, an out-of-range beta or label_smoothing, or a missing
            or superfluous reference, lengths, weights or sft_logps argument. TypeError:
            wrong types.
    """
    check_tensor("policy_chosen", policy_chosen, FLOAT_DTYPES)
    if policy_chosen.dim() != 1 or policy_chosen.shape[0] == 0:
        raise ValueError(
            f"policy_chosen must have shape [B] with B >= 1, got {tuple(policy_chosen.shape)}"
        )
    opt = DPO_OPTIONS.check(options)
    terms = dpo_terms(opt)
    kinds = [kind for kind, _ in terms]

    policy_chosen = policy_chosen.contiguous()
    policy_rejected = _check_pair_input("policy_rejected", policy_rejected, policy_chosen)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("ref_chosen and ref_rejected must both be tensors or both be None")
    needs_ref = [k for k in kinds if k not in DPO_REFERENCE_FREE_TYPES + (DPO_SFT,)]
    if ref_chosen is None and needs_ref:
        raise ValueError(
            f"ref_chosen and ref_rejected are required for loss_type {needs_ref[0]!r}; "
            f"reference-free (None) works for {DPO_REFERENCE_FREE_TYPES} and sft"
        )
    if ref_chosen is not None:
        ref_chosen = _check_pair_input("ref_chosen", ref_chosen, policy_chosen)
        ref_rejected = _check_pair_input("ref_rejected", ref_rejected, policy_chosen)
    normalised = [k for k in kinds if k in DPO_LENGTH_NORMALISED_TYPES]
    chosen_lengths = _check_lengths("chosen_lengths", chosen_lengths, policy_chosen,
                                    normalised + [k for k in kinds if k == DPO_SFT], opt.loss_type)
    rejected_lengths = _check_lengths("rejected_lengths", rejected_lengths, policy_chosen,
                                      normalised, opt.loss_type)
    if weights is not None:
        weights = _check_pair_input("weights", weights, policy_chosen)
        if sorted_kinds := [k for k in kinds if k in DPO_SORTED_TYPES]:
            raise ValueError(f"weights must be None for loss_type {sorted_kinds[0]!r} (its "
                             "losses are of sorted positions, not of pairs; TRL refuses it)")
    if sft_logps is not None:
        if DPO_SFT not in kinds:
            raise ValueError("sft_logps must be None without the sft term (loss_type 'sft' "
                             "or rpo_alpha): nothing reads it")
        sft_logps = _check_pair_input("sft_logps", sft_logps, policy_chosen)

    if not use_triton(policy_chosen):
        return reference.dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
            weights=weights, sft_logps=sft_logps, **vars(opt),
        )
    inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if len(terms) == 1 and terms[0][1] == 1.0 and weights is None and kinds[0] != DPO_SFT:
        return one_type(kinds[0], opt.reduction, inputs, chosen_lengths, rejected_lengths, opt)
    return mixed_loss(terms, inputs, chosen_lengths, rejected_lengths, weights, sft_logps, opt)


def mixed_loss(terms: tuple[tuple[str, float], ...], inputs: tuple, chosen_lengths: Any,
               rejected_lengths: Any, weights: torch.Tensor | None,
               sft_logps: torch.Tensor | None, opt: Any) -> DPOLossOutput:
    """The weighted sum of the terms' [B] losses (each a fused kernel's, sft a batch-level
    NLL), times the pair weights, reduced; the statistics of the first non-sft type."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = inputs
    dtype = torch.float64 if torch.float64 in (policy_chosen.dtype, policy_rejected.dtype) \
        else torch.float32
    total, first = 0.0, None
    for kind, weight in terms:
        if kind == DPO_SFT:
            chosen = (policy_chosen if sft_logps is None else sft_logps).to(dtype)
            counts = chosen_lengths.to(dtype).clamp(min=1)
            losses = (-chosen.sum() / counts.sum()).expand(chosen.shape)
        else:
            out = one_type(kind, "none", inputs, chosen_lengths, rejected_lengths, opt)
            losses, first = out.loss, first or out
        if weights is not None:
            losses = losses * weights.detach().to(dtype)
        total = total + weight * losses
    loss = {"mean": torch.mean, "sum": torch.sum}.get(opt.reduction, lambda x: x)(total)
    if first is None:  # sft alone: the raw log-ratios' rewards
        with torch.no_grad():
            chosen, rejected = (opt.beta * (p.to(dtype) - (0 if r is None else r.to(dtype)))
                                for p, r in ((policy_chosen, ref_chosen),
                                             (policy_rejected, ref_rejected)))
            first = DPOLossOutput(None, chosen, rejected,
                                  (chosen > rejected).to(dtype).mean(),
                                  (chosen - rejected).mean())
    return first._replace(loss=loss)


def one_type(kind: str, reduction: str, inputs: tuple, chosen_lengths: Any,
             rejected_lengths: Any, opt: Any) -> DPOLossOutput:
    """One pairwise loss type's fused kernel (aot's: `sorted_loss`) with `reduction`; the
    lengths and label_smoothing only where the type reads them."""
    typed = Checked(**{
        **vars(opt), "loss_type": kind, "reduction": reduction,
        "label_smoothing": opt.label_smoothing if kind in DPO_LABEL_SMOOTHING_TYPES else 0.0})
    if kind in DPO_SORTED_TYPES:
        return sorted_loss(*inputs, typed)
    if kind not in DPO_LENGTH_NORMALISED_TYPES:
        chosen_lengths = rejected_lengths = None
    cfg = kernel.DPOKernelConfig.from_options(typed)
    loss, chosen_rewards, rejected_rewards, stats = dpo_loss_op(
        *inputs, chosen_lengths, rejected_lengths, config_args(cfg))
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
    cfg = kernel.DPOKernelConfig.from_options(Checked(**{**vars(opt), "loss_type": "sigmoid"}))
    loss = dpo_loss_op(margin.contiguous(), torch.zeros_like(margin), None, None, None, None,
                       config_args(cfg))[0]
    with torch.no_grad():
        chosen, rejected = opt.beta * (pc - rc), opt.beta * (pr - rr)
        accuracy = (chosen > rejected).to(margin.dtype).mean()
    return DPOLossOutput(loss, chosen, rejected, accuracy, (chosen - rejected).mean())
