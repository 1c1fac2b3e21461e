"""`rlhf_fast.linear_logprobs` and the fused losses on hidden states: no [N, V] logits.

`linear_logprobs` equals ``logprobs(hidden @ weight.T + bias, labels, ...)`` without the
logits ever existing whole (design and costs: `rlhf_fast.kernels.linear_logprobs`).
`linear_dpo_loss` composes it with `sequence_logps` and `dpo_loss`; `linear_ppo_loss`
computes the gradient during the forward (the PPO loss is token-wise), skipping the
backward's recompute GEMM.
"""

from __future__ import annotations

import contextlib

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import linear_logprobs as kernel
from rlhf_fast.kernels import ppo as ppo_kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    MASK_DTYPES,
    check_bool,
    check_int,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.dpo import dpo_loss
from rlhf_fast.ops.logprobs import check_label_range
from rlhf_fast.ops.ppo import check_ppo_arguments
from rlhf_fast.ops.sequence_logps import sequence_logps
from rlhf_fast.reference import DPO_LENGTH_NORMALISED_TYPES, DPOLossOutput, PPOLossOutput


class LinearLogProbsFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels. Inputs validated by `linear_logprobs`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy,
                compute_dtype):
        with no_autocast(hidden):
            logp, entropy, row_stats = kernel.linear_logprobs_forward(
                hidden, weight, bias, labels, temperature, ignore_index, return_entropy,
                compute_dtype,
            )
        ctx.save_for_backward(hidden, weight, bias, labels, row_stats, entropy)
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.compute_dtype = compute_dtype
        ctx.set_materialize_grads(False)
        if return_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @differentiable_once
    def backward(ctx, g_logp, g_entropy=None):
        hidden, weight, bias, labels, row_stats, entropy = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if (g_logp is None and g_entropy is None) or not any(needs):
            return None, None, None, None, None, None, None, None
        with no_autocast(hidden):
            d_hidden, d_weight, d_bias = kernel.linear_logprobs_backward(
                hidden, weight, bias, labels, row_stats, entropy,
                None if g_logp is None else g_logp.contiguous(),
                None if g_entropy is None else g_entropy.contiguous(),
                ctx.temperature, ctx.ignore_index, needs, ctx.compute_dtype,
            )
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def no_autocast(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on the tensor's device: the kernels cast to the compute dtype
    themselves, in the forward and in the backward alike (autocast would only cast the
    forward's GEMMs, so the backward would recompute different logits)."""
    return torch.autocast(tensor.device.type, enabled=False)


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
               ) -> torch.dtype:
    """The dtype the lm_head GEMMs run in, as F.linear picks it: under autocast on
    hidden's device its dtype (fp64 inputs are not autocast), else hidden's, which
    weight and bias must then share."""
    device = hidden.device.type
    tensors = [hidden, weight] + ([] if bias is None else [bias])
    if torch.is_autocast_enabled(device) and all(t.dtype != torch.float64 for t in tensors):
        return torch.get_autocast_dtype(device)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(
                f"{name} must have hidden's dtype {hidden.dtype} (or run under autocast, "
                f"which casts both), got {tensor.dtype}"
            )
    return hidden.dtype


def _check_linear_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    bias: torch.Tensor | None, hidden_name: str = "hidden",
) -> torch.dtype:
    """Validate the inputs of the linear ops (hidden named `hidden_name` in errors);
    return the GEMMs' dtype (`gemm_dtype`)."""
    check_tensor(hidden_name, hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("labels", labels, INDEX_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(
            f"{hidden_name} must have shape [..., D] with D >= 1, got {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, D] with V >= 1 and D = {hidden_name}.shape[-1] = "
            f"{hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    check_same_device("weight", weight, hidden_name, hidden)
    check_same_device("labels", labels, hidden_name, hidden)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} ({hidden_name}.shape[:-1]), "
            f"got {tuple(labels.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        check_same_device("bias", bias, hidden_name, hidden)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}"
            )
    return gemm_dtype(hidden, weight, bias)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    check_labels: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each label (and entropy) under softmax((hidden @ weight.T + bias) / T).

    Equal to ``logprobs(F.linear(hidden, weight, bias), labels, ...)`` (the logits
    rounded to the GEMM's dtype, as a model's lm_head makes them), without ever storing
    the ``[N, V]`` logits: at most `kernels.linear_logprobs.CHUNK_ELEMENTS` logits
    (256 MB in bf16) exist at once, whatever N, plus O(N D) in the backward (an fp32
    ``[N, D]`` accumulator, and hidden with ignored rows zeroed when d weight is asked).
    An unchecked out-of-range label makes its row NaN, and with it all of d weight.

    Autocast applies as to F.linear: under it the GEMMs run in its dtype (bf16 / fp16;
    fp32 master weights are cast once per pass), otherwise in hidden's dtype.

    Args:
        hidden: ``[..., D]`` final hidden states, bf16, fp16, fp32 (or fp64).
        weight: ``[V, D]`` the lm_head weight, hidden's dtype (any float dtype under
            autocast). With requires_grad False (frozen, e.g. LoRA) its gradient GEMM
            is skipped.
        labels: ``[...]`` (hidden.shape[:-1]) int64 / int32 token ids in [0, V), or
            ignore_index (log-prob 0, entropy 0, no gradient).
        bias: optional ``[V]`` bias, weight's dtype rules.
        temperature: z = logits / temperature, > 0.
        return_entropy: also return each row's entropy; gradients from both outputs.
        check_labels: as in `rlhf_fast.logprobs` (default on for CPU, off for CUDA).

    Returns:
        ``logp [...]`` (and ``entropy [...]``), fp32 (fp64 for fp64 inputs). Gradients:
        d hidden, d weight (one GEMM per vocab chunk over all tokens, fp32 accumulation,
        rounded once to weight's dtype) and d bias, each in its input's dtype; an fp32
        gradient of bf16 GEMMs (autocast) is not rounded to bf16 on the way where torch
        has fp32-output GEMMs (CUDA, torch >= 2.8; see `kernels.linear_logprobs`).

    Not batch-invariant: cuBLAS chooses its GEMM algorithm from the shapes, so a token's
    outputs can differ in the last bits with N (use `rlhf_fast.logprobs` on materialised
    logits where bit-identical rollout / training log-probs matter).
    """
    compute_dtype = _check_linear_inputs(hidden, weight, labels, bias)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    return_entropy = check_bool("return_entropy", return_entropy)
    check_labels = check_bool("check_labels", check_labels, allow_none=True)
    if check_labels is None:
        check_labels = not hidden.is_cuda
    if check_labels:
        check_label_range(labels, weight.shape[0], ignore_index)
    if not use_triton(hidden):
        return reference.linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature,
            ignore_index=ignore_index, return_entropy=return_entropy,
        )
    shape = labels.shape
    outputs = LinearLogProbsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), labels.reshape(-1).contiguous(),
        temperature, ignore_index, return_entropy, compute_dtype,
    )
    if return_entropy:
        return outputs[0].view(shape), outputs[1].view(shape)
    return outputs.view(shape)


def ignore_masked_labels(
    labels: torch.Tensor, mask: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """labels with ignore_index where the mask is 0: those tokens are never read, nor their
    labels used as an address. Widened to int64 when ignore_index does not fit the labels'
    dtype (masked_fill would raise on int32 labels and an ignore_index of 2**32)."""
    if not reference.fits_dtype(ignore_index, labels.dtype):
        labels = labels.long()
    return labels.masked_fill(mask == 0, ignore_index)


def check_pair_shapes(hidden: torch.Tensor, labels: torch.Tensor,
                      ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None
                      ) -> None:
    """linear_dpo_loss's shapes, named as its caller wrote them (the ops it composes
    would name their own arguments)."""
    check_tensor("labels", labels, INDEX_DTYPES)
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"labels must have shape [2B, T] = {tuple(hidden.shape[:2])} "
            f"(hidden_chosen_and_rejected.shape[:2]), got {tuple(labels.shape)}"
        )
    n_pairs = hidden.shape[0] // 2
    for name, ref in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if torch.is_tensor(ref) and tuple(ref.shape) != (n_pairs,):
            raise ValueError(
                f"{name} must have shape [B] = ({n_pairs},) (one per pair), "
                f"got {tuple(ref.shape)}"
            )


def linear_dpo_loss(
    hidden_chosen_and_rejected: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    check_labels: bool | None = None,
) -> DPOLossOutput:
    """The DPO loss family straight from the hidden states of a stacked pair batch.

    ``linear_logprobs`` + ``sequence_logps`` + ``dpo_loss``: no logits tensor. The DPO
    loss couples every token of a pair, so the gradient needs the whole forward first;
    this is the composition (4 GEMMs per chunk), not a single fused pass.

    Args:
        hidden_chosen_and_rejected: ``[2B, T, D]``: rows 0..B-1 the chosen answers,
            rows B..2B-1 the rejected ones (hidden[:, t] predicts labels[:, t]).
        weight, bias, temperature, ignore_index, check_labels: as in `linear_logprobs`.
        labels: ``[2B, T]`` the tokens whose log-probs are summed, in [0, V) or
            ignore_index at the answer tokens; outside the mask they are not read.
        mask: ``[2B, T]`` bool or numeric, nonzero = an answer token (prompt and
            padding 0); a mask, not a weight.
        ref_chosen, ref_rejected: ``[B]`` reference sequence log-probs, or both None.
        beta, loss_type, label_smoothing, reduction: as in `dpo_loss`; for ipo and
            sigmoid_norm the answer lengths are the mask's row sums.

    Returns:
        `DPOLossOutput`, exactly `dpo_loss` of the sequence log-probs.
    """
    hidden = hidden_chosen_and_rejected
    check_tensor("hidden_chosen_and_rejected", hidden, FLOAT_DTYPES)
    if hidden.dim() != 3 or hidden.shape[0] % 2 != 0 or hidden.shape[0] == 0:
        raise ValueError(
            "hidden_chosen_and_rejected must have shape [2B, T, D] with B >= 1 (chosen rows "
            f"first), got {tuple(hidden.shape)}"
        )
    check_pair_shapes(hidden, labels, ref_chosen, ref_rejected)
    _check_linear_inputs(hidden, weight, labels, bias, "hidden_chosen_and_rejected")
    # Tokens outside the mask are ignored outright: no NaN hidden state there can reach a
    # gradient through 0 * NaN.
    check_tensor("mask", mask, MASK_DTYPES)
    check_same_device("mask", mask, "hidden_chosen_and_rejected", hidden)
    check_same_shape("mask", mask, "labels", labels)
    ignore_index = check_int("ignore_index", ignore_index)
    labels = ignore_masked_labels(labels, mask, ignore_index)
    token_logp = linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, ignore_index=ignore_index,
        check_labels=check_labels,
    )
    seq_logp = sequence_logps(token_logp, mask)
    n_pairs = hidden.shape[0] // 2
    lengths = {}
    if loss_type in DPO_LENGTH_NORMALISED_TYPES:
        counts = (mask != 0).sum(-1)
        lengths = dict(chosen_lengths=counts[:n_pairs], rejected_lengths=counts[n_pairs:])
    return dpo_loss(
        seq_logp[:n_pairs], seq_logp[n_pairs:], ref_chosen, ref_rejected, beta=beta,
        loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction, **lengths,
    )


def scaled(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad * scale (a 0-d tensor), computed in fp32 or wider, in grad's dtype."""
    wide = torch.promote_types(grad.dtype, torch.float32)
    return (grad.to(wide) * scale.to(wide)).to(grad.dtype)


