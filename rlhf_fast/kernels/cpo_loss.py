"""CPO on sequence log-probs, fused: a reference-free pairwise term plus the chosen NLL.

Math, per pair i (pc, pr the policy log-probs of the chosen / rejected answer, sums over
its tokens; Lc, Lr the answer lengths, clamped to >= 1; alpha the NLL weight):

    a = pc, b = pr          (sigmoid, hinge)       a = pc / Lc, b = pr / Lr   (ipo)
    term_i, d term / d a, d term / d b: `kernels.dpo_loss._dpo_terms` of the same type
    nll = -sum_j pc_j / sum_j Lc_j                 (one value for the batch)
    loss_i = term_i + alpha nll                    (alpha = 0: the NLL is not added)

Backward, with g_i the upstream gradient of pair i's loss (g / B each for a mean, g for
a sum) and G = sum_i g_i (g for a mean, B g for a sum):

    d pc_i = g_i (d term / d a) / Lc_i [ipo] - alpha G / sum_j Lc_j
    d pr_i = g_i (d term / d b) / Lr_i [ipo]

The forward is one program looping twice over the batch in a fixed order (the NLL's two
sums, then each pair; deterministic, no atomics); it writes the rewards, the loss (per
pair or reduced) and the accuracy, margin and NLL. The backward is elementwise; each of
its programs first sums the lengths (and, for reduction "none", the upstream gradient)
over the batch in the same fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from rlhf_fast.kernels.common import (
    block_at,
    cast,
    fp64_args3,
    pair_step,
    pair_sums,
    split_fp64,
    store_pair_totals,
)
from rlhf_fast.kernels.dpo_loss import (
    LOSS_CODES,
    REDUCTION_CODES,
    _at_least_one,
    _dpo_terms,
    pair_launchers,
)
from rlhf_fast.types import CPO_LENGTH_NORMALISED_TYPES


@dataclass(frozen=True)
class CPOKernelConfig:
    """The scalar settings of one cpo_loss call, as the kernels take them (loss_code: the
    `kernels.dpo_loss` code of the same pairwise term)."""

    loss_code: int
    length_norm: bool
    beta: float
    eps: float
    alpha: float
    reduction_code: int

    @classmethod
    def from_options(cls, opt: Any) -> CPOKernelConfig:
        """From the checked `rlhf_fast.options.CPO_OPTIONS` of a call."""
        return cls(loss_code=LOSS_CODES[opt.loss_type],
                   length_norm=opt.loss_type in CPO_LENGTH_NORMALISED_TYPES,
                   beta=opt.beta, eps=opt.label_smoothing, alpha=opt.alpha,
                   reduction_code=REDUCTION_CODES[opt.reduction])

    def constexprs(self) -> dict[str, Any]:
        """The kernels' compile-time switches."""
        return dict(LOSS=self.loss_code, LENGTH_NORM=self.length_norm, HAS_NLL=self.alpha != 0)

    def scalar_args(self) -> tuple[float, ...]:
        return (*split_fp64(self.beta), *split_fp64(self.eps), *split_fp64(self.alpha))


