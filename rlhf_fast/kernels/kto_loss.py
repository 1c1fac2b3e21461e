"""KTO on unpaired sequence log-probs, fused.

Math, per example i (p, r the policy's and the reference's log-probs of its answer, a
sum over its tokens; d_i whether it is desirable; z = max(kl_ref, 0) the reference-point
KL, no gradient; w_d, w_u the group weights; s the logistic sigmoid):

    u = beta (p - r - z)
    loss_i = w_d (1 - s(u)) = w_d s(-u)          (desirable)
           = w_u (1 - s(-u)) = w_u s(u)          (undesirable)
    d loss_i / d u = -w_d s(u) s(-u)  or  w_u s(u) s(-u)
    d p = g_i beta (d loss_i / d u) = -d r

g_i the upstream gradient of example i's loss (g / B for a mean, over all B examples:
TRL means the two groups' concatenated losses). 1 - s(x) is written s(-x): exact for
tiny losses. The forward is one program looping over the batch in a fixed order (the
rewards, the loss per example or reduced, the two groups' mean rewards); the backward
is elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import (
    block_at,
    cast,
    fp64_args3,
    loss_step,
    mask_view,
    math_dtype,
    split_fp64,
    store_reduced_loss,
    upstream_grad,
)
from rlhf_fast.kernels.dpo_loss import BWD_BLOCK, FWD_BLOCK, REDUCTION_CODES, _sigmoid


@dataclass(frozen=True)
class KTOKernelConfig:
    """The scalar settings of one kto_loss call, as the kernels take them."""

    beta: float
    desirable_weight: float
    undesirable_weight: float
    reduction_code: int

    @classmethod
    def from_options(cls, opt: Any) -> KTOKernelConfig:
        """From the checked `rlhf_fast.options.KTO_OPTIONS` of a call."""
        return cls(beta=opt.beta, desirable_weight=opt.desirable_weight,
                   undesirable_weight=opt.undesirable_weight,
                   reduction_code=REDUCTION_CODES[opt.reduction])

    def scalar_args(self) -> tuple[float, ...]:
        return (*split_fp64(self.beta), *split_fp64(self.desirable_weight),
                *split_fp64(self.undesirable_weight))


@triton.jit
def _kto_inputs(p_ptr, r_ptr, des_ptr, kl_ptr, offs, ok, acc_dtype: tl.constexpr,
                HAS_REF: tl.constexpr, HAS_KL: tl.constexpr):
    """(log-ratio, desirable, z) of the examples at `offs`."""
    log_ratio = tl.load(p_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    if HAS_REF:
        log_ratio -= tl.load(r_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    desirable = tl.load(des_ptr + offs, mask=ok, other=0) != 0
    if HAS_KL:
        kl = tl.load(kl_ptr).to(acc_dtype)
        z = tl.where(kl < 0.0, 0.0, kl)  # max(kl, 0) that keeps a NaN, as torch.clamp
    else:
        z = tl.zeros([], acc_dtype)
    return log_ratio, desirable, z


@triton.jit
def _kto_terms(log_ratio, desirable, z, beta, w_d, w_u):
    """(loss, d loss / d log-ratio) of each example."""
    u = beta * (log_ratio - z)
    s_pos = _sigmoid(u)
    s_neg = _sigmoid(-u)
    loss = tl.where(desirable, w_d * s_neg, w_u * s_pos)
    d_lr = beta * s_pos * s_neg * tl.where(desirable, -w_d, w_u)
    return loss, d_lr


@triton.jit
def _kto_fwd_kernel(
    p_ptr, r_ptr, des_ptr, kl_ptr, loss_ptr, reward_ptr, stats_ptr,
    B, beta_hi, beta_lo, w_d_hi, w_d_lo, w_u_hi, w_u_lo,
    HAS_REF: tl.constexpr, HAS_KL: tl.constexpr, REDUCTION: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta, w_d, w_u = fp64_args3(beta_hi, beta_lo, w_d_hi, w_d_lo, w_u_hi, w_u_lo, acc_dtype)
    s_loss = tl.zeros([BLOCK], acc_dtype)
    s_chosen = tl.zeros([BLOCK], acc_dtype)
    s_rejected = tl.zeros([BLOCK], acc_dtype)
    n_chosen = tl.zeros([BLOCK], acc_dtype)
    n_rejected = tl.zeros([BLOCK], acc_dtype)
    z = tl.zeros([], acc_dtype)
    for start in range(0, B, BLOCK):
        offs, ok = block_at(start, B, BLOCK)
        log_ratio, desirable, z = _kto_inputs(p_ptr, r_ptr, des_ptr, kl_ptr, offs, ok,
                                              acc_dtype, HAS_REF, HAS_KL)
        loss, d_lr = _kto_terms(log_ratio, desirable, z, beta, w_d, w_u)
        reward = beta * log_ratio
        tl.store(reward_ptr + offs, reward, mask=ok)
        s_loss = loss_step(loss_ptr, offs, ok, loss, s_loss, REDUCTION)
        s_chosen += tl.where(ok & desirable, reward, 0.0)
        # (not ~desirable: Triton 3.3's interpreter cannot invert an int1 tensor)
        s_rejected += tl.where(ok & desirable, 0.0, tl.where(ok, reward, 0.0))
        n_chosen += tl.where(ok & desirable, 1.0, 0.0)
        n_rejected += tl.where(ok & desirable, 0.0, tl.where(ok, 1.0, 0.0))
    store_reduced_loss(loss_ptr, s_loss, B, REDUCTION)
    # an empty group's mean is 0 / 0 = NaN, as torch's mean of nothing
    chosen = tl.sum(s_chosen, axis=0) / tl.sum(n_chosen, axis=0)
    rejected = tl.sum(s_rejected, axis=0) / tl.sum(n_rejected, axis=0)
    tl.store(stats_ptr + 0, chosen)
    tl.store(stats_ptr + 1, rejected)
    tl.store(stats_ptr + 2, chosen - rejected)
    tl.store(stats_ptr + 3, z)


@triton.jit
def _kto_bwd_kernel(
    grad_ptr, p_ptr, r_ptr, des_ptr, kl_ptr, d_p_ptr, d_r_ptr,
    B, beta_hi, beta_lo, w_d_hi, w_d_lo, w_u_hi, w_u_lo,
    HAS_REF: tl.constexpr, HAS_KL: tl.constexpr, REDUCTION: tl.constexpr,
    GRAD_P: tl.constexpr, GRAD_R: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta, w_d, w_u = fp64_args3(beta_hi, beta_lo, w_d_hi, w_d_lo, w_u_hi, w_u_lo, acc_dtype)
    offs, ok = block_at(tl.program_id(0) * BLOCK, B, BLOCK)
    log_ratio, desirable, z = _kto_inputs(p_ptr, r_ptr, des_ptr, kl_ptr, offs, ok, acc_dtype,
                                          HAS_REF, HAS_KL)
    loss, d_lr = _kto_terms(log_ratio, desirable, z, beta, w_d, w_u)
    g = upstream_grad(grad_ptr, offs, ok, B, acc_dtype, REDUCTION)
    if GRAD_P:
        tl.store(d_p_ptr + offs, cast(g * d_lr, d_p_ptr.dtype.element_ty), mask=ok)
    if GRAD_R:
        tl.store(d_r_ptr + offs, cast(-g * d_lr, d_r_ptr.dtype.element_ty), mask=ok)


def kto_forward(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, desirable: torch.Tensor,
    kl_ref: torch.Tensor | None, cfg: KTOKernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on contiguous [B] inputs (kl_ref: one element, or None).

    Returns (loss: 0-d or [B] for reduction "none", rewards [B], stats [4] =
    (chosen_reward, rejected_reward, reward_margin, kl)), fp32 (fp64 when policy_logps is
    fp64).
    """
    B = policy_logps.shape[0]
    dtype = math_dtype(policy_logps)
    device = policy_logps.device
    loss_shape = (B,) if cfg.reduction_code == REDUCTION_CODES["none"] else ()
    loss = torch.empty(loss_shape, dtype=dtype, device=device)
    rewards = torch.empty(B, dtype=dtype, device=device)
    stats = torch.empty(4, dtype=dtype, device=device)
    _kto_fwd_kernel[(1,)](
        policy_logps, policy_logps if ref_logps is None else ref_logps, mask_view(desirable),
        policy_logps if kl_ref is None else kl_ref, loss, rewards, stats,
        B, *cfg.scalar_args(), HAS_REF=ref_logps is not None, HAS_KL=kl_ref is not None,
        REDUCTION=cfg.reduction_code, FP64=dtype == torch.float64,
        BLOCK=min(FWD_BLOCK, max(16, triton.next_power_of_2(B))), num_warps=4,
    )
    return loss, rewards, stats


