"""`rlhf_fast.linear_logprobs`: per-token log-probs from hidden states, no [N, V] logits.

`linear_logprobs` equals ``logprobs(hidden @ weight.T + bias, labels, ...)`` without the
logits ever existing whole (design and costs: `rlhf_fast.kernels.linear_logprobs`). The
checks and helpers here are shared with the losses on hidden states, `linear_ppo_loss` and
`linear_dpo_loss`.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import linear_logprobs as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_same_device,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import empty_like_absent, kernel_op
from rlhf_fast.ops.logprobs import (
    check_label_range,
    check_logprob_options,
    single_or_tuple,
)
from rlhf_fast.options import LOGPROB_OPTIONS, TOKEN_OPTIONS


def accumulator_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the linear ops' per-row outputs and accumulators are in for a GEMM in
    `compute_dtype`: fp64 for fp64, else fp32."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


@kernel_op("linear_logprobs")
def linear_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    labels: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool,
    return_sum_p2: bool, compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [N], entropy [N], log_sum_p2 [N], row_stats [2, N]) of
    `kernel.linear_logprobs_forward` on contiguous ``hidden [N, D]``, ``weight [V, D]``,
    ``labels [N]``, the GEMMs in `compute_dtype` (the two outputs not asked for empty);
    row_stats is for the backward."""
    with no_autocast(hidden):
        logp, entropy, sum_p2, row_stats = kernel.linear_logprobs_forward(
            hidden, weight, bias, labels, temperature, ignore_index, return_entropy,
            return_sum_p2, compute_dtype,
        )
    return (logp, empty_like_absent(logp) if entropy is None else entropy,
            empty_like_absent(logp) if sum_p2 is None else sum_p2, row_stats)


@linear_logprobs_op.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, return_entropy, return_sum_p2,
      compute_dtype):
    dtype = accumulator_dtype(compute_dtype)
    n_tokens = hidden.shape[0]

    def output(asked: bool) -> torch.Tensor:
        return hidden.new_empty(n_tokens if asked else 0, dtype=dtype)

    return (output(True), output(return_entropy), output(return_sum_p2),
            hidden.new_empty((2, n_tokens), dtype=dtype))


