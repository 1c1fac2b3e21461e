"""Pairwise preference losses (DPO and relatives) on sequence log-probs, fused.

Math, per pair i (pc, pr policy log-probs of the chosen / rejected answer, rc, rr the
reference's, Lc, Lr their lengths; s the logistic sigmoid, eps the label smoothing):

    a = (pc - rc) / Lc    b = (pr - rr) / Lr      (Lc = Lr = 1 unless ipo or sigmoid_norm)
    delta = a - b,  u = beta * delta

    type           loss                                      d loss / d u   (or d a, d b)
    sigmoid(_norm) -(1 - eps) log s(u) - eps log s(-u)       -(1 - eps) s(-u) + eps s(u)
    robust         (-(1 - eps) log s(u) + eps log s(-u))     (-(1 - eps) s(-u) - eps s(u))
                     / (1 - 2 eps)                             / (1 - 2 eps)
    hinge          max(0, 1 - u)                             -1 if u < 1 else 0 (NaN at NaN)
    exo_pair       s(u) (log s(u) - log(1 - eps))            s(u) s(-u) (u - log((1 - eps)
                     + s(-u) (log s(-u) - log eps)                                / eps))
    ipo            (delta - 1 / (2 beta))^2                  d/d delta: 2 (delta - 1/(2 beta))
    nca_pair       -log s(beta a) - log s(-beta a) / 2       d/da: beta (-s(-beta a)
                     - log s(-beta b) / 2                                + s(beta a) / 2)
                                                             d/db: beta s(beta b) / 2
    bco_pair       -log s(beta a) - log s(-beta b)           d/da: -beta s(-beta a)
                                                             d/db: beta s(beta b)
    sppo_hard      (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2   d/da: 2 (a - 1/(2 beta))
                                                             d/db: 2 (b + 1/(2 beta))
    apo_zero       s(-beta a) + s(beta b)                    d/da: -beta s'(beta a)
                                                             d/db: beta s'(beta b)
    apo_down       s(beta a) + s(-u)                         d/da: beta (s'(beta a) - s'(u))
                                                             d/db: beta s'(u)

    discopop       -log s(u) (1 - m) + e^-u m,  m = s(u / tau)  d/du: -s(-u) (1 - m)
                   (e^-u m = e^(log s(u / tau) - u): finite       + log s(u) m (1 - m) / tau
                   at any margin when tau < 1)                    + e^-u m ((1 - m) / tau - 1)

with s'(x) = s(x) s(-x); for the types written in u, d/da = beta d/du = -d/db. Then
d pc = g d/da / Lc = -d rc and d pr = g d/db / Lr = -d rr, g the upstream gradient of the
pair's loss (g / B for a mean).

f_divergence_type (TRL's): a and b are first replaced by their scores f(x) of the raw
log-ratio x (before the length division), and d/da by d/da f'(x): reverse_kl f(x) = x
(DPO), forward_kl -e^-x, js_divergence log s(x), alpha_divergence e^((alpha - 1) x) /
(alpha - 1) with (alpha - 1) x clamped at 80 (f' = 0 beyond, as torch.clamp's); the
rewards stay beta times the log-ratios. log s(x) = min(x, 0) - log1p(e^-|x|) and s(x) from
e^-|x| alone, so no margin overflows; log1p keeps full precision when e^-|x| is tiny.

Two launches: the forward is one program looping over the batch in a fixed order (B is a
few thousand pairs at most; the result is deterministic, no atomics): it writes the
rewards, the loss (per pair or reduced) and the accuracy and margin. The backward
recomputes the terms from the inputs, elementwise over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import (
    block_at,
    cast,
    fp64_arg,
    fp64_args3,
    pair_step,
    pair_sums,
    split_fp64,
    store_pair_totals,
    upstream_grad,
)
from rlhf_fast.reference import EXO_DEFAULT_EPS

LOSS_CODES = {
    "sigmoid": 0, "ipo": 1, "hinge": 2, "robust": 3, "exo_pair": 4, "nca_pair": 5,
    "bco_pair": 6, "sppo_hard": 7, "apo_zero": 8, "apo_down": 9, "sigmoid_norm": 10,
    "discopop": 11,
}
F_DIVERGENCE_CODES = {"reverse_kl": 0, "forward_kl": 1, "js_divergence": 2,
                      "alpha_divergence": 3}
#: alpha_divergence's exponent is clamped here (TRL's fp32 / bf16 bound)
ALPHA_EXPONENT_MAX = 80.0
LENGTH_NORMALISED_CODES = (1, 10)
REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}


@dataclass(frozen=True)
class DPOKernelConfig:
    """The scalar settings of one dpo_loss call, as the kernels take them."""

    loss_code: int
    beta: float
    eps: float
    reduction_code: int
    f_code: int = 0
    alpha: float = 0.5  # f_alpha_divergence_coef
    tau: float = 0.05  # discopop_tau

    @classmethod
    def from_options(cls, opt: Any) -> DPOKernelConfig:
        """From the checked `rlhf_fast.options.DPO_OPTIONS` of a call (any object with those
        attributes); exo_pair's label_smoothing 0 is the paper's epsilon."""
        eps = opt.label_smoothing
        if opt.loss_type == "exo_pair" and eps == 0:
            eps = EXO_DEFAULT_EPS
        f_code = F_DIVERGENCE_CODES[opt.f_divergence_type]
        if f_code == 3 and abs(opt.f_alpha_divergence_coef - 1.0) < 1e-6:
            f_code = 0  # TRL: the limit alpha -> 1 is the reverse KL
        return cls(loss_code=LOSS_CODES[opt.loss_type], beta=opt.beta, eps=eps,
                   reduction_code=REDUCTION_CODES[opt.reduction], f_code=f_code,
                   alpha=opt.f_alpha_divergence_coef, tau=opt.discopop_tau)


@triton.jit
def _log1p_small(e):
    # log(1 + e) for 0 <= e <= 1, accurate when 1 + e rounds to 1 (Goldberg's trick).
    one_plus = 1.0 + e
    return tl.where(one_plus == 1.0, e, tl.log(one_plus) * (e / (one_plus - 1.0)))


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - _log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _dpo_terms(a, b, beta, eps, log_keep, log_flip, LOSS: tl.constexpr):
    """(loss, d loss / d a, d loss / d b) of each pair from its log-ratios a and b."""
    u = beta * (a - b)
    if LOSS == 0 or LOSS == 10:  # sigmoid, sigmoid_norm
        loss = -(1.0 - eps) * _log_sigmoid(u) - eps * _log_sigmoid(-u)
        d_a = beta * (eps * _sigmoid(u) - (1.0 - eps) * _sigmoid(-u))
        d_b = -d_a
    elif LOSS == 1:  # ipo
        gap = (a - b) - 0.5 / beta
        loss = gap * gap
        d_a = 2.0 * gap
        d_b = -d_a
    elif LOSS == 2:  # hinge
        loss = tl.where(u >= 1.0, 0.0, 1.0 - u)  # not max(1 - u, 0): a NaN stays NaN
        # a NaN margin gives a NaN gradient, as the other types' formulas do (u < 1 is false)
        d_a = tl.where(u != u, u, tl.where(u < 1.0, -beta, 0.0))
        d_b = -d_a
    elif LOSS == 3:  # robust
        scale = 1.0 / (1.0 - 2.0 * eps)
        loss = scale * (eps * _log_sigmoid(-u) - (1.0 - eps) * _log_sigmoid(u))
        d_a = -beta * scale * (eps * _sigmoid(u) + (1.0 - eps) * _sigmoid(-u))
        d_b = -d_a
    elif LOSS == 4:  # exo_pair
        s_pos = _sigmoid(u)
        s_neg = _sigmoid(-u)
        loss = (s_pos * (_log_sigmoid(u) - log_keep)
                + s_neg * (_log_sigmoid(-u) - log_flip))
        d_a = beta * s_pos * s_neg * (u - (log_keep - log_flip))
        d_b = -d_a
    elif LOSS == 5:  # nca_pair
        ca = beta * a
        cb = beta * b
        loss = -_log_sigmoid(ca) - 0.5 * _log_sigmoid(-ca) - 0.5 * _log_sigmoid(-cb)
        d_a = beta * (0.5 * _sigmoid(ca) - _sigmoid(-ca))
        d_b = 0.5 * beta * _sigmoid(cb)
    elif LOSS == 6:  # bco_pair
        ca = beta * a
        cb = beta * b
        loss = -_log_sigmoid(ca) - _log_sigmoid(-cb)
        d_a = -beta * _sigmoid(-ca)
        d_b = beta * _sigmoid(cb)
    elif LOSS == 7:  # sppo_hard
        gap_a = a - 0.5 / beta
        gap_b = b + 0.5 / beta
        loss = gap_a * gap_a + gap_b * gap_b
        d_a = 2.0 * gap_a
        d_b = 2.0 * gap_b
    elif LOSS == 8:  # apo_zero
        ca = beta * a
        cb = beta * b
        loss = _sigmoid(-ca) + _sigmoid(cb)
        d_a = -beta * _sigmoid(ca) * _sigmoid(-ca)
        d_b = beta * _sigmoid(cb) * _sigmoid(-cb)
    elif LOSS == 9:  # apo_down
        ca = beta * a
        loss = _sigmoid(ca) + _sigmoid(-u)
        d_b = beta * _sigmoid(u) * _sigmoid(-u)
        d_a = beta * _sigmoid(ca) * _sigmoid(-ca) - d_b
    else:  # discopop (tau in log_keep's place); e^-u m as one exp: finite when tau < 1
        m = _sigmoid(u / log_keep)
        keep = _sigmoid(-u / log_keep)  # 1 - m
        logistic = -_log_sigmoid(u)
        blended = tl.exp(_log_sigmoid(u / log_keep) - u)
        loss = logistic * keep + blended
        d_a = beta * (-_sigmoid(-u) * keep - logistic * m * keep / log_keep
                      + blended * (keep / log_keep - 1.0))
        d_b = -d_a
    return loss, d_a, d_b


@triton.jit
def _f_score(x, alpha_m1, F_DIV: tl.constexpr):
    """TRL's f-divergence score of a raw log-ratio x, and its derivative."""
    if F_DIV == 1:  # forward_kl
        e = tl.exp(-x)
        score = -e
        slope = e
    elif F_DIV == 2:  # js_divergence
        score = _log_sigmoid(x)
        slope = _sigmoid(-x)
    elif F_DIV == 3:  # alpha_divergence; NaN kept (not tl.minimum)
        t = alpha_m1 * x
        e = tl.exp(tl.where(t > 80.0, 80.0, t))
        score = e / alpha_m1
        slope = tl.where(t > 80.0, 0.0, e)
    else:  # reverse_kl
        score = x
        slope = tl.full(x.shape, 1.0, x.dtype)
    return score, slope


