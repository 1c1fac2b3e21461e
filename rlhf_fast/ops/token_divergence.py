"""`rlhf_fast.token_divergence`: a student's divergence from a teacher per token, fused
(distillation)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.graph import increment_version

from rlhf_fast import reference
from rlhf_fast.kernels import token_divergence as kernel
from rlhf_fast.kernels.common import mask_view, math_dtype
from rlhf_fast.kernels.logprobs import row_layout
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_inplace_backward,
    check_same_device,
    check_tensor,
    differentiable_once,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import kernel_op
from rlhf_fast.options import DIVERGENCE_OPTIONS, Checked

CODES = {"forward_kl": kernel.FORWARD_KL, "reverse_kl": kernel.REVERSE_KL, "jsd": kernel.JSD}


def resolved_divergence(opt: Checked) -> tuple[str, float]:
    """(divergence, beta) the kernels compute: jsd at beta 0 and 1 is the forward and
    the reverse KL (the peers' definition; the formula's own limit there is 0)."""
    if opt.divergence == "jsd" and opt.beta in (0.0, 1.0):
        return ("forward_kl" if opt.beta == 0.0 else "reverse_kl"), opt.beta
    return opt.divergence, opt.beta


def addressable(logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`logits` and the layout its rows are read at (a copy where no layout addresses
    them: more than two unmergeable leading dims)."""
    layout = row_layout(logits)
    if layout is None:
        logits = logits.contiguous()
        layout = row_layout(logits) if logits.numel() else (1, 0, 0)
    return logits, layout


def _rows(labels: torch.Tensor | None) -> torch.Tensor | None:
    """The rows to count as the kernels read them: None, flat int labels [N] or a uint8
    mask [N] (contiguous: row `r` is read at rows_ptr + r)."""
    return None if labels is None else mask_view(labels.reshape(-1).contiguous())


