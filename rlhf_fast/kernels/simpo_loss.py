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

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import cast, fp64_arg, split_fp64
from rlhf_fast.kernels.dpo_loss import (
    REDUCTION_CODES,
    _log_ratios,
    _log_sigmoid,
    _sigmoid,
    pair_backward,
    pair_forward,
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
    beta = fp64_arg(beta_hi, beta_lo, acc_dtype)
    gamma = fp64_arg(gamma_hi, gamma_lo, acc_dtype)
    eps = fp64_arg(eps_hi, eps_lo, acc_dtype)
    s_loss = tl.zeros([BLOCK], acc_dtype)
    s_correct = tl.zeros([BLOCK], acc_dtype)
    s_margin = tl.zeros([BLOCK], acc_dtype)
    for start in range(0, B, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < B
        a, b, _, _, inv_lc, inv_lr = _log_ratios(pc_ptr, pr_ptr, pc_ptr, pr_ptr, lc_ptr,
                                                 lr_ptr, offs, ok, 0.0, acc_dtype, False,
                                                 True, 0)
        loss, d_a = _simpo_terms(a, b, beta, gamma, eps)
        chosen_reward = beta * a
        rejected_reward = beta * b
        tl.store(chosen_reward_ptr + offs, chosen_reward, mask=ok)
        tl.store(rejected_reward_ptr + offs, rejected_reward, mask=ok)
        if REDUCTION == 2:
            tl.store(loss_ptr + offs, loss, mask=ok)
        s_loss += tl.where(ok, loss, 0.0)
        s_correct += tl.where(ok & (chosen_reward > rejected_reward), 1.0, 0.0)
        s_margin += tl.where(ok, chosen_reward - rejected_reward, 0.0)
    total = tl.sum(s_loss, axis=0)
    if REDUCTION == 0:
        tl.store(loss_ptr, total / B)
    elif REDUCTION == 1:
        tl.store(loss_ptr, total)
    tl.store(stats_ptr + 0, tl.sum(s_correct, axis=0) / B)
    tl.store(stats_ptr + 1, tl.sum(s_margin, axis=0) / B)


@triton.jit
def _simpo_bwd_kernel(
    grad_ptr, pc_ptr, pr_ptr, lc_ptr, lr_ptr, d_pc_ptr, d_pr_ptr,
    B, beta_hi, beta_lo, gamma_hi, gamma_lo, eps_hi, eps_lo,
    REDUCTION: tl.constexpr, GRAD_PC: tl.constexpr, GRAD_PR: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta = fp64_arg(beta_hi, beta_lo, acc_dtype)
    gamma = fp64_arg(gamma_hi, gamma_lo, acc_dtype)
    eps = fp64_arg(eps_hi, eps_lo, acc_dtype)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < B
    a, b, _, _, inv_lc, inv_lr = _log_ratios(pc_ptr, pr_ptr, pc_ptr, pr_ptr, lc_ptr, lr_ptr,
                                             offs, ok, 0.0, acc_dtype, False, True, 0)
    loss, d_a = _simpo_terms(a, b, beta, gamma, eps)
    if REDUCTION == 2:
        g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    elif REDUCTION == 0:
        g = tl.load(grad_ptr).to(acc_dtype) / B
    else:
        g = tl.load(grad_ptr).to(acc_dtype)
    if GRAD_PC:
        tl.store(d_pc_ptr + offs, cast(g * d_a * inv_lc, d_pc_ptr.dtype.element_ty), mask=ok)
    if GRAD_PR:
        tl.store(d_pr_ptr + offs, cast(-g * d_a * inv_lr, d_pr_ptr.dtype.element_ty), mask=ok)


def simpo_forward(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor, cfg: SimPOKernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pair_forward` of contiguous [B] inputs: stats [2] = (accuracy, margin)."""
    return pair_forward(_simpo_fwd_kernel, (policy_chosen, policy_rejected, chosen_lengths,
                                            rejected_lengths), 2, cfg.reduction_code,
                        cfg.scalar_args())


def simpo_backward(
    grad_loss: torch.Tensor, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, cfg: SimPOKernelConfig,
    needs_grad: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`pair_backward`: the gradients w.r.t. policy_chosen and policy_rejected."""
    return pair_backward(_simpo_bwd_kernel, grad_loss, (policy_chosen, policy_rejected,
                                                        chosen_lengths, rejected_lengths),
                         needs_grad, cfg.reduction_code, cfg.scalar_args())
