"""`rlhf_fast.linear_ppo_loss`: the PPO loss from the policy's hidden states, no logits.

A token-wise PPO loss lets the forward compute each token chunk's gradient while its
logits are in memory (design and costs: `rlhf_fast.kernels.linear_ppo_loss`), and the
backward only scales it: 3 GEMMs, none recomputed; every token loss (vanilla, cispo, sapo,
gpg, dppo_tv, dppo_kl, dro) takes it. A sequence loss (gspo, gspo_token, geo_mean) knows a
token's gradient only once its whole row is computed, and bypass_mode, clip_cov, kl_cov
and TRL's entropy and off-policy masks read every log-prob of the batch (or the entropy)
first: those take `linear_logprobs` + `ppo_loss` (4 GEMMs: the backward recomputes the
logits).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import linear_ppo_loss as kernel
from rlhf_fast.kernels import ppo_loss as ppo_kernel
from rlhf_fast.kernels.linear_logprobs import CHUNK_ELEMENTS
from rlhf_fast.kernels.ppo_terms import PPOKernelConfig
from rlhf_fast.ops.checks import FLOAT_DTYPES, check_tensor, differentiable_once
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import config_args, config_from_args, empty_like_absent, kernel_op
from rlhf_fast.ops.linear_logprobs import (
    accumulator_dtype,
    check_linear_inputs,
    ignore_masked_labels,
    linear_logprobs,
    no_autocast,
)
from rlhf_fast.ops.logprobs import check_label_range, check_logprob_options
from rlhf_fast.ops.ppo_loss import (
    check_ppo_arguments,
    fused_ppo_loss,
    kl_cov_coefficients,
    policy_weights,
)
from rlhf_fast.options import LOGPROB_OPTIONS, PPO_OPTIONS, TOKEN_OPTIONS
from rlhf_fast.types import PPOLossOutput


def scaled(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad * scale (a 0-d tensor), computed in fp32 or wider, rounded once to grad's
    dtype. A bf16 / fp16 grad is scaled a chunk of rows at a time: the only new [V, D]
    tensor is the result (a whole fp32 copy and product of a [151936, 4096] weight's
    gradient would be 5 GB more)."""
    wide = torch.promote_types(grad.dtype, torch.float32)
    scale = scale.to(wide)
    if grad.dtype == wide:
        return grad * scale
    out = torch.empty_like(grad)
    rows = grad.reshape(-1, grad.shape[-1])  # hidden, weight or bias: contiguous, >= 1-D
    step = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        out.view(rows.shape)[start:start + step] = chunk.to(wide).mul_(scale)
    return out


@kernel_op("linear_ppo_loss")
def linear_ppo_loss_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    values: torch.Tensor | None, labels: torch.Tensor, old_logp: torch.Tensor,
    advantages: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor | None,
    old_values: torch.Tensor | None, returns: torch.Tensor | None,
    is_weights: torch.Tensor | None, temperature: float, ignore_index: int, cfg: list[float],
    compute_dtype: torch.dtype, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
    grad_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """(loss, statistics [N_OUTPUTS - 1], d hidden, d weight, d bias, d values): the
    token-wise PPO loss on contiguous ``hidden [N, D]``, ``weight [V, D]``, ``labels [N]``
    and ``[B, T]`` PPO inputs (`cfg` the `config_args` of a `PPOKernelConfig`), with its
    gradient for an upstream gradient of 1 on the loss, computed in the same pass: each
    in its input's dtype where its grad_* flag asks for it, else empty. Only the loss is
    differentiable; its backward scales those gradients."""
    config = config_from_args(PPOKernelConfig, cfg)
    flat = {k: None if v is None else v.reshape(-1)
            for k, v in dict(old_logp=old_logp, advantages=advantages,
                             ref_logp=ref_logp, is_weights=is_weights).items()}
    acc_dtype = accumulator_dtype(compute_dtype)
    with no_autocast(hidden):
        token_weight = kernel.token_weights(mask, config, acc_dtype).reshape(-1)
        logp, entropy, d_hidden, d_weight, d_bias = kernel.linear_ppo_forward_backward(
            hidden, weight, bias, labels, flat["old_logp"], flat["advantages"],
            flat["ref_logp"], flat["is_weights"], token_weight, config, temperature,
            ignore_index, (grad_hidden, grad_weight, grad_bias), compute_dtype,
        )
        logp, entropy = logp.view(mask.shape), entropy.view(mask.shape)
        outputs, counts, row_stats = ppo_kernel.ppo_forward(
            logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
            returns, config, is_weights,
        )
        d_values = None
        if grad_values:
            unit = torch.zeros_like(outputs)
            unit[0] = 1.0
            _, _, d_values = ppo_kernel.ppo_backward(
                unit, counts, row_stats, logp, old_logp, advantages, mask, ref_logp,
                values, old_values, returns, config, grad_entropy_dtype=None,
                grad_values=True,
            )
    grads = tuple(empty_like_absent(hidden) if g is None else g
                  for g in (d_hidden, d_weight, d_bias, d_values))
    return outputs[0], outputs[1:].clone(), *grads