@triton.jit
def _at_least_one(length):
    # max(length, 1) that keeps a NaN length NaN, as torch.clamp does (tl.maximum drops it).
    return tl.where(length < 1.0, 1.0, length)


@triton.jit
def _log_ratios(pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, ok, alpha_m1,
                acc_dtype: tl.constexpr, HAS_REF: tl.constexpr, LENGTH_NORM: tl.constexpr,
                F_DIV: tl.constexpr):
    """The log-ratios of the pairs at `offs` (what the rewards see), their scores (what
    the loss sees: f of them, then per token) and d score / d log-prob of each side."""
    a = tl.load(pc_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    b = tl.load(pr_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    if HAS_REF:
        a -= tl.load(rc_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
        b -= tl.load(rr_ptr + offs, mask=ok, other=0.0).to(acc_dtype)
    score_a, slope_a = _f_score(a, alpha_m1, F_DIV)
    score_b, slope_b = _f_score(b, alpha_m1, F_DIV)
    if LENGTH_NORM:
        inv_lc = 1.0 / _at_least_one(tl.load(lc_ptr + offs, mask=ok, other=1).to(acc_dtype))
        inv_lr = 1.0 / _at_least_one(tl.load(lr_ptr + offs, mask=ok, other=1).to(acc_dtype))
        a *= inv_lc
        b *= inv_lr
        score_a *= inv_lc
        score_b *= inv_lr
        slope_a *= inv_lc
        slope_b *= inv_lr
    return a, b, score_a, score_b, slope_a, slope_b


@triton.jit
def _dpo_settings(beta_hi, beta_lo, eps_hi, eps_lo, log_keep_hi, log_keep_lo, log_flip_hi,
                  log_flip_lo, alpha_m1_hi, alpha_m1_lo, acc_dtype: tl.constexpr):
    """(beta, eps, log_keep, log_flip, alpha_m1) from their `split_fp64` halves."""
    beta, eps, log_keep = fp64_args3(beta_hi, beta_lo, eps_hi, eps_lo, log_keep_hi,
                                     log_keep_lo, acc_dtype)
    return (beta, eps, log_keep, fp64_arg(log_flip_hi, log_flip_lo, acc_dtype),
            fp64_arg(alpha_m1_hi, alpha_m1_lo, acc_dtype))

@triton.jit
def _dpo_fwd_kernel(
    pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr,
    loss_ptr, chosen_reward_ptr, rejected_reward_ptr, stats_ptr,
    B, beta_hi, beta_lo, eps_hi, eps_lo, log_keep_hi, log_keep_lo, log_flip_hi, log_flip_lo,
    alpha_m1_hi, alpha_m1_lo,
    LOSS: tl.constexpr, HAS_REF: tl.constexpr, LENGTH_NORM: tl.constexpr,
    REDUCTION: tl.constexpr, F_DIV: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta, eps, log_keep, log_flip, alpha_m1 = _dpo_settings(
        beta_hi, beta_lo, eps_hi, eps_lo, log_keep_hi, log_keep_lo, log_flip_hi, log_flip_lo,
        alpha_m1_hi, alpha_m1_lo, acc_dtype)
    s_loss, s_correct, s_margin = pair_sums(acc_dtype, BLOCK)
    for start in range(0, B, BLOCK):
        offs, ok = block_at(start, B, BLOCK)
        a, b, score_a, score_b, _, _ = _log_ratios(
            pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, ok, alpha_m1, acc_dtype,
            HAS_REF, LENGTH_NORM, F_DIV,
        )
        loss, _, _ = _dpo_terms(score_a, score_b, beta, eps, log_keep, log_flip, LOSS)
        s_loss, s_correct, s_margin = pair_step(
            loss_ptr, chosen_reward_ptr, rejected_reward_ptr, offs, ok, loss, beta * a,
            beta * b, s_loss, s_correct, s_margin, REDUCTION)
    store_pair_totals(loss_ptr, stats_ptr, s_loss, s_correct, s_margin, B, REDUCTION)


@triton.jit
def _dpo_bwd_kernel(
    grad_ptr, pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr,
    d_pc_ptr, d_pr_ptr, d_rc_ptr, d_rr_ptr,
    B, beta_hi, beta_lo, eps_hi, eps_lo, log_keep_hi, log_keep_lo, log_flip_hi, log_flip_lo,
    alpha_m1_hi, alpha_m1_lo,
    LOSS: tl.constexpr, HAS_REF: tl.constexpr, LENGTH_NORM: tl.constexpr,
    REDUCTION: tl.constexpr, F_DIV: tl.constexpr, GRAD_PC: tl.constexpr,
    GRAD_PR: tl.constexpr, GRAD_RC: tl.constexpr, GRAD_RR: tl.constexpr, FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    beta, eps, log_keep, log_flip, alpha_m1 = _dpo_settings(
        beta_hi, beta_lo, eps_hi, eps_lo, log_keep_hi, log_keep_lo, log_flip_hi, log_flip_lo,
        alpha_m1_hi, alpha_m1_lo, acc_dtype)
    offs, ok = block_at(tl.program_id(0) * BLOCK, B, BLOCK)
    _, _, score_a, score_b, inv_lc, inv_lr = _log_ratios(
        pc_ptr, pr_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, ok, alpha_m1, acc_dtype,
        HAS_REF, LENGTH_NORM, F_DIV,
    )
    loss, d_a, d_b = _dpo_terms(score_a, score_b, beta, eps, log_keep, log_flip, LOSS)
    g = upstream_grad(grad_ptr, offs, ok, B, acc_dtype, REDUCTION)
    d_chosen = g * d_a * inv_lc
    d_rejected = g * d_b * inv_lr
    if GRAD_PC:
        tl.store(d_pc_ptr + offs, cast(d_chosen, d_pc_ptr.dtype.element_ty), mask=ok)
    if GRAD_PR:
        tl.store(d_pr_ptr + offs, cast(d_rejected, d_pr_ptr.dtype.element_ty), mask=ok)
    if GRAD_RC:
        tl.store(d_rc_ptr + offs, cast(-d_chosen, d_rc_ptr.dtype.element_ty), mask=ok)
    if GRAD_RR:
        tl.store(d_rr_ptr + offs, cast(-d_rejected, d_rr_ptr.dtype.element_ty), mask=ok)


FWD_BLOCK = 1024
BWD_BLOCK = 1024


def _scalar_args(cfg: DPOKernelConfig) -> tuple[float, ...]:
    # beta, eps, log(1 - eps), log(eps) and alpha - 1 as (hi, lo) pairs: the logs are taken
    # here in float64 (log1p), not in the kernel in fp32, where 1 - eps would round first.
    # discopop reads no eps: its tau takes log(1 - eps)'s place.
    log_keep = cfg.tau if cfg.loss_code == LOSS_CODES["discopop"] else math.log1p(-cfg.eps)
    log_flip = math.log(cfg.eps) if cfg.eps > 0 else 0.0
    return (*split_fp64(cfg.beta), *split_fp64(cfg.eps), *split_fp64(log_keep),
            *split_fp64(log_flip), *split_fp64(cfg.alpha - 1.0))


def _fp64(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def dpo_forward(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
    rejected_lengths, cfg: DPOKernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on contiguous [B] inputs (refs and lengths may be None).

    Returns (loss: 0-d or [B] for reduction "none", chosen_rewards [B],
    rejected_rewards [B], stats [2] = (accuracy, margin)), fp32 (fp64 when a policy input
    is fp64).
    """
    B = policy_chosen.shape[0]
    fp64 = _fp64(policy_chosen, policy_rejected)
    dtype = torch.float64 if fp64 else torch.float32
    device = policy_chosen.device
    loss_shape = (B,) if cfg.reduction_code == REDUCTION_CODES["none"] else ()
    loss = torch.empty(loss_shape, dtype=dtype, device=device)
    chosen_rewards = torch.empty(B, dtype=dtype, device=device)
    rejected_rewards = torch.empty(B, dtype=dtype, device=device)
    stats = torch.empty(2, dtype=dtype, device=device)
    has_ref = ref_chosen is not None
    _dpo_fwd_kernel[(1,)](
        policy_chosen, policy_rejected,
        ref_chosen if has_ref else policy_chosen, ref_rejected if has_ref else policy_chosen,
        policy_chosen if chosen_lengths is None else chosen_lengths,
        policy_chosen if rejected_lengths is None else rejected_lengths,
        loss, chosen_rewards, rejected_rewards, stats,
        B, *_scalar_args(cfg),
        LOSS=cfg.loss_code, HAS_REF=has_ref,
        LENGTH_NORM=cfg.loss_code in LENGTH_NORMALISED_CODES,
        REDUCTION=cfg.reduction_code, F_DIV=cfg.f_code, FP64=fp64,
        BLOCK=min(FWD_BLOCK, max(16, triton.next_power_of_2(B))), num_warps=4,
    )
    return loss, chosen_rewards, rejected_rewards, stats


def dpo_backward(
    grad_loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths,
    rejected_lengths, cfg: DPOKernelConfig, needs_grad: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients w.r.t. (policy_chosen, policy_rejected, ref_chosen, ref_rejected), each
    [B] in its input's dtype where `needs_grad` asks for it (else None), from the upstream
    gradient of the loss (0-d, or [B] for reduction "none")."""
    inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    grads = tuple(
        torch.empty_like(x) if needed else None for x, needed in zip(inputs, needs_grad)
    )
    B = policy_chosen.shape[0]
    has_ref = ref_chosen is not None
    _dpo_bwd_kernel[(triton.cdiv(B, BWD_BLOCK),)](
        grad_loss, policy_chosen, policy_rejected,
        ref_chosen if has_ref else policy_chosen, ref_rejected if has_ref else policy_chosen,
        policy_chosen if chosen_lengths is None else chosen_lengths,
        policy_chosen if rejected_lengths is None else rejected_lengths,
        *(policy_chosen if g is None else g for g in grads),
        B, *_scalar_args(cfg),
        LOSS=cfg.loss_code, HAS_REF=has_ref,
        LENGTH_NORM=cfg.loss_code in LENGTH_NORMALISED_CODES,
        REDUCTION=cfg.reduction_code, F_DIV=cfg.f_code,
        GRAD_PC=needs_grad[0], GRAD_PR=needs_grad[1], GRAD_RC=needs_grad[2],
        GRAD_RR=needs_grad[3], FP64=_fp64(policy_chosen, policy_rejected),
        BLOCK=BWD_BLOCK, num_warps=4,
    )
    return grads


# ------------------------------------------- launchers shared by the losses on [B] pairs


def pair_forward(fwd_kernel: Any, inputs: tuple[torch.Tensor, ...], n_stats: int,
                 reduction_code: int, scalars: tuple[float, ...], **constexprs: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward of a loss on pairs (simpo, cpo, orpo), whose kernels take
    (*inputs, loss, chosen_rewards, rejected_rewards, stats, B, *scalars): `inputs` are
    contiguous [B] tensors, the policy's chosen and rejected log-probs first.

    Returns (loss: 0-d or [B] for reduction "none", chosen_rewards [B], rejected_rewards
    [B], stats [n_stats]), fp32 (fp64 when a policy input is fp64).
    """
    B = inputs[0].shape[0]
    fp64 = _fp64(inputs[0], inputs[1])
    dtype = torch.float64 if fp64 else torch.float32
    device = inputs[0].device
    loss_shape = (B,) if reduction_code == REDUCTION_CODES["none"] else ()
    loss = torch.empty(loss_shape, dtype=dtype, device=device)
    chosen_rewards = torch.empty(B, dtype=dtype, device=device)
    rejected_rewards = torch.empty(B, dtype=dtype, device=device)
    stats = torch.empty(n_stats, dtype=dtype, device=device)
    fwd_kernel[(1,)](
        *inputs, loss, chosen_rewards, rejected_rewards, stats, B, *scalars,
        REDUCTION=reduction_code, FP64=fp64,
        BLOCK=min(FWD_BLOCK, max(16, triton.next_power_of_2(B))), num_warps=4, **constexprs,
    )
    return loss, chosen_rewards, rejected_rewards, stats


def pair_backward(bwd_kernel: Any, grad_loss: torch.Tensor, inputs: tuple[torch.Tensor, ...],
                  needs_grad: tuple[bool, bool], reduction_code: int,
                  scalars: tuple[float, ...], **constexprs: Any
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. the policy's chosen and rejected log-probs (`inputs`' first two),
    each [B] in its input's dtype where `needs_grad` asks for it (else None), from the
    upstream gradient of the loss (0-d, or [B] for reduction "none"); the kernels take
    (grad_loss, *inputs, d_chosen, d_rejected, B, *scalars)."""
    d_pc, d_pr = (torch.empty_like(x) if needed else None
                  for x, needed in zip(inputs[:2], needs_grad))
    B = inputs[0].shape[0]
    bwd_kernel[(triton.cdiv(B, BWD_BLOCK),)](
        grad_loss, *inputs, inputs[0] if d_pc is None else d_pc,
        inputs[0] if d_pr is None else d_pr, B, *scalars, REDUCTION=reduction_code,
        GRAD_PC=needs_grad[0], GRAD_PR=needs_grad[1], FP64=_fp64(inputs[0], inputs[1]),
        BLOCK=BWD_BLOCK, num_warps=4, **constexprs,
    )
    return d_pc, d_pr


def pair_launchers(fwd_kernel: Any, bwd_kernel: Any, n_stats: int
                   ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The (forward, backward) launchers of a loss on [B] pairs without a reference
    (`ops.pair_losses.register_pair_loss`'s `launch`): `pair_forward`, writing `n_stats`
    statistics, and `pair_backward`, of contiguous [B] inputs (policy_chosen,
    policy_rejected, chosen_lengths, rejected_lengths) and the loss's kernel config (its
    ``reduction_code``, ``scalar_args()`` and ``constexprs()``)."""

    def forward(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, cfg: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return pair_forward(fwd_kernel, (policy_chosen, policy_rejected, chosen_lengths,
                                         rejected_lengths), n_stats, cfg.reduction_code,
                            cfg.scalar_args(), **cfg.constexprs())

    def backward(grad_loss: torch.Tensor, policy_chosen: torch.Tensor,
                 policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
                 rejected_lengths: torch.Tensor, cfg: Any, needs_grad: tuple[bool, bool]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return pair_backward(bwd_kernel, grad_loss, (policy_chosen, policy_rejected,
                                                     chosen_lengths, rejected_lengths),
                             needs_grad, cfg.reduction_code, cfg.scalar_args(),
                             **cfg.constexprs())

    return forward, backward
