"""`rlhf_fast.topk_token_divergence`: distillation from a teacher's top-k log-probs (an
inference server's), the student's side through the fused log-prob kernels.

The divergence depends on the student's logits only through its log-probs of the k
tokens, s_k = z_{i_k} / T - logsumexp(z / T), so with G_k its gradient w.r.t. s_k

    d z_j = (sum_{k: i_k = j} G_k - q_j sum_k G_k) / T

which is `rlhf_fast.logprobs`' backward with the upstream gradient sum_k G_k at label i_1
(one read of the logits, one write of their gradient, optionally in place), its k ids'
entries then overwritten with their exact values (a scatter of K values per row, each
rounded once). The
forward is the log-prob forward (one read: each row's max and log-sum-exp) and a gather
of the k logits; the divergence of the k (+ 1) outcomes is O(N K) torch math.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.graph import increment_version

from rlhf_fast import reference
from rlhf_fast.kernels import logprobs as kernel
from rlhf_fast.ops.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_inplace_backward,
    check_same_device,
    check_tensor,
    differentiable_once,
    host_checks_by_default,
)
from rlhf_fast.ops.dispatch import use_triton
from rlhf_fast.ops.library import kernel_op
from rlhf_fast.ops.token_divergence import addressable, resolved_divergence
from rlhf_fast.options import TOPK_DIVERGENCE_OPTIONS
from rlhf_fast.reference.distillation import counted_rows, support_divergence

#: The first id of a row not counted, for the kernels (valid ids are >= 0)
SKIPPED = -1


def _ids(ids: torch.Tensor, vocab: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first id [N], counted rows [N], rows with an id outside [0, vocab) [N, K] among
    them, the ids with those and the rows not counted replaced by 0) of `ids` [N, K]."""
    first = ids[:, 0].contiguous()
    counted = first != SKIPPED
    outside = ((ids < 0) | (ids >= vocab)) & counted[:, None]
    return first, counted, outside, torch.where(counted[:, None] & ~outside, ids, 0)


