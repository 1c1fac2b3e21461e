"""Log-softmax gather + entropy over the vocabulary: forward and backward Triton kernels.

Math (z = logits / T, one row of V entries, label y):

    lse   = logsumexp(z)                      logp = z_y - lse
    H     = lse - sum_j p_j z_j               p_j  = exp(z_j - lse)
    L2    = log sum_j p_j^2                   (return_sum_p2: verl's optimal token
                                               baseline and WPO read sum_j p_j^2)
    dz_j  = g_logp * (1[j = y] - p_j) - g_H * p_j * (log p_j + H)
            + g_L2 * 2 p_j (p_j / exp(L2) - 1)
    dx_j  = dz_j / T

Forward, one read of the row, in base 2 with the scale folded in (c = log2(e) / T, so
2^(c (x - m)) = exp((x - m) / T), and the exponential is one MUFU.EX2, no range fix-up):
each block of BLOCK_V raw logits x moves the running max m of the row (one block-wide
max), then every lane adds to its own partial sums, reduced once after the loop:

    s = sum_j 2^(c (x_j - m))      t = sum_j 2^(c (x_j - m)) c (x_j - m)
    q = sum_j 4^(c (x_j - m))      (return_sum_p2)

When the max moves from m to m' (a uniform branch, taken a few times per row), the lanes
rescale: with d = c (m - m') and a = 2^d, s becomes a s, t becomes a (t + s d) and q
becomes a^2 q. At the end, log s is the row's logsumexp below m / T, and

    logp = (x_y - m) / T - log s      H = log s - ln(2) t / s      L2 = log q - 2 log s

Every term is a difference of nearby values or O(log V), so all keep fp32 precision for
logits of 1e4, where lse itself (ulp 1e-3 there) would not, and lse - E[z] would cancel
catastrophically. Exponents are clamped at UNDERFLOW (where 2^x is 0 in the accumulation
dtype, NaN kept): a -inf logit adds 0 and 0 * -inf never occurs.

Backward, one read and one write of the row: log2 p_j = c (x_j - m) - log2 s from the
saved (m, log s) pair, then dx_j = p_j (-g_logp - g_H (ln(2) log2 p_j + H)
+ 2 g_L2 (p_j / exp(L2) - 1)) / T, the 1 / T folded into the upstream gradients. The
one-hot term g_logp / T is added once per row: the label's gradient is computed from its
logit read before the loop (the in-place backward overwrites the row) and stored after
it, behind a barrier.

A -inf logit is a token of probability 0 (p log p = 0). A NaN or +inf logit makes that
row NaN; a label outside [0, V) makes the row NaN (stored log s = NaN, so the
backward writes NaN too) and is never used as an address. Rows labelled ignore_index are not
read: outputs 0 (all three), gradient 0.

Batch invariance: one program per row, and BLOCK_V depends only on V, so a row's
outputs are bit-identical whatever the other rows and N are. Row offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import cast, fp64_arg, split_fp64

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # 1 / ln(2)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_offset(row, n_inner, stride_outer, stride_inner):
    # Rows of a [A, B, V] view with arbitrary A / B strides, e.g. logits[:, :-1].
    return (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


@triton.jit
def _exponent(x, UNDERFLOW: tl.constexpr):
    # max(x, UNDERFLOW), NaN kept: 2^UNDERFLOW is 0, and 0 times it is 0, not 0 * -inf.
    return tl.maximum(x, UNDERFLOW, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, sum_p2_ptr, row_max_ptr, log_sum_ptr,
    n_inner, stride_outer, stride_inner,
    vocab, inv_t_hi, inv_t_lo, ignore_index,
    COMPUTE_ENTROPY: tl.constexpr, COMPUTE_SUM_P2: tl.constexpr, FP64: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    underflow: tl.constexpr = -1100.0 if FP64 else -200.0
    inv_temperature = fp64_arg(inv_t_hi, inv_t_lo, acc_dtype)
    c = inv_temperature * LOG2E
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(row_max_ptr + row, 0.0)
        tl.store(log_sum_ptr + row, 0.0)
        if COMPUTE_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        if COMPUTE_SUM_P2:
            tl.store(sum_p2_ptr + row, 0.0)
    else:
        row_ptr = logits_ptr + _row_offset(row, n_inner, stride_outer, stride_inner)
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([], float("-inf"), acc_dtype)
        s = tl.zeros([BLOCK_V], acc_dtype)
        t = tl.zeros([BLOCK_V], acc_dtype)
        q = tl.zeros([BLOCK_V], acc_dtype)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(acc_dtype)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            if m_new > m:
                # Nothing summed yet while m is -inf: no rescale (and no -inf - -inf).
                d = tl.where(m == float("-inf"), 0.0, (m - m_new) * c)
                a = tl.exp2(d)
                if COMPUTE_ENTROPY:
                    t = a * (t + s * d)
                if COMPUTE_SUM_P2:
                    q = q * (a * a)
                s = s * a
                m = m_new
            z = _exponent((x - tl.where(m == float("-inf"), 0.0, m)) * c, underflow)
            e = tl.exp2(z)
            s += e
            if COMPUTE_ENTROPY:
                t += e * z
            if COMPUTE_SUM_P2:
                q += e * e
        s_row = tl.sum(s, axis=0)
        label_ok = (label >= 0) & (label < vocab)
        x_label = tl.load(row_ptr + label, mask=label_ok, other=0.0).to(acc_dtype)
        log_s = tl.where(label_ok, tl.log(s_row), float("nan"))
        tl.store(logp_ptr + row, (x_label - m) * inv_temperature - log_s)
        tl.store(row_max_ptr + row, m)
        tl.store(log_sum_ptr + row, log_s)
        if COMPUTE_ENTROPY:
            entropy = log_s - LN2 * tl.sum(t, axis=0) / s_row
            tl.store(entropy_ptr + row, entropy)  # NaN with log_s
        if COMPUTE_SUM_P2:
            tl.store(sum_p2_ptr + row, tl.log(tl.sum(q, axis=0)) - 2.0 * log_s)


@triton.jit
def _scaled_grad(x, row_max, c, log2_sum, g_logp, g_entropy, entropy, g_sum_p2, inv_sum_p2,
                 HAS_G_ENTROPY: tl.constexpr, HAS_G_SUM_P2: tl.constexpr,
                 UNDERFLOW: tl.constexpr):
    # dx without the one-hot term, the gradients already divided by T
    log2_p = _exponent((x - row_max) * c - log2_sum, UNDERFLOW)
    p = tl.exp2(log2_p)
    g = -g_logp
    if HAS_G_ENTROPY:
        g -= g_entropy * (log2_p * LN2 + entropy)
    if HAS_G_SUM_P2:
        g += g_sum_p2 * (p * inv_sum_p2 - 1.0)
    return p * g


@triton.jit
def _logprobs_bwd_kernel(
    grad_ptr, logits_ptr, labels_ptr, row_max_ptr, log_sum_ptr, entropy_ptr, sum_p2_ptr,
    g_logp_ptr, g_entropy_ptr, g_sum_p2_ptr,
    n_inner, stride_outer, stride_inner, g_stride_outer, g_stride_inner,
    vocab, label_shift, inv_t_hi, inv_t_lo, ignore_index,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr, HAS_G_SUM_P2: tl.constexpr,
    FP64: tl.constexpr, BLOCK_V: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    underflow: tl.constexpr = -1100.0 if FP64 else -200.0
    inv_temperature = fp64_arg(inv_t_hi, inv_t_lo, acc_dtype)
    c = inv_temperature * LOG2E
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    grad_row_ptr = grad_ptr + _row_offset(row, n_inner, g_stride_outer, g_stride_inner)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            zero = tl.zeros([BLOCK_V], acc_dtype)
            tl.store(grad_row_ptr + offs, cast(zero, grad_ptr.dtype.element_ty), mask=offs < vocab)
    else:
        row_ptr = logits_ptr + _row_offset(row, n_inner, stride_outer, stride_inner)
        row_max = tl.load(row_max_ptr + row)
        log2_sum = tl.load(log_sum_ptr + row) * LOG2E
        g_logp = tl.zeros([], acc_dtype)
        if HAS_G_LOGP:
            g_logp = tl.load(g_logp_ptr + row).to(acc_dtype) * inv_temperature
        g_entropy = tl.zeros([], acc_dtype)
        entropy = tl.zeros([], acc_dtype)
        if HAS_G_ENTROPY:
            g_entropy = tl.load(g_entropy_ptr + row).to(acc_dtype) * inv_temperature
            entropy = tl.load(entropy_ptr + row)
        g_sum_p2 = tl.zeros([], acc_dtype)
        inv_sum_p2 = tl.zeros([], acc_dtype)
        if HAS_G_SUM_P2:
            g_sum_p2 = 2.0 * tl.load(g_sum_p2_ptr + row).to(acc_dtype) * inv_temperature
            inv_sum_p2 = tl.exp(-tl.load(sum_p2_ptr + row))
        # The label's column in this slice of the row (label_shift: the vocab-chunked
        # backward of linear_logprobs), read before the loop may overwrite it.
        y = label - label_shift
        has_label = (y >= 0) & (y < vocab)
        x_label = tl.load(row_ptr + y, mask=has_label, other=0.0).to(acc_dtype)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            mask = offs < vocab
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
            dx = _scaled_grad(x, row_max, c, log2_sum, g_logp, g_entropy, entropy, g_sum_p2,
                              inv_sum_p2, HAS_G_ENTROPY, HAS_G_SUM_P2, underflow)
            tl.store(grad_row_ptr + offs, cast(dx, grad_ptr.dtype.element_ty), mask=mask)
        if HAS_G_LOGP:
            if has_label:
                dx_label = g_logp + _scaled_grad(
                    x_label, row_max, c, log2_sum, g_logp, g_entropy, entropy, g_sum_p2,
                    inv_sum_p2, HAS_G_ENTROPY, HAS_G_SUM_P2, underflow)
                tl.debug_barrier()  # after the loop's store of the same element
                tl.store(grad_row_ptr + y, cast(dx_label, grad_ptr.dtype.element_ty))


MAX_BLOCK_V = 4096


def block_size(vocab: int) -> int:
    """BLOCK_V for a vocabulary of `vocab`: a function of V alone (batch invariance)."""
    return min(MAX_BLOCK_V, max(16, triton.next_power_of_2(vocab)))


def _num_warps(block: int, forward: bool = False) -> int:
    # The forward's per-lane sums (s and t: two registers per element a thread holds)
    # fit at 8 elements per thread: 16 warps over the largest block.
    return (16 if forward else 8) if block >= 4096 else 4 if block >= 1024 else 2


def row_layout(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(n_inner, stride_outer, stride_inner) addressing the rows of `t` [..., V], or None.

    Leading dims are merged where their strides allow; a row-strided view such as
    ``logits[:, :-1]`` of a contiguous [B, T, V] keeps two dims: row r sits at
    (r // n_inner) * stride_outer + (r % n_inner) * stride_inner. None when more than two
    leading dims remain after merging (the caller copies).
    """
    dims = [(n, st) for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n != 1]
    merged: list[tuple[int, int]] = []
    for n, st in dims:
        if merged and merged[-1][1] == st * n:
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    if not merged:
        return 1, 0, 0
    if len(merged) == 1:
        return merged[0][0], 0, merged[0][1]
    if len(merged) == 2:
        return merged[1][0], merged[0][1], merged[1][1]
    return None


def logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    layout: tuple[int, int, int],
    temperature: float,
    ignore_index: int,
    compute_entropy: bool,
    compute_sum_p2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Launch the forward on `logits` [..., V] (rows addressed by `layout`), labels [N].

    Returns flat (logp [N], entropy [N] or None, log_sum_p2 [N] or None, row_stats [2, N])
    in fp32 (fp64 for fp64 logits); row_stats holds each row's max and log-sum-exp below
    it, for the backward.
    """
    n_rows, vocab = labels.numel(), logits.shape[-1]
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty(n_rows, dtype=out_dtype, device=logits.device)
    row_stats = torch.empty(2, n_rows, dtype=out_dtype, device=logits.device)
    entropy = torch.empty_like(logp) if compute_entropy else None
    sum_p2 = torch.empty_like(logp) if compute_sum_p2 else None
    if n_rows == 0:
        return logp, entropy, sum_p2, row_stats
    block = block_size(vocab)
    _logprobs_fwd_kernel[(n_rows,)](
        logits, labels, logp, logp if entropy is None else entropy,
        logp if sum_p2 is None else sum_p2, row_stats[0], row_stats[1],
        *layout, vocab, *split_fp64(1.0 / temperature), ignore_index,
        COMPUTE_ENTROPY=compute_entropy, COMPUTE_SUM_P2=compute_sum_p2,
        FP64=logits.dtype == torch.float64, BLOCK_V=block,
        num_warps=_num_warps(block, forward=True),
    )
    return logp, entropy, sum_p2, row_stats


def logprobs_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    layout: tuple[int, int, int],
    row_stats: torch.Tensor,
    entropy: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    inplace: bool,
    label_shift: int = 0,
    log_sum_p2: torch.Tensor | None = None,
    g_sum_p2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. `logits` from the outputs' upstream gradients (flat [N], or None;
    `log_sum_p2` is the forward's output, read with `g_sum_p2`).

    Returns a tensor shaped like `logits` in its dtype: `logits` itself when `inplace`
    (nothing of size N*V is allocated), else a new contiguous one. `logits` may be a
    column slice [.., v0 : v0 + V'] of the full rows (`label_shift` = v0) when
    `row_stats` (and `entropy`) come from the full rows: the vocab-chunked backward of
    linear_logprobs.
    """
    vocab = logits.shape[-1]
    n_rows = labels.numel()
    n_inner = layout[0]
    if inplace:
        grad, g_layout = logits, layout[1:]
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        g_layout = (n_inner * vocab, vocab)
    if n_rows == 0:
        return grad
    block = block_size(vocab)
    unused = row_stats[0]  # any valid pointer for arguments a constexpr flag switches off
    _logprobs_bwd_kernel[(n_rows,)](
        grad, logits, labels, row_stats[0], row_stats[1],
        unused if g_entropy is None else entropy,
        unused if g_sum_p2 is None else log_sum_p2,
        unused if g_logp is None else g_logp,
        unused if g_entropy is None else g_entropy,
        unused if g_sum_p2 is None else g_sum_p2,
        *layout, *g_layout, vocab, label_shift, *split_fp64(1.0 / temperature), ignore_index,
        HAS_G_LOGP=g_logp is not None, HAS_G_ENTROPY=g_entropy is not None,
        HAS_G_SUM_P2=g_sum_p2 is not None, FP64=logits.dtype == torch.float64,
        BLOCK_V=block, num_warps=_num_warps(block),
    )
    return grad