@kernel_op("token_divergence")
def token_divergence_op(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, code: int,
    temperature: float, beta: float, ignore_index: int, inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence of student's leading shape, stats [N_STATS, N] for the backward), fp32
    (fp64 if either input is fp64); `labels` (int labels, a bool mask or None) of that
    leading shape, `code` a `kernels.token_divergence` divergence code.
    `inplace_backward` is read by the backward only."""
    student, s_layout = addressable(student)
    teacher, t_layout = addressable(teacher)
    value, stats = kernel.divergence_forward(student, teacher, _rows(labels),
                                             (s_layout, t_layout), code, temperature, beta,
                                             ignore_index)
    return value.view(student.shape[:-1]), stats


@token_divergence_op.register_fake
def _(student, teacher, labels, code, temperature, beta, ignore_index, inplace_backward):
    dtype = math_dtype(student, teacher)
    return (student.new_empty(student.shape[:-1], dtype=dtype),
            student.new_empty((kernel.N_STATS, math.prod(student.shape[:-1])), dtype=dtype))


def _launch_backward(student, teacher, labels, stats, g, code, temperature, beta,
                     ignore_index, inplace):
    student, s_layout = addressable(student)
    teacher, t_layout = addressable(teacher)
    return kernel.divergence_backward(student, teacher, _rows(labels), (s_layout, t_layout),
                                      stats, g.reshape(-1).contiguous(), code, temperature,
                                      beta, ignore_index, inplace)


@kernel_op("token_divergence_backward")
def token_divergence_backward_op(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
    stats: torch.Tensor, g: torch.Tensor, code: int, temperature: float, beta: float,
    ignore_index: int,
) -> torch.Tensor:
    """d loss / d student (a new contiguous tensor of student's shape and dtype) from the
    forward's stats and the divergence's upstream gradient `g`."""
    return _launch_backward(student, teacher, labels, stats, g, code, temperature, beta,
                            ignore_index, False)


@token_divergence_backward_op.register_fake
def _(student, *args):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


@kernel_op("token_divergence_backward_", mutates_args=("student",))
def token_divergence_backward_inplace_op(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
    stats: torch.Tensor, g: torch.Tensor, code: int, temperature: float, beta: float,
    ignore_index: int,
) -> None:
    """`token_divergence_backward`, written into `student` (nothing of its size
    allocated)."""
    grad = _launch_backward(student, teacher, labels, stats, g, code, temperature, beta,
                            ignore_index, True)
    if grad.data_ptr() != student.data_ptr():  # rows no layout addresses: a copy's
        student.copy_(grad)


def _setup_token_divergence(ctx, inputs, output):
    student, teacher, labels, *ctx.settings, ctx.inplace_backward = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.mark_non_differentiable(output[1])


@differentiable_once
def _token_divergence_backward(ctx, g, _g_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    args = (student, teacher, labels, stats, g, *ctx.settings)
    if not ctx.inplace_backward:
        return token_divergence_backward_op(*args), None, None, None, None, None, None, None
    token_divergence_backward_inplace_op(*args)
    increment_version(student)  # the logits now hold their gradient (see `logprobs`)
    return student, None, None, None, None, None, None, None


token_divergence_op.register_autograd(_token_divergence_backward,
                                      setup_context=_setup_token_divergence)


@DIVERGENCE_OPTIONS.keywords
def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None, *, inplace_backward: bool = False, **options: Any,
) -> torch.Tensor:
    """Per token, the divergence of the student's distribution q = softmax(student / T)
    from the teacher's p = softmax(teacher / T): distillation's loss, fused.

    The KLs read each logits tensor once in the forward, jsd twice (its mixture's log
    needs both normalisers first); the backward reads both once and writes the student's
    gradient. No fp32 copy of either tensor, nothing of size [N, V] kept for the
    backward, and with ``inplace_backward`` none allocated at all.

    Args:
        student_logits: ``[..., V]`` bf16, fp16, fp32 or fp64, differentiable; the last
            dim with stride 1 (row-strided views such as ``logits[:, :-1]`` are read in
            place).
        teacher_logits: ``[..., V]`` float of the same shape (its dtype may differ), a
            constant: pass it detached (computed under ``torch.no_grad()``); one that
            requires grad raises ValueError rather than silently get no gradient.
        labels: ``[...]`` or None: the rows to count. int64 / int32 labels: the rows
            whose label is not ``ignore_index`` (the divergence is over the whole
            vocabulary; the label's value is not read otherwise); a bool mask: the rows
            where it is True; None: every row.
        inplace_backward: (bool) write the gradient into the student logits' storage (as
            `rlhf_fast.logprobs`' option, with the same conditions).
        Options: below.

    Returns:
        ``[...]`` fp32 (fp64 if either tensor is fp64): 0 at rows not counted (never read),
        the divergence elsewhere; reduce it as the trainer does (TRL's GKD:
        ``sum / counted rows``). Formulas and edge cases: `rlhf_fast.reference.token_divergence`.
    """
    check_tensor("student_logits", student_logits, FLOAT_DTYPES)
    check_tensor("teacher_logits", teacher_logits, FLOAT_DTYPES)
    check_same_device("teacher_logits", teacher_logits, "student_logits", student_logits)
    shape = tuple(student_logits.shape)
    if student_logits.dim() < 1 or shape[-1] < 1:
        raise ValueError(f"student_logits must have shape [..., V] with V >= 1, got {shape}")
    if tuple(teacher_logits.shape) != shape:
        raise ValueError(f"teacher_logits must have shape {shape} (student_logits.shape), "
                         f"got {tuple(teacher_logits.shape)}")
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if shape[-1] > 1 and logits.stride(-1) != 1:
            raise ValueError(f"{name} must have stride 1 in its last dim, got stride "
                             f"{logits.stride(-1)}; call .contiguous() first")
    if torch.is_grad_enabled() and teacher_logits.requires_grad:
        raise ValueError("teacher_logits must not require grad: token_divergence does not "
                         "differentiate the teacher; pass teacher_logits.detach()")
    if labels is not None:
        check_tensor("labels", labels, INDEX_DTYPES + (torch.bool,))
        check_same_device("labels", labels, "student_logits", student_logits)
        if tuple(labels.shape) != shape[:-1]:
            raise ValueError(f"labels must have shape {shape[:-1]} (student_logits.shape[:-1]), "
                             f"got {tuple(labels.shape)}")
    inplace_backward = check_bool("inplace_backward", inplace_backward)
    opt = DIVERGENCE_OPTIONS.check(options)
    if inplace_backward:
        check_inplace_backward("student_logits", student_logits)

    if not use_triton(student_logits):
        return reference.token_divergence(student_logits, teacher_logits, labels, **vars(opt))
    divergence, beta = resolved_divergence(opt)
    return token_divergence_op(student_logits, teacher_logits, labels, CODES[divergence],
                               opt.temperature, beta, opt.ignore_index, inplace_backward)[0]
