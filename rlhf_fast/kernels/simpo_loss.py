"""SimPO on sequence log-probs, fused: reference-free, length-normalised, with a margin.

Math, per pair i (pc, pr the policy log-probs of the chosen / rejected answer, sums over
its tokens; Lc, Lr the answer lengths, clamped to >= 1; s the logistic sigmoid, eps the
label smoothing, gamma the target margin):

    a = pc / Lc    b = pr / Lr    z = beta * (a - b) - gamma
    loss = -(1 - eps) log s(z) - eps log s(-z)
    d loss / d z = eps s(z) - (1 - eps) s(-z)
    d pc = g beta (d loss / d z) / Lc      d pr = -g beta (d loss / d z) / Lr

g the upstream gradient of the pair's loss (g / B for a mean). log s and s as in
`kernels.dpo_loss` (from e^-|x| alone: finite for margins of any size).

Two launches, as `kernels.dpo_loss`: the forward one program looping over the batch in a
fixed order (rewards, the loss per pair or reduced, accuracy and margin; deterministic),
the backward elementwise, recomputing the terms from the inputs.
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
    upstream_grad,
)
from rlhf_fast.kernels.dpo_loss import (
    REDUCTION_CODES,
    _log_ratios,
    _log_sigmoid,
    _sigmoid,
    pair_launchers,
)


@dataclass(frozen=True)
class SimPOKernelConfig:
    """The scalar settings of one simpo_loss call, as the kernels take them."""

    beta: float
    gamma: float
    eps: float
    reduction_code: int

    @classmethod
    def from_options(cls, opt: Any) -> SimPOKernelConfig:
        """From the checked `rlhf_fast.options.SIMPO_OPTIONS` of a call."""
        return cls(beta=opt.beta, gamma=opt.gamma, eps=opt.label_smoothing,
                   reduction_code=REDUCTION_CODES[opt.reduction])

    def constexprs(self) -> dict[str, Any]:
        """The kernels' compile-time switches: none."""
        return {}

    def scalar_args(self) -> tuple[float, ...]:
        return (*split_fp64(self.beta), *split_fp64(self.gamma), *split_fp64(self.eps))


@triton.jit
def _simpo_terms(a, b, beta, gamma, eps):
    """(loss, d loss / d a) of each pair from its mean log-probs a and b (d / d b = -d a)."""
    z = beta * (a - b) - gamma
    loss = -(1.0 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
    d_a = beta * (eps * _sigmoid(z) - (1.0 - eps) * _sigmoid(-z))
    return loss, d_a


@triton.jit
def _simpo_fwd_kernel(
    pc_ptr, pr_ptr, lc_ptr, lr_ptr, loss_ptr, chosen_reward_ptr, rejected_reward_ptr,
    stats_ptr, B, beta_hi, beta_lo, gamma_hi, gamma_lo, eps_hi, eps_lo,
    REDUCTION: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta, gamma, eps = fp64_args3(beta_hi, beta_lo, gamma_hi, gamma_lo, eps_hi, eps_lo, acc_dtype)
    s_loss, s_correct, s_margin = pair_sums(acc_dtype, BLOCK)
    for start in range(0, B, BLOCK):
        offs, ok = block_at(start, B, BLOCK)
        a, b, _, _, inv_lc, inv_lr = _log_ratios(pc_ptr, pr_ptr, pc_ptr, pr_ptr, lc_ptr,
                                                 lr_ptr, offs, ok, 0.0, acc_dtype, False,
                                                 True, 0)
        loss, d_a = _simpo_terms(a, b, beta, gamma, eps)
        s_loss, s_correct, s_margin = pair_step(
            loss_ptr, chosen_reward_ptr, rejected_reward_ptr, offs, ok, loss, beta * a,
            beta * b, s_loss, s_correct, s_margin, REDUCTION)
    store_pair_totals(loss_ptr, stats_ptr, s_loss, s_correct, s_margin, B, REDUCTION)


@triton.jit
def _simpo_bwd_kernel(
    grad_ptr, pc_ptr, pr_ptr, lc_ptr, lr_ptr, d_pc_ptr, d_pr_ptr,
    B, beta_hi, beta_lo, gamma_hi, gamma_lo, eps_hi, eps_lo,
    REDUCTION: tl.constexpr, GRAD_PC: tl.constexpr, GRAD_PR: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta, gamma, eps = fp64_args3(beta_hi, beta_lo, gamma_hi, gamma_lo, eps_hi, eps_lo, acc_dtype)
    offs, ok = block_at(tl.program_id(0) * BLOCK, B, BLOCK)
    a, b, _, _, inv_lc, inv_lr = _log_ratios(pc_ptr, pr_ptr, pc_ptr, pr_ptr, lc_ptr, lr_ptr,
                                             offs, ok, 0.0, acc_dtype, False, True, 0)
    loss, d_a = _simpo_terms(a, b, beta, gamma, eps)
    g = upstream_grad(grad_ptr, offs, ok, B, acc_dtype, REDUCTION)
    if GRAD_PC:
        tl.store(d_pc_ptr + offs, cast(g * d_a * inv_lc, d_pc_ptr.dtype.element_ty), mask=ok)
    if GRAD_PR:
        tl.store(d_pr_ptr + offs, cast(-g * d_a * inv_lr, d_pr_ptr.dtype.element_ty), mask=ok)



#: The forward's statistics: (accuracy, margin).
N_STATS = 2
#: The (forward, backward) launchers (`pair_launchers`).
LAUNCHERS = pair_launchers(_simpo_fwd_kernel, _simpo_bwd_kernel, N_STATS)
