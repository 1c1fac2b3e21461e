"""`rlhf_fast.linear_token_divergence`: distillation from both models' hidden states, no
[N, V] logits of either (design and costs: `rlhf_fast.kernels.linear_token_divergence`)."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import linear_token_divergence as kernel
from rlhf_fast.kernels import token_divergence as divergence_kernel
from rlhf_fast.kernels.common import mask_view
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import empty_like_absent, kernel_op
from rlhf_fast.ops.linear_logprobs import gemm_dtype, head_grads_like, no_autocast
from rlhf_fast.ops.token_divergence import CODES, resolved_divergence
from rlhf_fast.options import DIVERGENCE_OPTIONS
from rlhf_fast.reference.distillation import counted_rows


@kernel_op("linear_token_divergence")
def linear_token_divergence_op(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: torch.Tensor | None,
    t_hidden: torch.Tensor, t_weight: torch.Tensor, t_bias: torch.Tensor | None,
    rows: torch.Tensor | None, kept: torch.Tensor, code: int, temperature: float,
    beta: float, ignore_index: int, s_dtype: torch.dtype, t_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence [N], stats [N_STATS, N]) of `kernel.linear_divergence_forward` on
    contiguous hidden states [N, D_s] / [N, D_t] and lm_heads [V, D], each model's GEMMs
    in its compute dtype (s_dtype, t_dtype); stats is for the backward. `kept` [N] bool
    (the rows counted) is read by the backward only."""
    with no_autocast(s_hidden):
        return kernel.linear_divergence_forward(
            (s_hidden, s_weight, s_bias, s_dtype), (t_hidden, t_weight, t_bias, t_dtype),
            rows, code, temperature, beta, ignore_index)


@linear_token_divergence_op.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, kept, code, temperature,
      beta, ignore_index, s_dtype, t_dtype):
    dtype = torch.float64 if torch.float64 in (s_dtype, t_dtype) else torch.float32
    n_tokens = s_hidden.shape[0]
    return (s_hidden.new_empty(n_tokens, dtype=dtype),
            s_hidden.new_empty((divergence_kernel.N_STATS, n_tokens), dtype=dtype))