@kernel_op("linear_logprobs_backward")
def linear_logprobs_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    labels: torch.Tensor, row_stats: torch.Tensor, entropy: torch.Tensor,
    log_sum_p2: torch.Tensor, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None,
    g_sum_p2: torch.Tensor | None, temperature: float, ignore_index: int,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool, compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias), each in its input's dtype where its grad_* flag asks
    for it (else empty), from the forward's outputs and their upstream gradients (None:
    that output unused)."""

    def contiguous(g: torch.Tensor | None) -> torch.Tensor | None:
        return None if g is None else g.contiguous()

    with no_autocast(hidden):
        grads = kernel.linear_logprobs_backward(
            hidden, weight, bias, labels, row_stats, entropy, contiguous(g_logp),
            contiguous(g_entropy), temperature, ignore_index,
            (grad_hidden, grad_weight, grad_bias), compute_dtype, log_sum_p2=log_sum_p2,
            g_sum_p2=contiguous(g_sum_p2),
        )
    return tuple(empty_like_absent(hidden) if g is None else g for g in grads)


@linear_logprobs_backward_op.register_fake
def _(hidden, weight, bias, labels, row_stats, entropy, log_sum_p2, g_logp, g_entropy,
      g_sum_p2, temperature, ignore_index, grad_hidden, grad_weight, grad_bias,
      compute_dtype):
    return head_grads_like(hidden, weight, bias, (grad_hidden, grad_weight, grad_bias))


def head_grads_like(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    asked: tuple[bool, bool, bool]) -> tuple[torch.Tensor, ...]:
    """The fake (d hidden, d weight, d bias) of the chunked lm_head backwards (their
    kernels' `linear_*_backward`), where `asked`: d hidden and d bias contiguous, d weight
    `empty_like` weight, each in its input's dtype; else empty in hidden's dtype."""
    grads = (hidden.new_empty(hidden.shape), torch.empty_like(weight),
             None if bias is None else bias.new_empty(bias.shape))
    return tuple(grad if was else empty_like_absent(hidden) for grad, was in zip(grads, asked))


def _setup_linear_logprobs(ctx, inputs, output):
    (hidden, weight, bias, labels, ctx.temperature, ctx.ignore_index, return_entropy,
     return_sum_p2, ctx.compute_dtype) = inputs
    _, entropy, sum_p2, row_stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, row_stats, entropy, sum_p2)
    ctx.returned = (True, return_entropy, return_sum_p2)
    ctx.mark_non_differentiable(row_stats)
    ctx.set_materialize_grads(False)  # unused outputs: None, no zeros made


@differentiable_once
def _linear_logprobs_backward(ctx, *grads):
    hidden, weight, bias, labels, row_stats, entropy, sum_p2 = ctx.saved_tensors
    g_logp, g_entropy, g_sum_p2 = (g if was else None for g, was in zip(grads, ctx.returned))
    needs = tuple(ctx.needs_input_grad[:3])
    if (g_logp is None and g_entropy is None and g_sum_p2 is None) or not any(needs):
        return (None,) * 9
    grads = linear_logprobs_backward_op(
        hidden, weight, bias, labels, row_stats, entropy, sum_p2, g_logp, g_entropy,
        g_sum_p2, ctx.temperature, ctx.ignore_index, *needs, ctx.compute_dtype)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * 6


linear_logprobs_op.register_autograd(_linear_logprobs_backward,
                                     setup_context=_setup_linear_logprobs)


def has_autocast(device_type: str) -> bool:
    # not torch.amp.is_autocast_available, which Dynamo before torch 2.8 cannot trace
    return device_type != "meta"


def no_autocast(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on the tensor's device: the kernels cast to the compute dtype
    themselves, in the forward and in the backward alike (autocast would only cast the
    forward's GEMMs, so the backward would recompute different logits)."""
    if not has_autocast(tensor.device.type):  # meta: nothing to undo
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               names: tuple[str, str, str] = ("hidden", "weight", "bias")) -> torch.dtype:
    """The dtype the lm_head GEMMs run in, as F.linear picks it: under autocast on
    hidden's device its dtype (fp64 inputs are not autocast), else hidden's, which
    weight and bias must then share (`names`: the three arguments', for errors)."""
    device = hidden.device.type
    tensors = [hidden, weight] + ([] if bias is None else [bias])
    autocast = has_autocast(device) and torch.is_autocast_enabled(device)
    if autocast and all(t.dtype != torch.float64 for t in tensors):
        return torch.get_autocast_dtype(device)
    for name, tensor in ((names[1], weight), (names[2], bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(
                f"{name} must have {names[0]}'s dtype {hidden.dtype} (or run under "
                f"autocast, which casts both), got {tensor.dtype}"
            )
    return hidden.dtype


def check_linear_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    bias: torch.Tensor | None, hidden_name: str = "hidden",
) -> torch.dtype:
    """Validate the inputs of the linear ops (hidden, already checked to be a float
    tensor, named `hidden_name` in errors); return the GEMMs' dtype (`gemm_dtype`)."""
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


@LOGPROB_OPTIONS.keywords
def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
    bias: torch.Tensor | None = None, return_entropy: bool = False,
    return_sum_p2: bool = False, **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Log-prob of each label (and entropy, log sum_j p_j^2) under
    softmax((hidden @ weight.T + bias) / T).

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
        return_entropy: also return each row's entropy; gradients from every output.
        return_sum_p2: also return each row's log sum_j p_j^2 (as `rlhf_fast.logprobs`).
        Options: below; z = logits / temperature.

    Returns:
        ``logp [...]``, or a tuple of it, ``entropy [...]`` (return_entropy) and
        ``log_sum_p2 [...]`` (return_sum_p2), fp32 (fp64 for fp64 inputs). Gradients:
        d hidden, d weight (one GEMM per vocab chunk over all tokens, fp32 accumulation,
        rounded once to weight's dtype) and d bias, each in its input's dtype; an fp32
        gradient of bf16 GEMMs (autocast) is not rounded to bf16 on the way where torch
        has fp32-output GEMMs (CUDA, torch >= 2.8; see `kernels.linear_logprobs`).

    Not batch-invariant: cuBLAS chooses its GEMM algorithm from the shapes, so a token's
    outputs can differ in the last bits with N (use `rlhf_fast.logprobs` on materialised
    logits where bit-identical rollout / training log-probs matter).
    """
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    compute_dtype = check_linear_inputs(hidden, weight, labels, bias)
    return_entropy = check_bool("return_entropy", return_entropy)
    return_sum_p2 = check_bool("return_sum_p2", return_sum_p2)
    opt = check_logprob_options(options, hidden)
    if opt.check_labels:
        check_label_range(labels, weight.shape[0], opt.ignore_index)
    return token_logprobs(hidden, weight, labels, bias, opt, return_entropy, return_sum_p2,
                          compute_dtype)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
    bias: torch.Tensor | None, opt: SimpleNamespace, return_entropy: bool,
    return_sum_p2: bool, compute_dtype: torch.dtype,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`linear_logprobs` of inputs its checks have passed (`opt`: the checked options)."""
    if not use_triton(hidden):
        return reference.linear_logprobs(
            hidden, weight, labels, bias=bias, return_entropy=return_entropy,
            return_sum_p2=return_sum_p2, **TOKEN_OPTIONS.pick(opt),
        )
    outputs = linear_logprobs_op(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), labels.reshape(-1).contiguous(),
        opt.temperature, opt.ignore_index, return_entropy, return_sum_p2, compute_dtype,
    )
    asked = (True, return_entropy, return_sum_p2)
    return single_or_tuple(tuple(out.view(labels.shape) for out, was in zip(outputs, asked)
                                 if was))


def ignore_masked_labels(
    labels: torch.Tensor, mask: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """labels with ignore_index where the mask is 0: those tokens are never read, nor their
    labels used as an address. Widened to int64 when ignore_index does not fit the labels'
    dtype (masked_fill would raise on int32 labels and an ignore_index of 2**32)."""
    if not reference.fits_dtype(ignore_index, labels.dtype):
        labels = labels.long()
    return labels.masked_fill(mask == 0, ignore_index)