@triton.jit
def _pairs(pc_ptr, pr_ptr, lc_ptr, lr_ptr, offs, ok, acc_dtype: tl.constexpr,
           LENGTH_NORM: tl.constexpr):
    """(pc, a, b, 1 / Lc, 1 / Lr) of the pairs at `offs` (a = pc, b = pr unless
    LENGTH_NORM)."""
    pc = tl.load(pc_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    b = tl.load(pr_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    inv_lc = 1.0 / _at_least_one(tl.load(lc_ptr + offs, mask=ok, other=1).to(acc_dtype))
    a = pc
    if LENGTH_NORM:
        inv_lr = 1.0 / _at_least_one(tl.load(lr_ptr + offs, mask=ok, other=1).to(acc_dtype))
        a = pc * inv_lc
        b = b * inv_lr
    else:
        inv_lr = tl.full(pc.shape, 1.0, acc_dtype)
    return pc, a, b, inv_lc, inv_lr


@triton.jit
def _total_length(lc_ptr, B, acc_dtype: tl.constexpr, BLOCK: tl.constexpr):
    """sum_j max(Lc_j, 1), in a fixed order."""
    s_len = tl.zeros([BLOCK], acc_dtype)
    for start in range(0, B, BLOCK):
        offs, ok = block_at(start, B, BLOCK)
        s_len += tl.where(ok, _at_least_one(tl.load(lc_ptr + offs, mask=ok, other=1)
                                            .to(acc_dtype)), 0.0)
    return tl.sum(s_len, axis=0)


@triton.jit
def _chosen_nll(pc_ptr, lc_ptr, B, acc_dtype: tl.constexpr, BLOCK: tl.constexpr):
    """-sum_j pc_j / sum_j max(Lc_j, 1): the chosen answers' NLL per token."""
    s_logp = tl.zeros([BLOCK], acc_dtype)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s_logp += tl.load(pc_ptr + offs, mask=offs < B, other=0.0).to(acc_dtype)
    return -tl.sum(s_logp, axis=0) / _total_length(lc_ptr, B, acc_dtype, BLOCK)


@triton.jit
def _cpo_fwd_kernel(
    pc_ptr, pr_ptr, lc_ptr, lr_ptr, loss_ptr, chosen_reward_ptr, rejected_reward_ptr,
    stats_ptr, B, beta_hi, beta_lo, eps_hi, eps_lo, alpha_hi, alpha_lo,
    LOSS: tl.constexpr, LENGTH_NORM: tl.constexpr, HAS_NLL: tl.constexpr,
    REDUCTION: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta, eps, alpha = fp64_args3(beta_hi, beta_lo, eps_hi, eps_lo, alpha_hi, alpha_lo, acc_dtype)
    nll = _chosen_nll(pc_ptr, lc_ptr, B, acc_dtype, BLOCK)
    s_loss, s_correct, s_margin = pair_sums(acc_dtype, BLOCK)
    for start in range(0, B, BLOCK):
        offs, ok = block_at(start, B, BLOCK)
        pc, a, b, inv_lc, inv_lr = _pairs(pc_ptr, pr_ptr, lc_ptr, lr_ptr, offs, ok,
                                          acc_dtype, LENGTH_NORM)
        loss, d_a, d_b = _dpo_terms(a, b, beta, eps, 0.0, 0.0, LOSS)
        if HAS_NLL:
            loss += alpha * nll
        s_loss, s_correct, s_margin = pair_step(
            loss_ptr, chosen_reward_ptr, rejected_reward_ptr, offs, ok, loss, beta * a,
            beta * b, s_loss, s_correct, s_margin, REDUCTION)
    store_pair_totals(loss_ptr, stats_ptr, s_loss, s_correct, s_margin, B, REDUCTION)
    tl.store(stats_ptr + 2, nll)


@triton.jit
def _upstream(grad_ptr, offs, ok, B, acc_dtype: tl.constexpr, REDUCTION: tl.constexpr,
              BLOCK: tl.constexpr):
    """(g_i at `offs`, G = sum of g over the batch) of the upstream gradient of the loss."""
    if REDUCTION == 2:
        g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
        s_g = tl.zeros([BLOCK], acc_dtype)
        for start in range(0, B, BLOCK):
            all_offs = start + tl.arange(0, BLOCK)
            s_g += tl.load(grad_ptr + all_offs, mask=all_offs < B, other=0.0).to(acc_dtype)
        total = tl.sum(s_g, axis=0)
    elif REDUCTION == 0:
        total = tl.load(grad_ptr).to(acc_dtype)
        g = tl.zeros([BLOCK], acc_dtype) + total / B
    else:
        g = tl.zeros([BLOCK], acc_dtype) + tl.load(grad_ptr).to(acc_dtype)
        total = tl.load(grad_ptr).to(acc_dtype) * B
    return g, total


@triton.jit
def _cpo_bwd_kernel(
    grad_ptr, pc_ptr, pr_ptr, lc_ptr, lr_ptr, d_pc_ptr, d_pr_ptr,
    B, beta_hi, beta_lo, eps_hi, eps_lo, alpha_hi, alpha_lo,
    LOSS: tl.constexpr, LENGTH_NORM: tl.constexpr, HAS_NLL: tl.constexpr,
    REDUCTION: tl.constexpr, GRAD_PC: tl.constexpr, GRAD_PR: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta, eps, alpha = fp64_args3(beta_hi, beta_lo, eps_hi, eps_lo, alpha_hi, alpha_lo, acc_dtype)
    offs, ok = block_at(tl.program_id(0) * BLOCK, B, BLOCK)
    pc, a, b, inv_lc, inv_lr = _pairs(pc_ptr, pr_ptr, lc_ptr, lr_ptr, offs, ok, acc_dtype,
                                      LENGTH_NORM)
    loss, d_a, d_b = _dpo_terms(a, b, beta, eps, 0.0, 0.0, LOSS)
    g, g_total = _upstream(grad_ptr, offs, ok, B, acc_dtype, REDUCTION, BLOCK)
    if GRAD_PC:
        if LENGTH_NORM:
            d_pc = g * d_a * inv_lc
        else:
            d_pc = g * d_a
        if HAS_NLL:
            d_pc -= alpha * g_total / _total_length(lc_ptr, B, acc_dtype, BLOCK)
        tl.store(d_pc_ptr + offs, cast(d_pc, d_pc_ptr.dtype.element_ty), mask=ok)
    if GRAD_PR:
        tl.store(d_pr_ptr + offs, cast(g * d_b * inv_lr, d_pr_ptr.dtype.element_ty), mask=ok)



#: The forward's statistics: (accuracy, margin, nll).
N_STATS = 3
#: The (forward, backward) launchers (`pair_launchers`).
LAUNCHERS = pair_launchers(_cpo_fwd_kernel, _cpo_bwd_kernel, N_STATS)