@kernel_op("linear_token_divergence_backward")
def linear_token_divergence_backward_op(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: torch.Tensor | None,
    t_hidden: torch.Tensor, t_weight: torch.Tensor, t_bias: torch.Tensor | None,
    rows: torch.Tensor | None, kept: torch.Tensor, stats: torch.Tensor, g: torch.Tensor,
    code: int, temperature: float, beta: float, ignore_index: int, grad_hidden: bool,
    grad_weight: bool, grad_bias: bool, s_dtype: torch.dtype, t_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d student hidden, d student weight, d student bias), each in its input's dtype
    where its grad_* flag asks for it (else empty), from the upstream gradient `g` [N]."""
    with no_autocast(s_hidden):
        grads = kernel.linear_divergence_backward(
            (s_hidden, s_weight, s_bias, s_dtype), (t_hidden, t_weight, t_bias, t_dtype),
            rows, kept, stats, g.contiguous(), code, temperature, beta, ignore_index,
            (grad_hidden, grad_weight, grad_bias))
    return tuple(empty_like_absent(s_hidden) if grad is None else grad for grad in grads)


@linear_token_divergence_backward_op.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, kept, stats, g, code,
      temperature, beta, ignore_index, grad_hidden, grad_weight, grad_bias, s_dtype,
      t_dtype):
    return head_grads_like(s_hidden, s_weight, s_bias, (grad_hidden, grad_weight, grad_bias))


def _setup_linear_token_divergence(ctx, inputs, output):
    (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, kept, *settings) = inputs
    ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows,
                          kept, output[1])
    ctx.settings = tuple(settings)  # code, temperature, beta, ignore_index, s/t dtype
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros made for it


@differentiable_once
def _linear_token_divergence_backward(ctx, g, _grad_stats):
    needs = tuple(ctx.needs_input_grad[:3])
    if g is None or not any(needs):
        return (None,) * 14
    code, temperature, beta, ignore_index, s_dtype, t_dtype = ctx.settings
    grads = linear_token_divergence_backward_op(
        *ctx.saved_tensors, g, code, temperature, beta, ignore_index, *needs, s_dtype,
        t_dtype)
    return tuple(grad if need else None for grad, need in zip(grads, needs)) + (None,) * 11


linear_token_divergence_op.register_autograd(
    _linear_token_divergence_backward, setup_context=_setup_linear_token_divergence)


def _check_head(prefix: str, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, vocab: int | None) -> torch.dtype:
    """One model's hidden [..., D], weight [V, D] (V = `vocab` when given) and bias [V]:
    checked, errors naming ``<prefix>_hidden`` etc.; returns its GEMMs' dtype."""
    names = (f"{prefix}_hidden", f"{prefix}_weight", f"{prefix}_bias")
    check_tensor(names[0], hidden, FLOAT_DTYPES)
    check_tensor(names[1], weight, FLOAT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{names[0]} must have shape [..., D] with D >= 1, got "
                         f"{tuple(hidden.shape)}")
    rows = f"V = {vocab} (student_weight.shape[0])" if vocab is not None else "V >= 1"
    if (weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1
            or (vocab is not None and weight.shape[0] != vocab)):
        raise ValueError(f"{names[1]} must have shape [V, D] with {rows} and D = "
                         f"{names[0]}.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    check_same_device(names[1], weight, names[0], hidden)
    if bias is not None:
        check_tensor(names[2], bias, FLOAT_DTYPES)
        check_same_device(names[2], bias, names[0], hidden)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{names[2]} must have shape [V] = ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    return gemm_dtype(hidden, weight, bias, names)


@DIVERGENCE_OPTIONS.keywords
def linear_token_divergence(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
    student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """`token_divergence` of ``F.linear(student_hidden, student_weight, student_bias)``
    from ``F.linear(teacher_hidden, teacher_weight, teacher_bias)``, without either
    model's ``[N, V]`` logits ever stored whole: at most 2^26 logits of each model (128 MB
    each in bf16) exist at once, whatever N, plus O(N D) in the backward (an fp32
    ``[N, D_s]`` accumulator, and the student's hidden with uncounted rows zeroed when
    d weight is asked). Autocast applies to each model's GEMMs as to F.linear.

    Args:
        student_hidden: ``[..., D_s]`` the student's final hidden states, bf16, fp16,
            fp32 (or fp64); differentiable.
        student_weight: ``[V, D_s]`` its lm_head, student_hidden's dtype (any float dtype
            under autocast); frozen (requires_grad False): its gradient GEMM is skipped.
        teacher_hidden: ``[..., D_t]`` (the same leading shape) the teacher's, a constant.
        teacher_weight: ``[V, D_t]`` its lm_head (the same V), a constant.
        labels: ``[...]`` or None: the rows to count (as `token_divergence`).
        student_bias, teacher_bias: optional ``[V]`` biases.
        Options: below.

    Returns:
        ``[...]`` fp32 (fp64 when a model computes in fp64): 0 at rows not counted. The
        gradients reach the student's hidden states, weight and bias, each in its dtype;
        a teacher tensor that requires grad raises ValueError. Not batch-invariant (as
        `linear_logprobs`).
    """
    s_dtype = _check_head("student", student_hidden, student_weight, student_bias, None)
    t_dtype = _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias,
                          student_weight.shape[0])
    lead = tuple(student_hidden.shape[:-1])
    check_same_device("teacher_hidden", teacher_hidden, "student_hidden", student_hidden)
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden must have shape {lead} + [D_t] "
                         f"(student_hidden.shape[:-1]), got {tuple(teacher_hidden.shape)}")
    for name, tensor in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                         ("teacher_bias", teacher_bias)):
        if tensor is not None and torch.is_grad_enabled() and tensor.requires_grad:
            raise ValueError(f"{name} must not require grad: the teacher is not "
                             f"differentiated; pass {name}.detach()")
    if labels is not None:
        check_tensor("labels", labels, INDEX_DTYPES + (torch.bool,))
        check_same_device("labels", labels, "student_hidden", student_hidden)
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead} (student_hidden.shape[:-1]), "
                             f"got {tuple(labels.shape)}")
    opt = DIVERGENCE_OPTIONS.check(options)

    if not use_triton(student_hidden):
        return reference.linear_token_divergence(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, **vars(opt))
    divergence, beta = resolved_divergence(opt)
    kept = counted_rows(
        labels, opt.ignore_index, torch.Size(lead), student_hidden.device).reshape(-1)
    rows = None if labels is None else mask_view(labels.reshape(-1).contiguous())

    def flat(hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1]).contiguous()

    def contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.contiguous()

    value, _ = linear_token_divergence_op(
        flat(student_hidden), student_weight.contiguous(), contiguous(student_bias),
        flat(teacher_hidden), teacher_weight.contiguous(), contiguous(teacher_bias), rows,
        kept.contiguous(), CODES[divergence], opt.temperature, beta, opt.ignore_index,
        s_dtype, t_dtype)
    return value.view(lead)