class LinearPPOLossFunction(torch.autograd.Function):
    """Forward computes the loss and, already, its gradient (the loss is token-wise);
    backward scales that gradient by the upstream one. Only `loss` is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, labels, old_logp, advantages, mask,
                ref_logp, old_values, returns, temperature, ignore_index, cfg, compute_dtype):
        flat = {k: None if v is None else v.reshape(-1)
                for k, v in dict(old_logp=old_logp, advantages=advantages,
                                 ref_logp=ref_logp).items()}
        acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        with no_autocast(hidden):
            token_weight = ppo_kernel.token_weights(mask, cfg.agg_code, cfg.max_len,
                                                    acc_dtype).reshape(-1)
            logp, entropy, d_hidden, d_weight, d_bias = kernel.linear_ppo_forward_backward(
                hidden, weight, bias, labels, flat["old_logp"], flat["advantages"],
                flat["ref_logp"], token_weight, cfg, temperature, ignore_index,
                tuple(ctx.needs_input_grad[:3]), compute_dtype,
            )
            logp, entropy = logp.view(mask.shape), entropy.view(mask.shape)
            outputs, counts, row_stats = ppo_kernel.ppo_forward(
                logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values,
                returns, cfg,
            )
            d_values = None
            if ctx.needs_input_grad[3]:
                unit = torch.zeros_like(outputs)
                unit[0] = 1.0
                _, _, d_values = ppo_kernel.ppo_backward(
                    unit, counts, row_stats, logp, old_logp, advantages, mask, ref_logp,
                    values, old_values, returns, cfg, grad_entropy_dtype=None,
                    grad_values=True,
                )
        ctx.save_for_backward(d_hidden, d_weight, d_bias, d_values)
        statistics = outputs[1:].clone()
        ctx.mark_non_differentiable(statistics)
        return outputs[0], statistics

    @staticmethod
    @differentiable_once
    def backward(ctx, grad_loss, _grad_statistics):
        # In fp32 at least, rounded once: a loss scale of 65536 is inf in fp16.
        grads = tuple(None if g is None else scaled(g, grad_loss) for g in ctx.saved_tensors)
        return (*grads, *([None] * 11))


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    value_clip: float = 0.2,
    vf_coef: float = 0.5,
    agg: str = "token-mean",
    max_len: int | None = None,
    check_labels: bool | None = None,
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
    V = 128256, D = 4096). `linear_logprobs` + `ppo_loss` needs neither, for one more GEMM.
    Under ``torch.no_grad()`` only the loss and statistics are computed (1 GEMM). fp16:
    the gradient is formed at loss scale 1, so a GradScaler's scale cannot shield its
    smallest entries from fp16 underflow (bf16 has fp32's range and no such problem).

    Args:
        hidden: ``[B, T, D]`` (hidden[:, t] predicts labels[:, t]); weight ``[V, D]``;
            bias, temperature, ignore_index, check_labels: as in `linear_logprobs`.
        labels: ``[B, T]`` the sampled tokens; outside the mask they are not read (nor
            range-checked).
        old_logp, advantages, mask and every keyword of `ppo_loss`: as there, ``[B, T]``.
            The entropy fed to the loss (and reported) is the policy's own, from the same
            pass; values (the critic's) may require grad.

    Returns:
        `PPOLossOutput` as `ppo_loss` returns it, except that only `loss` is
        differentiable (w.r.t. hidden, weight, bias and values); the other fields are
        detached.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, T, D], got {tuple(hidden.shape)}")
    compute_dtype = _check_linear_inputs(hidden, weight, labels, bias)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    check_labels = check_bool("check_labels", check_labels, allow_none=True)
    if check_labels is None:
        check_labels = not hidden.is_cuda
    tensors, options, cfg = check_ppo_arguments(
        "labels", labels, dict(old_logp=old_logp, advantages=advantages, mask=mask,
                               ref_logp=ref_logp, entropy=None, values=values,
                               old_values=old_values, returns=returns),
        clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, value_clip=value_clip,
        vf_coef=vf_coef, agg=agg, max_len=max_len,
    )
    # Tokens outside the mask are ignored outright (see linear_dpo_loss), before the range
    # check: their labels are never read.
    labels = ignore_masked_labels(labels, tensors["mask"], ignore_index)
    if check_labels:
        check_label_range(labels, weight.shape[0], ignore_index)
    if not use_triton(hidden):
        logp, entropy = reference.linear_logprobs(
            hidden, weight, labels, bias=bias, temperature=temperature,
            ignore_index=ignore_index, return_entropy=True,
        )
        out = reference.ppo_loss(
            logp, tensors["old_logp"], tensors["advantages"], tensors["mask"],
            ref_logp=tensors["ref_logp"], entropy=entropy, values=tensors["values"],
            old_values=tensors["old_values"], returns=tensors["returns"], **options,
        )
        return PPOLossOutput(out.loss, *(x.detach() for x in out[1:]))
    if not torch.is_grad_enabled():  # no_grad / inference_mode: skip the gradient GEMMs
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
        tensors["values"] = None if tensors["values"] is None else tensors["values"].detach()
    loss, statistics = LinearPPOLossFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), tensors["values"],
        labels.reshape(-1).contiguous(), tensors["old_logp"], tensors["advantages"],
        tensors["mask"], tensors["ref_logp"], tensors["old_values"], tensors["returns"],
        temperature, ignore_index, cfg, compute_dtype,
    )
    return PPOLossOutput(loss, *statistics.unbind())
