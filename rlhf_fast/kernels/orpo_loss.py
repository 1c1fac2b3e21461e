"""ORPO on sequence log-probs, fused: the chosen NLL plus an odds-ratio term per pair.

Math, per pair i (pc, pr the policy log-probs of the chosen / rejected answer, sums over
its tokens; Lc, Lr the answer lengths, clamped to >= 1; s the logistic sigmoid):

    lc = pc / Lc    lr = pr / Lr                    (per-token means, <= 0)
    qc = 1 - e^lc   qr = 1 - e^lr                   (the answers' "1 - P")
    log_odds = (lc - lr) - (log qc - log qr)        (log qc = log1mexp(lc))
    ratio = log s(log_odds)
    nll = -sum_j pc_j / sum_j Lc_j                  (one value for the batch)
    loss_i = nll - beta ratio_i
    d ratio / d lc = s(-log_odds) / qc     d ratio / d lr = -s(-log_odds) / qr

log1mexp(x) = log(1 - e^x) without cancellation (Maechler 2012): below -ln 2 it is
log1p(-e^x) (Goldberg's log1p: 1 - e^x there is exact enough, but not its log near 0);
from -ln 2 to 0 it is log(qc) with qc = -expm1(x) by Kahan's expm1, which keeps full
relative precision as x -> 0. At lc = 0 exactly (a certain chosen answer) qc = 0: the
log odds ratio is +inf and ratio 0, but s(-log_odds) / qc is 0 / 0; its limit is
e^lr / qr (the rejected answer's odds), which the kernels use there (the reference
gets it from a first-order expansion). lr = 0 exactly: ratio -inf, d lr inf; both 0 or
a positive mean log-prob: NaN.

Backward, with g_i, G as in `kernels.cpo_loss` (G = sum of the upstream over the batch):

    d pc_i = -beta g_i (d ratio / d lc) / Lc_i - G / sum_j Lc_j
    d pr_i = -beta g_i (d ratio / d lr) / Lr_i

Launches as `kernels.cpo_loss`: a forward of one program looping over the batch twice
(the NLL's sums, then each pair), an elementwise backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from rlhf_fast.kernels.common import (
    block_at,
    cast,
    fp64_arg,
    pair_step,
    pair_sums,
    split_fp64,
    store_pair_totals,
)
from rlhf_fast.kernels.cpo_loss import _chosen_nll, _pairs, _total_length, _upstream
from rlhf_fast.kernels.dpo_loss import (
    REDUCTION_CODES,
    _log_sigmoid,
    _sigmoid,
    pair_launchers,
)


@dataclass(frozen=True)
class ORPOKernelConfig:
    """The scalar settings of one orpo_loss call, as the kernels take them."""

    beta: float
    reduction_code: int

    @classmethod
    def from_options(cls, opt: Any) -> ORPOKernelConfig:
        """From the checked `rlhf_fast.options.ORPO_OPTIONS` of a call."""
        return cls(beta=opt.beta, reduction_code=REDUCTION_CODES[opt.reduction])

    def constexprs(self) -> dict[str, Any]:
        """The kernels' compile-time switches: none."""
        return {}

    def scalar_args(self) -> tuple[float, ...]:
        return split_fp64(self.beta)


@triton.jit
def _one_minus_exp(x):
    """(1 - e^x, e^x) for x <= 0: the difference directly below -ln 2 (no cancellation
    there), Kahan's expm1 above: (1 - e) x / log(e), or -x where e rounds to 1."""
    e = tl.exp(x)
    kahan = tl.where(e == 1.0, -x, (1.0 - e) * (x / tl.log(e)))
    return tl.where(x < -0.6931471805599453, 1.0 - e, kahan), e


@triton.jit
def _log1mexp(x, q, e):
    """log(1 - e^x) from x, q = 1 - e^x and e = e^x: Goldberg's log1p(-e) below -ln 2,
    log(q) above."""
    u = 1.0 - e
    log1p = tl.where(u == 1.0, -e, tl.log(u) * (-e / (u - 1.0)))
    return tl.where(x < -0.6931471805599453, log1p, tl.log(q))


