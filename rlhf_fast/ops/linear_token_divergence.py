"""`rlhf_fast.linear_token_divergence`: distillation from both models' hidden states, no
[N, V] logits of either (design and costs: `rlhf_fast.kernels.linear_token_divergence`)."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_fast import reference
from rlhf_fast.kernels import linear_token_divergence as kernel
from rlhf_fast.kernels.common import mask_view
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.linear_logprobs import gemm_dtype, no_autocast
from rlhf_fast.ops.token_divergence import CODES, resolved_divergence
from rlhf_fast.options import DIVERGENCE_OPTIONS
from rlhf_fast.reference.distillation import counted_rows


class LinearTokenDivergenceFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked kernels. Inputs validated by
    `linear_token_divergence`."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, kept,
                code, temperature, beta, ignore_index, s_dtype, t_dtype):
        student = (s_hidden, s_weight, s_bias, s_dtype)
        teacher = (t_hidden, t_weight, t_bias, t_dtype)
        with no_autocast(s_hidden):
            value, stats = kernel.linear_divergence_forward(
                student, teacher, rows, code, temperature, beta, ignore_index)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows,
                              kept, stats)
        ctx.settings = (code, temperature, beta, ignore_index, s_dtype, t_dtype)
        return value

    @staticmethod
    @differentiable_once
    def backward(ctx, g):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, kept, stats = \
            ctx.saved_tensors
        code, temperature, beta, ignore_index, s_dtype, t_dtype = ctx.settings
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs):
            return (None,) * 14
        with no_autocast(s_hidden):
            grads = kernel.linear_divergence_backward(
                (s_hidden, s_weight, s_bias, s_dtype), (t_hidden, t_weight, t_bias, t_dtype),
                rows, kept, stats, g.contiguous(), code, temperature, beta, ignore_index,
                needs)
        return grads + (None,) * 11


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

    value = LinearTokenDivergenceFunction.apply(
        flat(student_hidden), student_weight.contiguous(), contiguous(student_bias),
        flat(teacher_hidden), teacher_weight.contiguous(), contiguous(teacher_bias), rows,
        kept.contiguous(), CODES[divergence], opt.temperature, beta, opt.ignore_index,
        s_dtype, t_dtype)
    return value.view(lead)
