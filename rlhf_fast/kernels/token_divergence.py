"""Divergence of a student's token distribution from a teacher's: forward and backward.

Math (one row of student logits s and teacher logits t, T the temperature, a = s / T,
b = t / T, q = softmax(a), p = softmax(b), A and B their logsumexps):

    forward_kl  D = KL(p || q) = sum_j p_j (b_j - a_j) - (B - A)    dD/da_j = q_j - p_j
    reverse_kl  D = KL(q || p) = sum_j q_j (a_j - b_j) + (B - A)    dD/da_j = q_j (log q_j
                                                                          - log p_j - D)
    jsd         D = beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q
                dD/da_j = (1 - beta) q_j (log q_j - log m_j - KL(q || m))
    ds_j = dD/da_j / T

Forward, pass 1, one read of both rows: the online max and per-lane sums of both
distributions at once, in base 2 with the scale folded in (c = log2(e) / T, as in
`logprobs.py`): S_q = sum_j 2^(c (s_j - m_s)), S_p likewise, and for a KL the sum of its
own distribution's weights times the raw logit difference, W = sum_j 2^(c (t_j - m_t))
(t_j - s_j) (forward; reverse: the student's weights times s_j - t_j), which only a
moving max rescales. Then sum_j p_j (b_j - a_j) = W / (S_p T), and B - A = (m_t - m_s) / T
+ log S_p - log S_q: for identical logits both are exactly 0, and so is D.

jsd, pass 2, a second read of both rows: log m_j needs both normalisers, known only after
pass 1, and does not split into running sums, so the forward reads each row twice (the
KLs once): with log2 q_j and log2 p_j from pass 1's statistics, log2 m_j is hi + log2(1 +
2^(lo - hi)) of log2 q_j + log2(1 - beta) and log2 p_j + log2(beta), and the lanes sum
q_j (log2 q_j - log2 m_j) and p_j (log2 p_j - log2 m_j).

Backward, one read of both rows and one write of the student's gradient (optionally into
the student's logits): the derivatives above from the saved (m_s, log S_q, m_t, log S_p)
and D (reverse) or KL(q || m) (jsd), times the upstream gradient / T.

Exponents are clamped at UNDERFLOW (2^x is 0 there, NaN kept) and a term whose weight is
0 adds 0: a -inf logit is a token of probability 0, never 0 * inf. Mass of the student
where the teacher has none makes the reverse KL +inf and its gradient undefined: NaN
across the row, as the reference's. Rows not counted (label
ignore_index, mask 0) are not read: 0, gradient 0. Layouts and batch invariance: as in
`logprobs.py` (one program per row, BLOCK_V a function of V, int64 row offsets).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import cast, fast_log2, fp64_arg, log2, nonzero, split_fp64
from rlhf_fast.kernels.logprobs import LN2, LOG2E, _exponent, _num_warps, _row_offset, block_size

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
#: Rows counted: every one, those whose integer label is not ignore_index, a mask's.
ALL_ROWS, LABELS, MASK = 0, 1, 2
#: Per-row statistics the backward reads: m_s, log S_q, m_t, log S_p, D or KL(q || m).
N_STATS = 5


@triton.jit
def _kept(rows_ptr, row, ignore_index, ROWS: tl.constexpr):
    keep = tl.full([], 1, tl.int32)
    if ROWS == 1:
        keep = (tl.load(rows_ptr + row).to(tl.int64) != ignore_index).to(tl.int32)
    if ROWS == 2:
        keep = nonzero(tl.load(rows_ptr + row)).to(tl.int32)
    return keep


@triton.jit
def _log2_probs(xs, xt, m_s, m_t, c, log2_s_q, log2_s_p, UNDERFLOW: tl.constexpr):
    # log2 q_j and log2 p_j, each clamped at UNDERFLOW - log2 S (so 2^ of it is 0)
    lq = _exponent((xs - m_s) * c, UNDERFLOW) - log2_s_q
    lp = _exponent((xt - m_t) * c, UNDERFLOW) - log2_s_p
    return lq, lp


@triton.jit
def _log2_mixture(lq, lp, log2_beta, log2_rest, FAST_LOG2: tl.constexpr):
    # log2(beta p + (1 - beta) q) from the two logs, without forming a sum that underflows
    # (the log's argument is in [1, 2]: the fast log2 is as good as the exact one there)
    x1 = lq + log2_rest
    x2 = lp + log2_beta
    hi = tl.maximum(x1, x2)
    return hi + log2(1.0 + tl.exp2(tl.minimum(x1, x2) - hi), FAST_LOG2)


@triton.jit
def _divergence_fwd_kernel(
    student_ptr, teacher_ptr, rows_ptr, out_ptr, stats_ptr, n_rows,
    s_inner, s_outer, s_stride, t_inner, t_outer, t_stride,
    vocab, inv_t_hi, inv_t_lo, beta_hi, beta_lo, ignore_index,
    DIVERGENCE: tl.constexpr, ROWS: tl.constexpr, FP64: tl.constexpr, FAST_LOG2: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    underflow: tl.constexpr = -1100.0 if FP64 else -200.0
    inv_temperature = fp64_arg(inv_t_hi, inv_t_lo, acc_dtype)
    c = inv_temperature * LOG2E
    row = tl.program_id(0).to(tl.int64)
    if _kept(rows_ptr, row, ignore_index, ROWS) == 0:
        tl.store(out_ptr + row, 0.0)
        for k in tl.static_range(5):  # N_STATS
            tl.store(stats_ptr + k * n_rows + row, 0.0)
    else:
        s_row = student_ptr + _row_offset(row, s_inner, s_outer, s_stride)
        t_row = teacher_ptr + _row_offset(row, t_inner, t_outer, t_stride)
        cols = tl.arange(0, BLOCK_V)
        m_s = tl.full([], float("-inf"), acc_dtype)
        m_t = tl.full([], float("-inf"), acc_dtype)
        sum_q = tl.zeros([BLOCK_V], acc_dtype)
        sum_p = tl.zeros([BLOCK_V], acc_dtype)
        w = tl.zeros([BLOCK_V], acc_dtype)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            inside = offs < vocab
            xs = tl.load(s_row + offs, mask=inside, other=float("-inf")).to(acc_dtype)
            xt = tl.load(t_row + offs, mask=inside, other=float("-inf")).to(acc_dtype)
            m_s_new = tl.maximum(m_s, tl.max(xs, axis=0))
            if m_s_new > m_s:  # nothing summed yet while m is -inf: no rescale
                a = tl.exp2(tl.where(m_s == float("-inf"), 0.0, (m_s - m_s_new) * c))
                sum_q = sum_q * a
                if DIVERGENCE == 1:
                    w = w * a
                m_s = m_s_new
            m_t_new = tl.maximum(m_t, tl.max(xt, axis=0))
            if m_t_new > m_t:
                a = tl.exp2(tl.where(m_t == float("-inf"), 0.0, (m_t - m_t_new) * c))
                sum_p = sum_p * a
                if DIVERGENCE == 0:
                    w = w * a
                m_t = m_t_new
            e_q = tl.exp2(_exponent((xs - tl.where(m_s == float("-inf"), 0.0, m_s)) * c,
                                    underflow))
            e_p = tl.exp2(_exponent((xt - tl.where(m_t == float("-inf"), 0.0, m_t)) * c,
                                    underflow))
            sum_q += e_q
            sum_p += e_p
            if DIVERGENCE == 0:
                w += tl.where(e_p == 0.0, 0.0, e_p * (xt - xs))
            if DIVERGENCE == 1:
                w += tl.where(e_q == 0.0, 0.0, e_q * (xs - xt))
        s_q = tl.sum(sum_q, axis=0)
        s_p = tl.sum(sum_p, axis=0)
        log_s_q = tl.log(s_q)
        log_s_p = tl.log(s_p)
        b_minus_a = (m_t - m_s) * inv_temperature + (log_s_p - log_s_q)
        if DIVERGENCE == 0:
            value = tl.sum(w, axis=0) / s_p * inv_temperature - b_minus_a
            saved = value
        elif DIVERGENCE == 1:
            value = tl.sum(w, axis=0) / s_q * inv_temperature + b_minus_a
            saved = value
        else:
            beta = fp64_arg(beta_hi, beta_lo, acc_dtype)
            log2_beta = tl.log2(beta)
            log2_rest = tl.log2(1.0 - beta)
            log2_s_q = log_s_q * LOG2E
            log2_s_p = log_s_p * LOG2E
            k_q = tl.zeros([BLOCK_V], acc_dtype)
            k_p = tl.zeros([BLOCK_V], acc_dtype)
            for start in range(0, vocab, BLOCK_V):
                offs = start + cols
                inside = offs < vocab
                xs = tl.load(s_row + offs, mask=inside, other=float("-inf")).to(acc_dtype)
                xt = tl.load(t_row + offs, mask=inside, other=float("-inf")).to(acc_dtype)
                lq, lp = _log2_probs(xs, xt, m_s, m_t, c, log2_s_q, log2_s_p, underflow)
                lm = _log2_mixture(lq, lp, log2_beta, log2_rest, FAST_LOG2)
                k_q += tl.exp2(lq) * (lq - lm)
                k_p += tl.exp2(lp) * (lp - lm)
            kl_q = LN2 * tl.sum(k_q, axis=0)
            value = beta * (LN2 * tl.sum(k_p, axis=0)) + (1.0 - beta) * kl_q
            saved = kl_q
        tl.store(out_ptr + row, value)
        tl.store(stats_ptr + row, m_s)
        tl.store(stats_ptr + n_rows + row, log_s_q)
        tl.store(stats_ptr + 2 * n_rows + row, m_t)
        tl.store(stats_ptr + 3 * n_rows + row, log_s_p)
        tl.store(stats_ptr + 4 * n_rows + row, saved)


@triton.jit
def _divergence_bwd_kernel(
    grad_ptr, student_ptr, teacher_ptr, rows_ptr, stats_ptr, g_ptr, n_rows,
    s_inner, s_outer, s_stride, t_inner, t_outer, t_stride, g_outer, g_stride,
    vocab, inv_t_hi, inv_t_lo, beta_hi, beta_lo, ignore_index,
    DIVERGENCE: tl.constexpr, ROWS: tl.constexpr, FP64: tl.constexpr, FAST_LOG2: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    underflow: tl.constexpr = -1100.0 if FP64 else -200.0
    inv_temperature = fp64_arg(inv_t_hi, inv_t_lo, acc_dtype)
    c = inv_temperature * LOG2E
    row = tl.program_id(0).to(tl.int64)
    grad_row = grad_ptr + _row_offset(row, s_inner, g_outer, g_stride)
    cols = tl.arange(0, BLOCK_V)
    if _kept(rows_ptr, row, ignore_index, ROWS) == 0:
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            zero = tl.zeros([BLOCK_V], acc_dtype)
            tl.store(grad_row + offs, cast(zero, grad_ptr.dtype.element_ty), mask=offs < vocab)
    else:
        s_row = student_ptr + _row_offset(row, s_inner, s_outer, s_stride)
        t_row = teacher_ptr + _row_offset(row, t_inner, t_outer, t_stride)
        g = tl.load(g_ptr + row).to(acc_dtype) * inv_temperature
        m_s = tl.load(stats_ptr + row)
        log2_s_q = tl.load(stats_ptr + n_rows + row) * LOG2E
        m_t = tl.load(stats_ptr + 2 * n_rows + row)
        log2_s_p = tl.load(stats_ptr + 3 * n_rows + row) * LOG2E
        saved = tl.load(stats_ptr + 4 * n_rows + row)
        beta = fp64_arg(beta_hi, beta_lo, acc_dtype)
        log2_beta = tl.log2(beta)
        log2_rest = tl.log2(1.0 - beta)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            inside = offs < vocab
            xs = tl.load(s_row + offs, mask=inside, other=float("-inf")).to(acc_dtype)
            xt = tl.load(t_row + offs, mask=inside, other=float("-inf")).to(acc_dtype)
            lq, lp = _log2_probs(xs, xt, m_s, m_t, c, log2_s_q, log2_s_p, underflow)
            q = tl.exp2(lq)
            if DIVERGENCE == 0:
                d = g * (q - tl.exp2(lp))
            elif DIVERGENCE == 1:
                d = g * q * (LN2 * (lq - lp) - saved)
                d = tl.where(saved == float("inf"), float("nan"), d)
            else:
                lm = _log2_mixture(lq, lp, log2_beta, log2_rest, FAST_LOG2)
                d = (g * (1.0 - beta)) * q * (LN2 * (lq - lm) - saved)
            tl.store(grad_row + offs, cast(d, grad_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------- launchers


def _rows_kind(rows: torch.Tensor | None) -> int:
    return ALL_ROWS if rows is None else MASK if rows.dtype == torch.uint8 else LABELS


def _fp64(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def divergence_forward(
    student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor | None,
    layouts: tuple[tuple[int, int, int], tuple[int, int, int]], code: int,
    temperature: float, beta: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward on `student` and `teacher` [..., V] (rows addressed by their
    `layouts`), `rows` None, flat int labels [N] or a uint8 mask [N].

    Returns (divergence [N], stats [N_STATS, N]), fp32 (fp64 if either input is fp64).
    """
    n_rows, vocab = (student.numel() // max(student.shape[-1], 1)), student.shape[-1]
    dtype = torch.float64 if _fp64(student, teacher) else torch.float32
    value = torch.empty(n_rows, dtype=dtype, device=student.device)
    stats = torch.empty(N_STATS, n_rows, dtype=dtype, device=student.device)
    if n_rows == 0:
        return value, stats
    block = block_size(vocab)
    _divergence_fwd_kernel[(n_rows,)](
        student, teacher, value if rows is None else rows, value, stats, n_rows,
        *layouts[0], *layouts[1], vocab, *split_fp64(1.0 / temperature), *split_fp64(beta),
        ignore_index, DIVERGENCE=code, ROWS=_rows_kind(rows), FP64=dtype == torch.float64,
        FAST_LOG2=fast_log2(dtype), BLOCK_V=block, num_warps=_num_warps(block, forward=True),
    )
    return value, stats


def divergence_backward(
    student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor | None,
    layouts: tuple[tuple[int, int, int], tuple[int, int, int]], stats: torch.Tensor,
    g: torch.Tensor, code: int, temperature: float, beta: float, ignore_index: int,
    inplace: bool,
) -> torch.Tensor:
    """The gradient w.r.t. `student` from the upstream gradient `g` [N]: `student` itself
    when `inplace` (nothing of size N*V allocated), else a new contiguous tensor."""
    vocab, n_rows = student.shape[-1], stats.shape[1]
    s_layout = layouts[0]
    if inplace:
        grad, g_layout = student, s_layout[1:]
    else:
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        g_layout = (s_layout[0] * vocab, vocab)
    if n_rows == 0:
        return grad
    block = block_size(vocab)
    _divergence_bwd_kernel[(n_rows,)](
        grad, student, teacher, stats if rows is None else rows, stats, g, n_rows,
        *s_layout, *layouts[1], *g_layout, vocab, *split_fp64(1.0 / temperature),
        *split_fp64(beta), ignore_index, DIVERGENCE=code, ROWS=_rows_kind(rows),
        FP64=_fp64(student, teacher), FAST_LOG2=fast_log2(stats.dtype), BLOCK_V=block,
        num_warps=_num_warps(block),
    )
    return grad