@linear_ppo_loss_op.register_fake
def _(hidden, weight, bias, values, labels, old_logp, advantages, mask, ref_logp, old_values,
      returns, is_weights, temperature, ignore_index, cfg, compute_dtype, grad_hidden,
      grad_weight, grad_bias, grad_values):
    dtype = accumulator_dtype(compute_dtype)
    grads = (torch.empty_like(hidden), weight.new_empty(weight.shape),
             None if bias is None else bias.new_empty(bias.shape),
             None if values is None else torch.empty_like(values))
    asked = (grad_hidden, grad_weight, grad_bias, grad_values)
    return (hidden.new_empty((), dtype=dtype),
            hidden.new_empty(ppo_kernel.N_OUTPUTS - 1, dtype=dtype),
            *(g if was else empty_like_absent(hidden) for g, was in zip(grads, asked)))


def _setup_linear_ppo_loss(ctx, inputs, output):
    ctx.computed = inputs[-4:]  # the grad_* flags: which saved gradients exist
    ctx.save_for_backward(*output[2:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zeros made for those


@differentiable_once
def _linear_ppo_loss_backward(ctx, grad_loss, *_grad_statistics_and_gradients):
    if grad_loss is None:
        return (None,) * 20
    # In fp32 at least, rounded once: a loss scale of 65536 is inf in fp16.
    needs = zip(ctx.needs_input_grad[:4], ctx.computed)
    grads = tuple(scaled(g, grad_loss) if need and computed else None
                  for g, (need, computed) in zip(ctx.saved_tensors, needs))
    return (*grads, *((None,) * 16))


linear_ppo_loss_op.register_autograd(_linear_ppo_loss_backward,
                                     setup_context=_setup_linear_ppo_loss)


@(LOGPROB_OPTIONS + PPO_OPTIONS).keywords
def linear_ppo_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logp: torch.Tensor,
    advantages: torch.Tensor, mask: torch.Tensor, *, bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None, values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None, returns: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None, **options: Any,
) -> PPOLossOutput:
    """The PPO loss straight from the policy's hidden states: no logits tensor, 3 GEMMs.

    Equal to ``ppo_loss(logp, old_logp, advantages, mask, entropy=entropy, ...)`` with
    ``logp, entropy = linear_logprobs(hidden, weight, labels, return_entropy=True, ...)``.
    The PPO loss is a weighted sum of per-token terms whose weights depend only on the
    mask, so each token chunk's gradient is known as soon as its log-probs are: the
    forward computes it on the logits chunk still in memory (GEMMs: logits, d hidden,
    d weight), and the backward only scales it by the upstream gradient. The cost: the
    gradients are held from the forward to the backward, and d weight of a bf16 / fp16
    weight is accumulated over token chunks in an fp32 ``[V, D]`` buffer (2 GB at
    V = 128256, D = 4096). `linear_logprobs` + `ppo_loss` needs neither, for one more GEMM;
    the sequence losses (gspo, gspo_token, geo_mean), bypass_mode, clip_cov, kl_cov and
    TRL's entropy and off-policy masks (which read every log-prob or entropy first) take
    that way.
    Under ``torch.no_grad()`` only the loss and statistics are computed (1 GEMM). fp16:
    the gradient is formed at loss scale 1, so a GradScaler's scale cannot shield its
    smallest entries from fp16 underflow (bf16 has fp32's range and no such problem).

    Args:
        hidden: ``[B, T, D]`` (hidden[:, t] predicts labels[:, t]); weight ``[V, D]``;
            bias: as in `linear_logprobs`.
        labels: ``[B, T]`` the sampled tokens; outside the mask they are not read (nor
            range-checked).
        old_logp, advantages, mask, ref_logp, values, old_values, returns, rollout_logp:
            as in `ppo_loss`, ``[B, T]``. Options: below, those of `linear_logprobs` and of
            `ppo_loss`.
            The entropy fed to the loss (and reported) is the policy's own, from the same
            pass; values (the critic's) may require grad.

    Returns:
        `PPOLossOutput` as `ppo_loss` returns it, except that only `loss` is
        differentiable (w.r.t. hidden, weight, bias and values); the other fields are
        detached.
    """
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, D], got {tuple(hidden.shape)}")
    compute_dtype = check_linear_inputs(hidden, weight, labels, bias)
    opt = check_logprob_options(LOGPROB_OPTIONS.pick(options), hidden)
    tensors, ppo_options, cfg = check_ppo_arguments(
        "labels", labels, dict(old_logp=old_logp, advantages=advantages, mask=mask,
                               ref_logp=ref_logp, entropy=None, values=values,
                               old_values=old_values, returns=returns,
                               rollout_logp=rollout_logp),
        {k: v for k, v in options.items() if k not in LOGPROB_OPTIONS.names},
    )
    # Tokens outside the mask are ignored outright (see linear_dpo_loss), before the range
    # check: their labels are never read.
    labels = ignore_masked_labels(labels, tensors["mask"], opt.ignore_index)
    if opt.check_labels:
        check_label_range(labels, weight.shape[0], opt.ignore_index)
    if not use_triton(hidden):
        logp, entropy = reference.linear_logprobs(
            hidden, weight, labels, bias=bias, return_entropy=True, **TOKEN_OPTIONS.pick(opt)
        )
        out = reference.ppo_loss(
            logp, tensors["old_logp"], tensors["advantages"], tensors["mask"],
            ref_logp=tensors["ref_logp"], entropy=entropy, values=tensors["values"],
            old_values=tensors["old_values"], returns=tensors["returns"],
            rollout_logp=tensors["rollout_logp"], **vars(ppo_options),
        )
        return PPOLossOutput(out.loss, *(x.detach() for x in out[1:]))
    reads_logprobs = (ppo_options.policy_loss in ("bypass_mode", "clip_cov", "kl_cov")
                      or ppo_options.top_entropy_quantile < 1
                      or ppo_options.off_policy_mask_threshold is not None)
    if cfg.is_sequence_loss or reads_logprobs:
        return _from_logprobs(hidden, weight, bias, labels, tensors, opt, ppo_options, cfg)
    mask, is_weights, rollout_statistics = policy_weights(
        tensors["mask"], tensors["old_logp"], tensors["advantages"], tensors["rollout_logp"],
        ppo_options, accumulator_dtype(compute_dtype))
    # no_grad / inference_mode: no gradient asked for, its GEMMs skipped
    grad = torch.is_grad_enabled()
    loss, statistics, *_ = linear_ppo_loss_op(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), tensors["values"],
        labels.reshape(-1).contiguous(), tensors["old_logp"], tensors["advantages"],
        mask, tensors["ref_logp"], tensors["old_values"], tensors["returns"], is_weights,
        opt.temperature, opt.ignore_index, config_args(cfg), compute_dtype,
        *(grad and t is not None and t.requires_grad
          for t in (hidden, weight, bias, tensors["values"])),
    )
    return PPOLossOutput(loss, *statistics.unbind(), *rollout_statistics)


def _from_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    labels: torch.Tensor, tensors: dict[str, torch.Tensor | None], opt: Any,
    ppo_options: Any, cfg: PPOKernelConfig,
) -> PPOLossOutput:
    """`linear_logprobs` then the fused PPO kernels: 4 GEMMs, for the losses that need
    every log-prob of a row (or of the batch) before a token's gradient."""
    logp, entropy = linear_logprobs(
        hidden, weight, labels, bias=bias, return_entropy=True, check_labels=False,
        **TOKEN_OPTIONS.pick(opt))
    mask, is_weights, rollout_statistics = policy_weights(
        tensors["mask"], tensors["old_logp"], tensors["advantages"], tensors["rollout_logp"],
        ppo_options, logp.dtype, logp, entropy)
    outputs = fused_ppo_loss(
        logp, entropy, tensors["values"], tensors["old_logp"], tensors["advantages"],
        mask, tensors["ref_logp"], tensors["old_values"], tensors["returns"], is_weights,
        kl_cov_coefficients(logp, tensors["advantages"], mask, ppo_options, logp.dtype), cfg,
    )
    return PPOLossOutput(outputs[0], *outputs[1:].detach(), *rollout_statistics)