def kto_backward(
    grad_loss: torch.Tensor, policy_logps: torch.Tensor, ref_logps: torch.Tensor | None,
    desirable: torch.Tensor, kl_ref: torch.Tensor | None, cfg: KTOKernelConfig,
    needs_grad: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. (policy_logps, ref_logps), each [B] in its input's dtype where
    `needs_grad` asks for it (else None), from the upstream gradient of the loss (0-d, or
    [B] for reduction "none")."""
    d_p = torch.empty_like(policy_logps) if needs_grad[0] else None
    d_r = torch.empty_like(ref_logps) if needs_grad[1] and ref_logps is not None else None
    B = policy_logps.shape[0]
    _kto_bwd_kernel[(triton.cdiv(B, BWD_BLOCK),)](
        grad_loss, policy_logps, policy_logps if ref_logps is None else ref_logps,
        mask_view(desirable), policy_logps if kl_ref is None else kl_ref,
        policy_logps if d_p is None else d_p, policy_logps if d_r is None else d_r,
        B, *cfg.scalar_args(), HAS_REF=ref_logps is not None, HAS_KL=kl_ref is not None,
        REDUCTION=cfg.reduction_code, GRAD_P=d_p is not None, GRAD_R=d_r is not None,
        FP64=math_dtype(policy_logps) == torch.float64, BLOCK=BWD_BLOCK, num_warps=4,
    )
    return d_p, d_r