@kernel_op("topk_logprobs")
def topk_logprobs_op(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float, inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's log-probs of `ids` [N, K], row_stats [2, N] for the backward), fp32
    (fp64 for fp64 logits); N the logits' rows. Rows whose first id is SKIPPED: 0, no
    gradient; a row with an id outside [0, V): NaN. `inplace_backward` is read by the
    backward only."""
    logits, layout = addressable(logits)
    vocab, lead = logits.shape[-1], logits.shape[:-1]
    first, counted, outside, safe_ids = _ids(ids, vocab)
    _, _, _, row_stats = kernel.logprobs_forward(logits, first, layout, temperature,
                                                 SKIPPED, False)
    # gathered from the logits' own layout: a row-strided view is not copied
    chosen = logits.gather(-1, safe_ids.view(*lead, -1)).reshape(ids.shape)
    topk = ((chosen.to(row_stats.dtype) - row_stats[0][:, None]) / temperature
            - row_stats[1][:, None])
    topk = torch.where(outside.any(-1, keepdim=True), float("nan"), topk)
    return torch.where(counted[:, None], topk, 0.0), row_stats


@topk_logprobs_op.register_fake
def _(logits, ids, temperature, inplace_backward):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return (logits.new_empty(ids.shape, dtype=dtype),
            logits.new_empty((2, ids.shape[0]), dtype=dtype))


def _launch_backward(logits, ids, row_stats, topk, grad, temperature, inplace):
    logits, layout = addressable(logits)
    first, counted, _, safe_ids = _ids(ids, logits.shape[-1])
    grad = torch.where(counted[:, None], grad, 0.0)
    total = grad.sum(-1)
    d_logits = kernel.logprobs_backward(logits, first, layout, row_stats, None,
                                        total.contiguous(), None, temperature, SKIPPED,
                                        inplace)
    # the k ids' gradients, overwritten with their exact values (sum of G over the id's
    # repeats - q sum G) / T, rounded once: adding the difference to the dense value the
    # kernel rounded would round twice, where the two nearly cancel
    repeats = (safe_ids[:, :, None] == safe_ids[:, None, :]).to(grad.dtype)
    at_ids = (repeats @ grad[:, :, None]).squeeze(-1)
    exact = torch.where(counted[:, None],
                        (at_ids - topk.exp() * total[:, None]) / temperature, 0.0)
    lead = d_logits.shape[:-1]
    d_logits.scatter_(-1, safe_ids.view(*lead, -1), exact.to(d_logits.dtype).view(*lead, -1))
    return d_logits


@kernel_op("topk_logprobs_backward")
def topk_logprobs_backward_op(
    logits: torch.Tensor, ids: torch.Tensor, row_stats: torch.Tensor, topk: torch.Tensor,
    grad: torch.Tensor, temperature: float,
) -> torch.Tensor:
    """d loss / d logits (a new contiguous tensor of logits' shape and dtype) from the
    forward's outputs and the upstream gradient `grad` [N, K] of its log-probs."""
    return _launch_backward(logits, ids, row_stats, topk, grad, temperature, False)


@topk_logprobs_backward_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@kernel_op("topk_logprobs_backward_", mutates_args=("logits",))
def topk_logprobs_backward_inplace_op(
    logits: torch.Tensor, ids: torch.Tensor, row_stats: torch.Tensor, topk: torch.Tensor,
    grad: torch.Tensor, temperature: float,
) -> None:
    """`topk_logprobs_backward`, written into `logits` (nothing of its size allocated)."""
    d_logits = _launch_backward(logits, ids, row_stats, topk, grad, temperature, True)
    if d_logits.data_ptr() != logits.data_ptr():  # rows no layout addresses: a copy's
        logits.copy_(d_logits)


def _setup_topk_logprobs(ctx, inputs, output):
    logits, ids, ctx.temperature, ctx.inplace_backward = inputs
    topk, row_stats = output
    ctx.save_for_backward(logits, ids, row_stats, topk)
    ctx.mark_non_differentiable(row_stats)


@differentiable_once
def _topk_logprobs_backward(ctx, grad, _grad_row_stats):
    logits, ids, row_stats, topk = ctx.saved_tensors
    args = (logits, ids, row_stats, topk, grad, ctx.temperature)
    if not ctx.inplace_backward:
        return topk_logprobs_backward_op(*args), None, None, None
    topk_logprobs_backward_inplace_op(*args)
    increment_version(logits)  # the logits now hold their gradient (see `logprobs`)
    return logits, None, None, None


topk_logprobs_op.register_autograd(_topk_logprobs_backward, setup_context=_setup_topk_logprobs)


@TOPK_DIVERGENCE_OPTIONS.keywords
def topk_token_divergence(
    student_logits: torch.Tensor, teacher_topk_logp: torch.Tensor,
    teacher_topk_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
    inplace_backward: bool = False, **options: Any,
) -> torch.Tensor:
    """`token_divergence` from a teacher that gives only its k largest log-probs per
    token: the student's distribution and the teacher's compared on those k tokens, the
    rest of the vocabulary one more outcome (tail "bucket") or left out with both
    renormalised (tail "renormalize"), as TRL's server distillation does.

    Args:
        student_logits: ``[..., V]`` bf16, fp16, fp32 or fp64, differentiable; the last dim
            with stride 1.
        teacher_topk_logp: ``[..., K]`` float, the teacher's log-probs of its top k tokens
            (taken as given: at the teacher's temperature), a constant.
        teacher_topk_ids: ``[..., K]`` int64 / int32, their ids in [0, V) (checked on CPU).
        labels: ``[...]`` or None: the rows to count (as `token_divergence`'s).
        inplace_backward: (bool) write the gradient into the student logits' storage.
        Options: below; the student's log-probs at `temperature`.

    Returns:
        ``[...]`` fp32 (fp64 for fp64 student logits): 0 at rows not counted. One read of
        the student's logits in the forward, one read and one write in the backward (a
        scatter of K values per row beside it); formulas:
        `rlhf_fast.reference.topk_token_divergence`.
    """
    check_tensor("student_logits", student_logits, FLOAT_DTYPES)
    check_tensor("teacher_topk_logp", teacher_topk_logp, FLOAT_DTYPES)
    check_tensor("teacher_topk_ids", teacher_topk_ids, INDEX_DTYPES)
    shape = tuple(student_logits.shape)
    if student_logits.dim() < 1 or shape[-1] < 1:
        raise ValueError(f"student_logits must have shape [..., V] with V >= 1, got {shape}")
    if shape[-1] > 1 and student_logits.stride(-1) != 1:
        raise ValueError(f"student_logits must have stride 1 in its last dim, got stride "
                         f"{student_logits.stride(-1)}; call .contiguous() first")
    k_shape = tuple(teacher_topk_logp.shape)
    if len(k_shape) != len(shape) or k_shape[:-1] != shape[:-1] or k_shape[-1] < 1:
        raise ValueError(f"teacher_topk_logp must have shape {shape[:-1]} + [K] with K >= 1, "
                         f"got {k_shape}")
    if tuple(teacher_topk_ids.shape) != k_shape:
        raise ValueError(f"teacher_topk_ids must have shape {k_shape} (teacher_topk_logp's), "
                         f"got {tuple(teacher_topk_ids.shape)}")
    for name, tensor in (("teacher_topk_logp", teacher_topk_logp),
                         ("teacher_topk_ids", teacher_topk_ids)):
        check_same_device(name, tensor, "student_logits", student_logits)
    if torch.is_grad_enabled() and teacher_topk_logp.requires_grad:
        raise ValueError("teacher_topk_logp must not require grad: the teacher is not "
                         "differentiated; pass teacher_topk_logp.detach()")
    if labels is not None:
        check_tensor("labels", labels, INDEX_DTYPES + (torch.bool,))
        check_same_device("labels", labels, "student_logits", student_logits)
        if tuple(labels.shape) != shape[:-1]:
            raise ValueError(f"labels must have shape {shape[:-1]} (student_logits.shape"
                             f"[:-1]), got {tuple(labels.shape)}")
    opt = TOPK_DIVERGENCE_OPTIONS.check(options)
    kept = counted_rows(labels, opt.ignore_index, torch.Size(shape[:-1]),
                        student_logits.device)
    if host_checks_by_default(teacher_topk_ids):  # else unchecked (a sync): such a row is NaN
        bad = kept.unsqueeze(-1) & ((teacher_topk_ids < 0) | (teacher_topk_ids >= shape[-1]))
        if bool(bad.any()):
            raise ValueError(f"teacher_topk_ids must be in [0, {shape[-1]}), found "
                             f"{int(teacher_topk_ids[bad][0])}")
    if inplace_backward:
        check_inplace_backward("student_logits", student_logits)

    if not use_triton(student_logits):
        return reference.topk_token_divergence(student_logits, teacher_topk_logp,
                                               teacher_topk_ids, labels, **vars(opt))
    divergence, beta = resolved_divergence(opt)
    ids = teacher_topk_ids.reshape(-1, k_shape[-1]).long()
    ids = torch.where(kept.reshape(-1, 1), ids, SKIPPED).contiguous()
    student_topk = topk_logprobs_op(student_logits, ids, opt.temperature, inplace_backward)[0]
    teacher = teacher_topk_logp.detach().reshape(-1, k_shape[-1]).to(student_topk.dtype)
    flat_kept = kept.reshape(-1, 1)
    value = support_divergence(student_topk, torch.where(flat_kept, teacher, 0.0), opt.tail,
                               divergence, beta)
    return torch.where(flat_kept[:, 0], value, 0.0).view(shape[:-1])
