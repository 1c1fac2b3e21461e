"""The per-token terms of the PPO loss, shared by `ppo_loss`'s kernels and
`linear_ppo_loss`'s: the settings they take (`PPOKernelConfig`, the codes of the policy
losses, KL estimators and aggregations) and their `@triton.jit` math, value and
derivative together.

Math, per valid token t (A advantage, r = exp(logp - old_logp), eps_l / eps_h clip range,
[l, h] = [1 - eps_l, 1 + eps_h]; `reference.policy_terms` has every policy loss in full):

    pg  vanilla   max(-A r, -A clip(r, l, h)),        d pg / d logp = -A r, or 0 when a
                  for A < 0 with dual clip c: min(pg, -A c)      clip is the active branch
        cispo     -sg(clip(r, l, h)) A logp                      -clip(r, l, h) A
        sapo      -A 4/tau sigmoid(tau (r - 1))                  -4 A s (1 - s) r
        gpg       -A logp                                        -A
        dro       -(A logp - beta (log r)^2 / 2)                 -A + beta log r
        dppo_*    -A sg(min(r, c)) logp, 0 where dropped         -A min(r, c), or 0
        gspo      the vanilla term of s = exp(min(m, 10)), m the row's mean log-ratio:
                  d pg_t / d m = -A_t s (0 clipped), d loss / d logp_t = (1/n) sum_t' w dpg_t'/dm
        gspo_token  the same value, d loss / d logp_t = w d pg_t / d m (its own token)
        geo_mean  -A exp(m), m the row's mean of the log-ratio clipped on A's side:
                  d loss / d logp_t = (1/n) sum_t' w (-A_t' e^m), times 0 where t is clipped
    kl  = with x = ref - logp: k1: -x | k2: x^2 / 2 | k3: e^x - x - 1 | abs: |x| |
          low_var_kl: min(k3 of clamp(x, -20, 20), 10)   (`reference.kl_penalty`)
          d kl / d logp = 1 | -x | 1 - e^x | -sign(x) | 1 - e^x, 0 where a clamp holds;
          a "+" estimator (straight through): its kl, the d kl / d logp of k2;
          use_bias_correction_kl (TRL): r kl, d = (d kl + kl) r
    vl  = max((v - R)^2, (old_v + clip(v - old_v, -eps_v, eps_v) - R)^2) / 2
          d vl / d v = v - R, or 0 when the clipped branch is the larger (NaN for a NaN old_v)

(w: the token's weight in the aggregated loss, which `ppo_loss` has.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import triton
import triton.language as tl

from rlhf_fast.kernels.common import fp64_arg, split_fp64
from rlhf_fast.types import SEQUENCE_POLICY_LOSSES

AGG_CODES = {
    "token-mean": 0,
    "seq-mean-token-mean": 1,
    "seq-mean-token-sum": 2,
    "seq-mean-token-sum-norm": 3,
    "token-sum": 4,
}
# The kernels' POLICY: these numbers, compared as literals there. 7 to 9: the sequence
# losses (`SEQUENCE_CODES`), which read their row's mean log-ratio; 7 and 9 take their
# gradient through it. kl_cov (10) and dro (11) are token losses.
POLICY_CODES = {"vanilla": 0, "cispo": 2, "sapo": 3, "gpg": 4, "dppo_tv": 5, "dppo_kl": 6,
                "gspo": 7, "gspo_token": 8, "geo_mean": 9, "bypass_mode": 4,
                "clip_cov": 0, "kl_cov": 10, "dro": 11}
SEQUENCE_CODES = frozenset(POLICY_CODES[name] for name in SEQUENCE_POLICY_LOSSES)
DUAL_CLIP_CODE = 1  # vanilla with dual_clip
KL_STRAIGHT_THROUGH = 8  # added to an estimator's code: the gradient of k2
KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "abs": 4, "low_var_kl": 5}
KL_CODES |= {f"{name}+": code + KL_STRAIGHT_THROUGH for name, code in KL_CODES.items()
             if name != "k2"}
# The settings of `policy_terms`, in the order `policy_settings` takes their halves.
POLICY_SETTINGS = ("clip_low", "clip_high", "param_a", "param_b")


@dataclass(frozen=True)
class PPOKernelConfig:
    """The scalar settings of one ppo_loss call, as the kernels take them."""

    clip_low: float
    clip_high: float
    policy_code: int
    param_a: float  # dual clip c, sapo's tau_pos or dppo's clip_ratio_c
    param_b: float  # sapo's tau_neg
    kl_code: int
    kl_ratio: bool  # TRL's use_bias_correction_kl
    kl_coef: float
    entropy_coef: float
    value_clip: float
    vf_coef: float
    agg_code: int
    max_len: int  # seq-mean-token-sum-norm's length, 0: the batch's T
    token_count: float  # token-mean's divisor, 0: the batch's valid tokens
    seq_count: float  # the seq-mean modes' divisor, 0: the batch's non-empty rows
    norm_rows: float  # the B of seq-mean-token-sum-norm, 0: the batch's
    dp_size: float

    @classmethod
    def from_options(cls, opt: Any) -> PPOKernelConfig:
        """From the checked `rlhf_fast.options.PPO_OPTIONS` of a call (any object with
        those attributes). Nothing of the batch's shape goes in: a compiled graph takes
        every batch size and length with the same config."""
        code = POLICY_CODES[opt.policy_loss]
        param_a, param_b = 0.0, 0.0
        if opt.dual_clip is not None:
            code, param_a = DUAL_CLIP_CODE, opt.dual_clip
        elif opt.policy_loss == "sapo":
            param_a, param_b = opt.tau_pos, opt.tau_neg
        elif opt.policy_loss in ("dppo_tv", "dppo_kl"):
            param_a = opt.clip_ratio_c
        elif opt.policy_loss == "dro":
            param_a = opt.dro_beta
        return cls(
            clip_low=opt.clip_eps,
            clip_high=opt.clip_eps if opt.clip_eps_high is None else opt.clip_eps_high,
            policy_code=code, param_a=param_a, param_b=param_b,
            kl_code=KL_CODES[opt.kl_estimator], kl_ratio=opt.use_bias_correction_kl,
            kl_coef=opt.kl_coef,
            entropy_coef=opt.entropy_coef, value_clip=opt.value_clip, vf_coef=opt.vf_coef,
            agg_code=AGG_CODES[opt.agg],
            max_len=0 if opt.max_len is None else opt.max_len,
            token_count=float(opt.batch_num_tokens or 0),
            seq_count=float(opt.global_batch_size or 0),
            norm_rows=float(opt.global_batch_size or 0), dp_size=float(opt.dp_size),
        )

    def norm_count(self, batch_rows: int, n_positions: int) -> float:
        """seq-mean-token-sum-norm's divisor, rows * max_len, for a batch of `batch_rows`
        rows of `n_positions` (max_len's default)."""
        return float(max((self.norm_rows or batch_rows) * (self.max_len or n_positions), 1))

    @property
    def is_sequence_loss(self) -> bool:
        """gspo, gspo_token or geo_mean: the losses whose row mean takes a first pass."""
        return self.policy_code in SEQUENCE_CODES

    def fp64_args(self, *names: str) -> list[float]:
        """The named settings as kernel arguments: each its `split_fp64` (hi, lo) pair."""
        return [half for name in names for half in split_fp64(getattr(self, name))]


@triton.jit
def policy_settings(clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo, param_a_hi,
                    param_a_lo, param_b_hi, param_b_lo, FP64: tl.constexpr):
    # (clip_low, clip_high, param_a, param_b) of `policy_terms` in the accumulation dtype,
    # from the halves a launcher passes (`PPOKernelConfig.fp64_args(*POLICY_SETTINGS)`).
    acc_dtype = tl.float64 if FP64 else tl.float32
    return (fp64_arg(clip_low_hi, clip_low_lo, acc_dtype),
            fp64_arg(clip_high_hi, clip_high_lo, acc_dtype),
            fp64_arg(param_a_hi, param_a_lo, acc_dtype),
            fp64_arg(param_b_hi, param_b_lo, acc_dtype))


@triton.jit
def policy_terms(logp, old_logp, adv, row_lr, clip_low, clip_high, param_a, param_b,
                 POLICY: tl.constexpr, kl_cov_coef=0.0):
    # (log-ratio, ratio, pg, d pg, clipped low, clipped high, dual) of each token; d pg is
    # d pg / d logp, or d pg / d m for gspo and geo_mean (m = row_lr, the row's mean).
    log_ratio = logp - old_logp
    ratio = tl.exp(log_ratio)
    no = tl.zeros(logp.shape, tl.int32) != 0  # (an int1 tl.zeros fails in triton 3.3's interpreter)
    low, high, dual = no, no, no
    if POLICY <= 1 or POLICY == 7 or POLICY == 8:  # vanilla, dual clip, gspo, gspo_token
        if POLICY <= 1:
            r = ratio
            d_r = ratio
        else:
            r = tl.zeros_like(logp) + tl.exp(tl.where(row_lr > 10.0, 10.0, row_lr))
            d_r = tl.where(row_lr > 10.0, 0.0, r)
        pg_unclipped = -adv * r
        pg_clipped = -adv * tl.minimum(tl.maximum(r, 1.0 - clip_low), 1.0 + clip_high)
        clipped = pg_clipped > pg_unclipped
        pg = tl.where(clipped, pg_clipped, pg_unclipped)
        d_pg = tl.where(clipped, 0.0, -adv * d_r)
        low = clipped & (r < 1.0)
        high = clipped & (r > 1.0)
        if POLICY == 1:
            dual = (adv < 0) & (pg > -adv * param_a)
            pg = tl.where(dual, -adv * param_a, pg)
            d_pg = tl.where(dual, 0.0, d_pg)
    elif POLICY == 2:  # cispo; clamps as where: a NaN ratio stays NaN
        upper = 1.0 + clip_high
        lower = 1.0 - clip_low
        w = tl.where(ratio > upper, upper, tl.where(ratio < lower, lower, ratio))
        d_pg = -w * adv
        pg = d_pg * logp
        low = ratio < lower
        high = ratio > upper
    elif POLICY == 3:  # sapo
        out_of_range = (log_ratio > 20.0) | (log_ratio < -20.0)
        r = tl.exp(tl.where(log_ratio > 20.0, 20.0, tl.where(log_ratio < -20.0, -20.0, log_ratio)))
        tau = tl.where(adv > 0, param_a, param_b)
        x = tau * (r - 1.0)
        s = 1.0 / (1.0 + tl.exp(-x))
        s_complement = 1.0 / (1.0 + tl.exp(x))  # 1 - s without its cancellation
        pg = -adv * s * (4.0 / tau)
        d_pg = tl.where(out_of_range, 0.0, -adv * 4.0 * s * s_complement * r)
    elif POLICY == 4:  # gpg
        d_pg = -adv
        pg = d_pg * logp
    elif POLICY == 5 or POLICY == 6:  # dppo_tv, dppo_kl
        p = tl.exp(logp)
        p_old = tl.exp(old_logp)
        if POLICY == 5:
            too_high = p - p_old > clip_high
            too_low = p - p_old < -clip_low
        else:
            binary_kl = p_old * (old_logp - logp) + (1.0 - p_old) * tl.log(
                (1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
            too_high = (binary_kl > clip_high) & (p > p_old)
            too_low = (binary_kl > clip_low) & (p < p_old)
        dropped = tl.where(adv > 0, too_high, too_low)
        keep = tl.where(dropped, 0.0, 1.0)
        capped = tl.where(ratio > param_a, param_a, ratio)
        d_pg = -adv * capped * keep
        pg = -adv * capped * logp * keep
        low = dropped & (adv <= 0)
        high = dropped & (adv > 0)
        dual = (keep != 0) & (ratio > param_a)
    elif POLICY == 11:  # dro: REINFORCE with a quadratic pull, param_a = dro_beta
        pg = -(adv * logp - 0.5 * param_a * log_ratio * log_ratio)
        d_pg = -adv + param_a * log_ratio
    elif POLICY == 10:  # kl_cov: the unclipped term, plus its coefficient times |log r|
        sign = tl.where(log_ratio > 0, 1.0, tl.where(log_ratio < 0, -1.0, 0.0))
        pg = -adv * ratio + kl_cov_coef * tl.abs(log_ratio)
        d_pg = -adv * ratio + kl_cov_coef * sign
    else:  # geo_mean
        d_pg = -adv * (tl.zeros_like(logp) + tl.exp(row_lr))
        pg = d_pg
        low = (adv < 0) & (log_ratio < -clip_low)
        high = (adv > 0) & (log_ratio > clip_high)
    return log_ratio, ratio, pg, d_pg, low, high, dual


@triton.jit
def sequence_log_ratio(log_ratio, adv, clip_low, clip_high, POLICY: tl.constexpr):
    # What the row mean m of a sequence loss averages, and its derivative: the log-ratio,
    # or for geo_mean the log-ratio clipped on the advantage's side (0 where A = 0).
    if POLICY == 9:
        above = log_ratio > clip_high
        below = log_ratio < -clip_low
        value = tl.where(adv > 0, tl.where(above, clip_high, log_ratio),
                         tl.where(adv < 0, tl.where(below, -clip_low, log_ratio), 0.0))
        slope = tl.where(adv > 0, tl.where(above, 0.0, 1.0),
                         tl.where(adv < 0, tl.where(below, 0.0, 1.0), 0.0))
    else:
        value = log_ratio
        slope = tl.full(log_ratio.shape, 1.0, log_ratio.dtype)
    return value, slope


@triton.jit
def weighted_policy_terms(logp, old_logp, adv, row_lr, offs, valid, kl_cov_coef_ptr, is_w_ptr,
                          clip_low, clip_high, param_a, param_b, POLICY: tl.constexpr,
                          HAS_IS: tl.constexpr):
    # `policy_terms` of the tokens at `offs`, kl_cov's coefficients read for it (POLICY
    # 10), pg and d pg times the constant weights of the policy term (`reference.
    # policy_weights`) with HAS_IS. Masked lanes are not read.
    kl_cov_coef = 0.0
    if POLICY == 10:
        kl_cov_coef = tl.load(kl_cov_coef_ptr + offs, mask=valid, other=0.0).to(logp.dtype)
    log_ratio, ratio, pg, d_pg, low, high, dual = policy_terms(
        logp, old_logp, adv, row_lr, clip_low, clip_high, param_a, param_b, POLICY,
        kl_cov_coef,
    )
    if HAS_IS:
        is_w = tl.load(is_w_ptr + offs, mask=valid, other=0.0).to(logp.dtype)
        pg = pg * is_w
        d_pg = d_pg * is_w
    return log_ratio, ratio, pg, d_pg, low, high, dual


@triton.jit
def kl_terms(logp, ref_logp, ratio, KL_EST: tl.constexpr, KL_RATIO: tl.constexpr):
    diff = logp - ref_logp
    if KL_EST % 8 == 1:
        kl = diff
        d_kl = tl.full(diff.shape, 1.0, diff.dtype)
    elif KL_EST % 8 == 2:
        kl = 0.5 * diff * diff
        d_kl = diff
    elif KL_EST % 8 == 4:
        kl = tl.abs(diff)
        d_kl = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))  # torch's: 0 at NaN
    elif KL_EST % 8 == 5:
        x = -diff
        clamped = (x > 20.0) | (x < -20.0)  # False at NaN: NaN stays NaN, as the reference
        x = tl.where(x > 20.0, 20.0, tl.where(x < -20.0, -20.0, x))
        r = tl.exp(x)
        k3 = r - x - 1.0
        kl = tl.where(k3 > 10.0, 10.0, k3)
        d_kl = tl.where(clamped | (k3 > 10.0), 0.0, 1.0 - r)
    else:
        r = tl.exp(-diff)
        kl = r + diff - 1.0
        d_kl = 1.0 - r
    if KL_EST >= 8:
        d_kl = diff
    if KL_RATIO:  # TRL's use_bias_correction_kl: r kl, its gradient through r too
        d_kl = (d_kl + kl) * ratio
        kl = kl * ratio
    return kl, d_kl


@triton.jit
def tile_kl_terms(ref_ptr, offs, valid, logp, ratio, KL_EST: tl.constexpr,
                  KL_RATIO: tl.constexpr):
    # `kl_terms` of the tokens at `offs`, their ref_logp read (masked lanes are not).
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(logp.dtype)
    return kl_terms(logp, ref, ratio, KL_EST, KL_RATIO)


@triton.jit
def max_keep_nan(a, b):
    # tl.maximum (and so tl.max) is fmax by default: it drops a NaN operand.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def value_terms(v, old_v, ret, value_clip):
    # clip(v, old_v -+ eps_v) is old_v + clip(v - old_v, -+eps_v) without its rounding:
    # inside the range it is v itself, so the clipped branch can only win outside it.
    # The clamp keeps NaN bounds (a NaN old_v), as torch.clamp does.
    low = old_v - value_clip
    high = old_v + value_clip
    v_clipped = tl.minimum(
        max_keep_nan(v, low), high, propagate_nan=tl.PropagateNan.ALL
    )
    vl_unclipped = (v - ret) * (v - ret)
    vl_clipped = (v_clipped - ret) * (v_clipped - ret)
    clipped = vl_clipped > vl_unclipped
    # A NaN old_v makes the clipped branch alone NaN: it wins, as in torch.maximum.
    only_clipped_nan = (vl_clipped != vl_clipped) & (vl_unclipped == vl_unclipped)
    take_clipped = clipped | only_clipped_nan
    vl = 0.5 * tl.where(take_clipped, vl_clipped, vl_unclipped)
    # Its gradient is NaN too, as at every other NaN input: never a silent 0.
    d_vl = tl.where(clipped, 0.0, tl.where(only_clipped_nan, float("nan"), v - ret))
    return vl, d_vl, clipped
