"""The divergence of a student's token distributions from a teacher's (distillation)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_fast.options import DIVERGENCE_OPTIONS, TOPK_DIVERGENCE_OPTIONS
from rlhf_fast.reference.tokens import ignored_labels


@DIVERGENCE_OPTIONS.keywords
def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None, **options: Any,
) -> torch.Tensor:
    """Per token, the divergence of the student's distribution q = softmax(s / T) from the
    teacher's p = softmax(t / T).

    Args:
        student_logits: ``[..., V]`` float; differentiable.
        teacher_logits: ``[..., V]`` float (its own dtype may differ); a constant: no
            gradient reaches it.
        labels: ``[...]`` or None: the rows to count. Integer labels: the rows whose
            label is not ``ignore_index`` (the label's value is not otherwise read); a
            bool mask: the rows where it is True; None: every row.
        Options: below.

    Returns:
        ``[...]`` fp32 (fp64 if either logits tensor is fp64); 0 at the rows not counted,
        whose logits are never read (NaN there is harmless), and no gradient there.

    The divergences (TRL's GKD ``generalized_jsd_loss``, Liger's ``LigerJSD``):
      * forward_kl: KL(p || q) = sum_j p_j (log p_j - log q_j)
      * reverse_kl: KL(q || p) = sum_j q_j (log q_j - log p_j)
      * jsd: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; at beta
        0 the forward KL and at beta 1 the reverse KL, as both peers special-case them
        (the formula's own limit there is 0).
    A token of probability 0 (a -inf logit) adds 0 where it carries no mass (0 log 0 = 0);
    mass where the other distribution has none makes a KL +inf (and its gradient NaN
    for the reverse KL). NaN or +inf in a counted row gives NaN for that row only.
    """
    opt = DIVERGENCE_OPTIONS.fill(options)
    kept = counted_rows(labels, opt.ignore_index, student_logits.shape[:-1],
                        student_logits.device)
    fp64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    dtype = torch.float64 if fp64 else torch.float32
    # Rows not counted are never looked at: whatever they hold, no NaN reaches any output.
    row_kept = kept.unsqueeze(-1)
    s = torch.where(row_kept, student_logits.to(dtype), 0.0) / opt.temperature
    t = torch.where(row_kept, teacher_logits.detach().to(dtype), 0.0) / opt.temperature
    log_q, log_p = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    return torch.where(kept, divergence_of(log_q, log_p, opt.divergence, opt.beta), 0.0)


def divergence_of(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str,
                  beta: float) -> torch.Tensor:
    """The divergence of the student's log-probs `log_q` from the teacher's `log_p`, each
    a distribution over the last dim (`token_divergence`'s definitions)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return kl(log_p, log_q)
    if divergence == "reverse_kl":
        return kl(log_q, log_p)
    log_m = log_add_exp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


@TOPK_DIVERGENCE_OPTIONS.keywords
def topk_token_divergence(
    student_logits: torch.Tensor, teacher_topk_logp: torch.Tensor,
    teacher_topk_ids: torch.Tensor, labels: torch.Tensor | None = None, **options: Any,
) -> torch.Tensor:
    """`token_divergence` where the teacher gives only its k largest log-probs per token
    (what an inference server returns), over the support of those k tokens.

    Args:
        student_logits: ``[..., V]`` float; differentiable.
        teacher_topk_logp: ``[..., K]`` float, the teacher's log-probs of its top k tokens
            (at its own temperature: taken as given), a constant.
        teacher_topk_ids: ``[..., K]`` int64 / int32, those tokens' ids in [0, V).
        labels: the rows to count, as `token_divergence`'s.
        Options: below; the student's log-probs are log_softmax(student_logits / T).

    Returns:
        ``[...]`` fp32 (fp64 for fp64 inputs), 0 at rows not counted.

    With q_k, p_k the student's and the teacher's probabilities of the k ids, the two
    distributions compared (TRL's server distillation; `divergence_of` on them):
      * tail "bucket": k + 1 outcomes, the k tokens and the rest, 1 - sum q_k and
        1 - sum p_k (their logs log(1 - exp(log sum)), the log sum clamped at -1e-7 as
        TRL's `_add_tail_bucket` does, so a top-k carrying all the mass keeps a tiny tail);
      * tail "renormalize": q_k / sum q and p_k / sum p over the k tokens alone.
    """
    opt = TOPK_DIVERGENCE_OPTIONS.fill(options)
    kept = counted_rows(labels, opt.ignore_index, student_logits.shape[:-1],
                        student_logits.device)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z = torch.where(kept.unsqueeze(-1), student_logits.to(dtype), 0.0) / opt.temperature
    ids = torch.where(kept.unsqueeze(-1), teacher_topk_ids, 0).long()
    student_topk = torch.log_softmax(z, dim=-1).gather(-1, ids)
    teacher = torch.where(kept.unsqueeze(-1), teacher_topk_logp.detach().to(dtype), 0.0)
    value = support_divergence(student_topk, teacher, opt.tail, opt.divergence, opt.beta)
    return torch.where(kept, value, 0.0)


def support_divergence(student_topk: torch.Tensor, teacher_topk: torch.Tensor, tail: str,
                       divergence: str, beta: float) -> torch.Tensor:
    """`topk_token_divergence` from both models' log-probs of the k tokens ``[..., K]``."""
    if tail == "renormalize":
        log_q = student_topk - torch.logsumexp(student_topk, -1, keepdim=True)
        log_p = teacher_topk - torch.logsumexp(teacher_topk, -1, keepdim=True)
    else:
        log_q, log_p = with_tail(student_topk), with_tail(teacher_topk)
    return divergence_of(log_q, log_p, divergence, beta)


def with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """``[..., K + 1]``: the k log-probs and log(1 - their probabilities' sum)."""
    log_sum = torch.logsumexp(topk_logp, -1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([topk_logp, torch.log(-torch.expm1(log_sum))], -1)


@DIVERGENCE_OPTIONS.keywords
def linear_token_divergence(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
    student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
    **options: Any,
) -> torch.Tensor:
    """`token_divergence` of each model's materialised logits, ``F.linear(hidden, weight,
    bias)`` (in the inputs' dtype, or autocast's, as a model's lm_head computes them):
    student_hidden ``[..., D_s]``, student_weight ``[V, D_s]``, teacher_hidden
    ``[..., D_t]``, teacher_weight ``[V, D_t]``. The rows not counted are zeroed first in
    both hidden states: what they hold reaches no output and no gradient."""
    opt = DIVERGENCE_OPTIONS.fill(options)
    kept = counted_rows(labels, opt.ignore_index, student_hidden.shape[:-1],
                        student_hidden.device).unsqueeze(-1)
    student = F.linear(student_hidden.masked_fill(~kept, 0), student_weight, student_bias)
    teacher = F.linear(teacher_hidden.masked_fill(~kept, 0), teacher_weight, teacher_bias)
    return token_divergence(student, teacher.detach(), labels, **vars(opt))


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (log a_j - log b_j) over the last dim, a term 0 (and its gradient 0, not
    0 * NaN) where a_j = 0."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def log_add_exp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(e^x + e^y), -inf with gradient 0 where both are -inf (torch.logaddexp's
    gradient is NaN there)."""
    none = (x == float("-inf")) & (y == float("-inf"))
    both = torch.logaddexp(x.masked_fill(none, 0.0), y.masked_fill(none, 0.0))
    return both.masked_fill(none, float("-inf"))


def counted_rows(labels: torch.Tensor | None, ignore_index: int, shape: torch.Size,
                 device: torch.device) -> torch.Tensor:
    """Bool ``shape``: the rows a divergence counts (see `token_divergence`'s labels)."""
    if labels is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if labels.dtype == torch.bool:
        return labels
    return ~ignored_labels(labels, ignore_index)