@triton.jit
def _orpo_terms(lc, lr):
    """(ratio, log_odds, d ratio / d lc, d ratio / d lr) of each pair."""
    q_c, e_c = _one_minus_exp(lc)
    q_r, e_r = _one_minus_exp(lr)
    log_q_r = _log1mexp(lr, q_r, e_r)
    log_odds = (lc - lr) - (_log1mexp(lc, q_c, e_c) - log_q_r)
    certain = lc == 0.0
    odds_r = tl.exp(lr - log_q_r)
    # at lc = 0: ratio 0 (NaN if lr = 0 too, as lc * odds_r is), slope the rejected odds
    ratio = tl.where(certain, lc * odds_r, _log_sigmoid(log_odds))
    s_neg = _sigmoid(-log_odds)
    d_lc = tl.where(certain, odds_r, s_neg / q_c)
    d_lr = -s_neg / q_r
    return ratio, log_odds, d_lc, d_lr


@triton.jit
def _orpo_fwd_kernel(
    pc_ptr, pr_ptr, lc_ptr, lr_ptr, loss_ptr, chosen_reward_ptr, rejected_reward_ptr,
    stats_ptr, B, beta_hi, beta_lo,
    REDUCTION: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta = fp64_arg(beta_hi, beta_lo, acc_dtype)
    nll = _chosen_nll(pc_ptr, lc_ptr, B, acc_dtype, BLOCK)
    s_loss, s_correct, s_margin = pair_sums(acc_dtype, BLOCK)
    s_ratio = tl.zeros([BLOCK], acc_dtype)
    s_log_odds = tl.zeros([BLOCK], acc_dtype)
    for start in range(0, B, BLOCK):
        offs, ok = block_at(start, B, BLOCK)
        pc, lc, lr, inv_lc, inv_lr = _pairs(pc_ptr, pr_ptr, lc_ptr, lr_ptr, offs, ok,
                                            acc_dtype, True)
        ratio, log_odds, d_lc, d_lr = _orpo_terms(lc, lr)
        loss = nll - beta * ratio
        s_loss, s_correct, s_margin = pair_step(
            loss_ptr, chosen_reward_ptr, rejected_reward_ptr, offs, ok, loss, beta * lc,
            beta * lr, s_loss, s_correct, s_margin, REDUCTION)
        s_ratio += tl.where(ok, ratio, 0.0)
        s_log_odds += tl.where(ok, log_odds, 0.0)
    store_pair_totals(loss_ptr, stats_ptr, s_loss, s_correct, s_margin, B, REDUCTION)
    tl.store(stats_ptr + 2, nll)
    tl.store(stats_ptr + 3, tl.sum(s_ratio, axis=0) / B)
    tl.store(stats_ptr + 4, tl.sum(s_log_odds, axis=0) / B)


@triton.jit
def _orpo_bwd_kernel(
    grad_ptr, pc_ptr, pr_ptr, lc_ptr, lr_ptr, d_pc_ptr, d_pr_ptr, B, beta_hi, beta_lo,
    REDUCTION: tl.constexpr, GRAD_PC: tl.constexpr, GRAD_PR: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta = fp64_arg(beta_hi, beta_lo, acc_dtype)
    offs, ok = block_at(tl.program_id(0) * BLOCK, B, BLOCK)
    pc, lc, lr, inv_lc, inv_lr = _pairs(pc_ptr, pr_ptr, lc_ptr, lr_ptr, offs, ok, acc_dtype,
                                        True)
    ratio, log_odds, d_lc, d_lr = _orpo_terms(lc, lr)
    g, g_total = _upstream(grad_ptr, offs, ok, B, acc_dtype, REDUCTION, BLOCK)
    if GRAD_PC:
        d_pc = -beta * g * d_lc * inv_lc - g_total / _total_length(lc_ptr, B, acc_dtype, BLOCK)
        tl.store(d_pc_ptr + offs, cast(d_pc, d_pc_ptr.dtype.element_ty), mask=ok)
    if GRAD_PR:
        d_pr = -beta * g * d_lr * inv_lr
        tl.store(d_pr_ptr + offs, cast(d_pr, d_pr_ptr.dtype.element_ty), mask=ok)



#: The forward's statistics: (accuracy, margin, nll, mean log s(log_odds), mean log_odds).
N_STATS = 5
#: The (forward, backward) launchers (`pair_launchers`).
LAUNCHERS = pair_launchers(_orpo_fwd_kernel, _orpo_bwd_kernel, N_STATS)
