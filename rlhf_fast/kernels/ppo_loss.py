"""PPO loss: clipped surrogate + KL penalty + entropy bonus + clipped value loss, fused.

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
    loss = agg(pg) + kl_coef agg(kl) - entropy_coef agg(H) + vf_coef agg(vl)

agg is linear: agg(x) = sum_t w_t x_t with a weight per row, so the backward of every term
is that weight times the per-token derivative above:

    token-mean                w = 1 / (valid tokens in the batch)
    seq-mean-token-mean       w = 1 / (non-empty rows * valid tokens in the row)
    seq-mean-token-sum        w = 1 / (non-empty rows)
    seq-mean-token-sum-norm   w = 1 / (B * max_len)
    token-sum                 w = 1

and with the global counts a caller may pass, the tokens or sequences of the global batch
replace the batch's, and every w is multiplied by dp_size (`reference.aggregate`).

Three launches, each one pass (four for gspo, gspo_token and geo_mean: a first pass sums
each tile's log-ratios, the segment reduction their row mean needs): the forward reads
every input once, one program per tile of BLOCK_T tokens of a row (grid [B, T / BLOCK_T]:
at B = 64, T = 4096 that is 256 programs, where one per row would leave half of an H100's
132 SMs idle), and writes its partial sums (N_ROW_STATS columns); a one-program kernel
reduces those [B, tiles, N_ROW_STATS] partials in a fixed order (each row's tiles first,
deterministic, no atomics) into the loss terms and statistics; the backward reads the
inputs once more, tile by tile, and writes d logp, d entropy and d values together.
BLOCK_T is a function of T alone. Masked tokens are
never read: they contribute 0 and get gradient 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import cast, fp64_arg, nonzero, split_fp64

# Per-tile partials, in this column order: valid tokens, sums of pg, kl, entropy, vl,
# clipped tokens, ratio, then max ratio, sum of log-ratio^2, value-clipped tokens, tokens
# clipped at the upper bound, dual-clipped tokens; for the sequence losses, written by the
# first pass: valid tokens and sum of (clipped) log-ratios, then sum of d pg / d m.
N_ROW_STATS = 15
ROW_STATS = tl.constexpr(N_ROW_STATS)  # the same, readable inside the kernels
# Scalar outputs, in the order of `PPOLossOutput`: loss, policy_loss, value_loss, kl,
# entropy, clipfrac, approx_kl, ratio_mean, ratio_max, value_clipfrac, clipfrac_low,
# clipfrac_high, dual_clipfrac.
N_OUTPUTS = 13
AGG_CODES = {
    "token-mean": 0,
    "seq-mean-token-mean": 1,
    "seq-mean-token-sum": 2,
    "seq-mean-token-sum-norm": 3,
    "token-sum": 4,
}
# The kernels' POLICY: these numbers, compared as literals there. >= 7: sequence losses;
# 7 and 9 take their gradient through the row mean.
POLICY_CODES = {"vanilla": 0, "cispo": 2, "sapo": 3, "gpg": 4, "dppo_tv": 5, "dppo_kl": 6,
                "gspo": 7, "gspo_token": 8, "geo_mean": 9, "bypass_mode": 4,
                "clip_cov": 0, "kl_cov": 10, "dro": 11}
DUAL_CLIP_CODE = 1  # vanilla with dual_clip
KL_STRAIGHT_THROUGH = 8  # added to an estimator's code: the gradient of k2
KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "abs": 4, "low_var_kl": 5}
KL_CODES |= {f"{name}+": code + KL_STRAIGHT_THROUGH for name, code in KL_CODES.items()
             if name != "k2"}


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
        return self.policy_code >= POLICY_CODES["gspo"]

    def fp64_args(self, *names: str) -> list[float]:
        """The named settings as kernel arguments: each its `split_fp64` (hi, lo) pair."""
        return [half for name in names for half in split_fp64(getattr(self, name))]


@triton.jit
def _policy_terms(logp, old_logp, adv, row_lr, clip_low, clip_high, param_a, param_b,
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
def _sequence_log_ratio(log_ratio, adv, clip_low, clip_high, POLICY: tl.constexpr):
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
def _row_sums(row_stats_ptr, row, n_tiles, column):
    # The sum of one column of the row's tile partials, in tile order.
    total = tl.zeros([], row_stats_ptr.dtype.element_ty)
    for t in range(0, n_tiles):
        total += tl.load(row_stats_ptr + (row * n_tiles + t) * ROW_STATS + column)
    return total


@triton.jit
def _kl_terms(logp, ref_logp, ratio, KL_EST: tl.constexpr, KL_RATIO: tl.constexpr):
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
def _max_keep_nan(a, b):
    # tl.maximum (and so tl.max) is fmax by default: it drops a NaN operand.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _value_terms(v, old_v, ret, value_clip):
    # clip(v, old_v -+ eps_v) is old_v + clip(v - old_v, -+eps_v) without its rounding:
    # inside the range it is v itself, so the clipped branch can only win outside it.
    # The clamp keeps NaN bounds (a NaN old_v), as torch.clamp does.
    low = old_v - value_clip
    high = old_v + value_clip
    v_clipped = tl.minimum(
        _max_keep_nan(v, low), high, propagate_nan=tl.PropagateNan.ALL
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


@triton.jit
def _tile_inputs(logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, row, tile, T,
                 FP64: tl.constexpr, BLOCK_T: tl.constexpr):
    # One tile of a row: its offsets, valid lanes and policy inputs (masked lanes unread).
    acc_dtype = tl.float64 if FP64 else tl.float32
    cols = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = row * T + cols
    valid = nonzero(tl.load(mask_ptr + offs, mask=cols < T, other=0))
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    old_logp = tl.load(old_logp_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    return cols, offs, valid, logp, old_logp, adv


@triton.jit
def _ppo_sequence_kernel(
    logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, row_stats_ptr, T,
    clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo,
    POLICY: tl.constexpr, FP64: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # The first pass of a sequence loss: each tile's valid tokens and sum of log-ratios.
    acc_dtype = tl.float64 if FP64 else tl.float32
    clip_low = fp64_arg(clip_low_hi, clip_low_lo, acc_dtype)
    clip_high = fp64_arg(clip_high_hi, clip_high_lo, acc_dtype)
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols, offs, valid, logp, old_logp, adv = _tile_inputs(
        logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, row, tile, T, FP64, BLOCK_T)
    value, slope = _sequence_log_ratio(logp - old_logp, adv, clip_low, clip_high, POLICY)
    out = row_stats_ptr + (row * tl.num_programs(1) + tile) * ROW_STATS
    tl.store(out + 12, tl.sum(tl.where(valid, 1.0, 0.0), axis=0))
    tl.store(out + 13, tl.sum(tl.where(valid, value, 0.0), axis=0))


@triton.jit
def _row_log_ratio(row_stats_ptr, row, n_tiles, POLICY: tl.constexpr):
    # m of a sequence loss (0 for the others, which do not read it) and the row's tokens.
    if POLICY >= 7:
        n = _row_sums(row_stats_ptr, row, n_tiles, 12)
        m = _row_sums(row_stats_ptr, row, n_tiles, 13) / tl.maximum(n, 1.0)
    else:
        n = tl.zeros([], row_stats_ptr.dtype.element_ty)
        m = n
    return m, n


@triton.jit
def _ppo_fwd_kernel(
    logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, v_ptr, old_v_ptr, ret_ptr,
    is_w_ptr, aux_ptr, row_stats_ptr, T, clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo,
    param_a_hi, param_a_lo, param_b_hi, param_b_lo, value_clip_hi, value_clip_lo,
    POLICY: tl.constexpr, KL_EST: tl.constexpr, KL_RATIO: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    HAS_VALUE: tl.constexpr, HAS_IS: tl.constexpr, FP64: tl.constexpr, BLOCK_T: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    clip_low = fp64_arg(clip_low_hi, clip_low_lo, acc_dtype)
    clip_high = fp64_arg(clip_high_hi, clip_high_lo, acc_dtype)
    param_a = fp64_arg(param_a_hi, param_a_lo, acc_dtype)
    param_b = fp64_arg(param_b_hi, param_b_lo, acc_dtype)
    value_clip = fp64_arg(value_clip_hi, value_clip_lo, acc_dtype)
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    cols, offs, valid, logp, old_logp, adv = _tile_inputs(
        logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, row, tile, T, FP64, BLOCK_T)
    row_lr, _ = _row_log_ratio(row_stats_ptr, row, n_tiles, POLICY)
    kl_cov_coef = 0.0
    if POLICY == 10:
        kl_cov_coef = tl.load(aux_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    log_ratio, ratio, pg, d_pg, low, high, dual = _policy_terms(
        logp, old_logp, adv, row_lr, clip_low, clip_high, param_a, param_b, POLICY,
        kl_cov_coef,
    )
    if HAS_IS:  # the constant weights of the policy term (`reference.policy_weights`)
        is_w = tl.load(is_w_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        pg = pg * is_w
        d_pg = d_pg * is_w
    zero = tl.zeros([], acc_dtype)
    s_kl, s_ent, s_vl, s_vclip = zero, zero, zero, zero
    if KL_EST != 0:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        kl, d_kl = _kl_terms(logp, ref, ratio, KL_EST, KL_RATIO)
        s_kl = tl.sum(tl.where(valid, kl, 0.0), axis=0)
    if HAS_ENTROPY:
        s_ent = tl.sum(tl.load(ent_ptr + offs, mask=valid, other=0.0).to(acc_dtype), axis=0)
    if HAS_VALUE:
        v = tl.load(v_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        old_v = tl.load(old_v_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        ret = tl.load(ret_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        vl, d_vl, v_clipped = _value_terms(v, old_v, ret, value_clip)
        s_vl = tl.sum(tl.where(valid, vl, 0.0), axis=0)
        s_vclip = tl.sum(tl.where(valid & v_clipped, 1.0, 0.0), axis=0)
    out = row_stats_ptr + (row * n_tiles + tile) * ROW_STATS
    tl.store(out + 0, tl.sum(tl.where(valid, 1.0, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(valid, pg, 0.0), axis=0))
    tl.store(out + 2, s_kl)
    tl.store(out + 3, s_ent)
    tl.store(out + 4, s_vl)
    tl.store(out + 5, tl.sum(tl.where(valid & (low | high), 1.0, 0.0), axis=0))
    tl.store(out + 6, tl.sum(tl.where(valid, ratio, 0.0), axis=0))
    tl.store(out + 7, tl.reduce(tl.where(valid, ratio, 0.0), 0, _max_keep_nan))
    tl.store(out + 8, tl.sum(tl.where(valid, log_ratio * log_ratio, 0.0), axis=0))
    tl.store(out + 9, s_vclip)
    tl.store(out + 10, tl.sum(tl.where(valid & high, 1.0, 0.0), axis=0))
    tl.store(out + 11, tl.sum(tl.where(valid & dual, 1.0, 0.0), axis=0))
    if POLICY == 7 or POLICY == 9:  # the backward's sum over the row of d pg / d m
        tl.store(out + 14, tl.sum(tl.where(valid, d_pg, 0.0), axis=0))


@triton.jit
def _ppo_reduce_kernel(
    row_stats_ptr, out_ptr, counts_ptr, B, n_tiles, token_count_hi, token_count_lo,
    seq_count_hi, seq_count_lo, norm_count_hi, norm_count_lo, dp_size_hi, dp_size_lo,
    kl_coef_hi, kl_coef_lo, entropy_coef_hi, entropy_coef_lo, vf_coef_hi, vf_coef_lo,
    AGG: tl.constexpr, FP64: tl.constexpr, BLOCK_B: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    kl_coef = fp64_arg(kl_coef_hi, kl_coef_lo, acc_dtype)
    entropy_coef = fp64_arg(entropy_coef_hi, entropy_coef_lo, acc_dtype)
    vf_coef = fp64_arg(vf_coef_hi, vf_coef_lo, acc_dtype)
    token_count = fp64_arg(token_count_hi, token_count_lo, acc_dtype)
    seq_count = fp64_arg(seq_count_hi, seq_count_lo, acc_dtype)
    norm_count = fp64_arg(norm_count_hi, norm_count_lo, acc_dtype)
    dp_size = fp64_arg(dp_size_hi, dp_size_lo, acc_dtype)
    zeros = tl.zeros([BLOCK_B], acc_dtype)
    n_tok, n_seq, s_pg, s_kl, s_ent, s_vl = zeros, zeros, zeros, zeros, zeros, zeros
    s_clip, s_ratio, r_max, s_lr2, s_vclip = zeros, zeros, zeros, zeros, zeros
    s_high, s_dual = zeros, zeros
    for start in range(0, B, BLOCK_B):
        rows = (start + tl.arange(0, BLOCK_B)).to(tl.int64)
        ok = rows < B
        # Each row's sums over its tiles, in tile order.
        n, r_pg, r_kl, r_ent, r_vl = zeros, zeros, zeros, zeros, zeros
        for tile in range(0, n_tiles):
            stats = row_stats_ptr + (rows * n_tiles + tile) * ROW_STATS
            n += tl.load(stats + 0, mask=ok, other=0.0)
            r_pg += tl.load(stats + 1, mask=ok, other=0.0)
            r_kl += tl.load(stats + 2, mask=ok, other=0.0)
            r_ent += tl.load(stats + 3, mask=ok, other=0.0)
            r_vl += tl.load(stats + 4, mask=ok, other=0.0)
            s_clip += tl.load(stats + 5, mask=ok, other=0.0)
            s_ratio += tl.load(stats + 6, mask=ok, other=0.0)
            r_max = _max_keep_nan(r_max, tl.load(stats + 7, mask=ok, other=0.0))
            s_lr2 += tl.load(stats + 8, mask=ok, other=0.0)
            s_vclip += tl.load(stats + 9, mask=ok, other=0.0)
            s_high += tl.load(stats + 10, mask=ok, other=0.0)
            s_dual += tl.load(stats + 11, mask=ok, other=0.0)
        # seq-mean-token-mean averages each row's mean; the other modes sum the row sums.
        scale = tl.where(n > 0, 1.0 / tl.maximum(n, 1.0), 0.0) if AGG == 1 else 1.0
        n_tok += n
        n_seq += tl.where(n > 0, 1.0, 0.0)
        s_pg += r_pg * scale
        s_kl += r_kl * scale
        s_ent += r_ent * scale
        s_vl += r_vl * scale
    tokens = tl.sum(n_tok, axis=0)
    seqs = tl.sum(n_seq, axis=0)
    # The divisor of every term: the batch's count or the caller's global one, / dp_size.
    if AGG == 0:
        denom = tl.where(token_count > 0, token_count, tokens)
    elif AGG == 3:
        denom = norm_count
    elif AGG == 4:
        denom = tl.full([], 1.0, acc_dtype)
    else:
        denom = tl.where(seq_count > 0, seq_count, seqs)
    denom = tl.maximum(denom, 1.0) / dp_size
    policy = tl.sum(s_pg, axis=0) / denom
    kl = tl.sum(s_kl, axis=0) / denom
    ent = tl.sum(s_ent, axis=0) / denom
    value = tl.sum(s_vl, axis=0) / denom
    per_token = 1.0 / tl.maximum(tokens, 1.0)
    tl.store(out_ptr + 0, policy + kl_coef * kl - entropy_coef * ent + vf_coef * value)
    tl.store(out_ptr + 1, policy)
    tl.store(out_ptr + 2, value)
    tl.store(out_ptr + 3, kl)
    tl.store(out_ptr + 4, ent)
    clipped = tl.sum(s_clip, axis=0)
    clipped_high = tl.sum(s_high, axis=0)
    tl.store(out_ptr + 5, clipped * per_token)
    tl.store(out_ptr + 6, 0.5 * tl.sum(s_lr2, axis=0) * per_token)
    tl.store(out_ptr + 7, tl.sum(s_ratio, axis=0) * per_token)
    tl.store(out_ptr + 8, tl.reduce(r_max, 0, _max_keep_nan))
    tl.store(out_ptr + 9, tl.sum(s_vclip, axis=0) * per_token)
    tl.store(out_ptr + 10, (clipped - clipped_high) * per_token)
    tl.store(out_ptr + 11, clipped_high * per_token)
    tl.store(out_ptr + 12, tl.sum(s_dual, axis=0) * per_token)
    tl.store(counts_ptr + 0, tokens)
    tl.store(counts_ptr + 1, seqs)
    tl.store(counts_ptr + 2, denom)


@triton.jit
def _ppo_bwd_kernel(
    grad_out_ptr, counts_ptr, row_stats_ptr,
    logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, ref_ptr, v_ptr, old_v_ptr, ret_ptr, is_w_ptr,
    aux_ptr, d_logp_ptr, d_ent_ptr, d_v_ptr,
    T, clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo,
    param_a_hi, param_a_lo, param_b_hi, param_b_lo, value_clip_hi, value_clip_lo,
    kl_coef_hi, kl_coef_lo, entropy_coef_hi, entropy_coef_lo, vf_coef_hi, vf_coef_lo,
    AGG: tl.constexpr, POLICY: tl.constexpr, KL_EST: tl.constexpr, KL_RATIO: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr, GRAD_VALUE: tl.constexpr, HAS_IS: tl.constexpr,
    FP64: tl.constexpr, BLOCK_T: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    clip_low = fp64_arg(clip_low_hi, clip_low_lo, acc_dtype)
    clip_high = fp64_arg(clip_high_hi, clip_high_lo, acc_dtype)
    param_a = fp64_arg(param_a_hi, param_a_lo, acc_dtype)
    param_b = fp64_arg(param_b_hi, param_b_lo, acc_dtype)
    value_clip = fp64_arg(value_clip_hi, value_clip_lo, acc_dtype)
    kl_coef = fp64_arg(kl_coef_hi, kl_coef_lo, acc_dtype)
    entropy_coef = fp64_arg(entropy_coef_hi, entropy_coef_lo, acc_dtype)
    vf_coef = fp64_arg(vf_coef_hi, vf_coef_lo, acc_dtype)
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    # the reduction's divisor (counts[2]); seq-mean-token-mean divides by the row's tokens too
    weight = 1.0 / tl.load(counts_ptr + 2)
    if AGG == 1:
        weight = weight / tl.maximum(_row_sums(row_stats_ptr, row, n_tiles, 0), 1.0)
    # Gradients reaching each aggregated term: through `loss` and through its own output.
    g_loss = tl.load(grad_out_ptr + 0).to(acc_dtype)
    c_pg = weight * (g_loss + tl.load(grad_out_ptr + 1).to(acc_dtype))
    c_vl = weight * (g_loss * vf_coef + tl.load(grad_out_ptr + 2).to(acc_dtype))
    c_kl = weight * (g_loss * kl_coef + tl.load(grad_out_ptr + 3).to(acc_dtype))
    c_ent = weight * (tl.load(grad_out_ptr + 4).to(acc_dtype) - g_loss * entropy_coef)
    cols, offs, valid, logp, old_logp, adv = _tile_inputs(
        logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, row, tile, T, FP64, BLOCK_T)
    in_row = cols < T
    row_lr, n_seq = _row_log_ratio(row_stats_ptr, row, n_tiles, POLICY)
    kl_cov_coef = 0.0
    if POLICY == 10:
        kl_cov_coef = tl.load(aux_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    log_ratio, ratio, pg, d_pg, low, high, dual = _policy_terms(
        logp, old_logp, adv, row_lr, clip_low, clip_high, param_a, param_b, POLICY,
        kl_cov_coef,
    )
    if HAS_IS:
        d_pg = d_pg * tl.load(is_w_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    if POLICY == 7 or POLICY == 9:  # through m: the row's d pg / d m, shared by its tokens
        d_m = _row_sums(row_stats_ptr, row, n_tiles, 14) / tl.maximum(n_seq, 1.0)
        _, slope = _sequence_log_ratio(log_ratio, adv, clip_low, clip_high, POLICY)
        # a token whose clip holds is outside the mean: 0, even where d_m is NaN
        d_logp = tl.where(slope == 0.0, 0.0, c_pg * d_m * slope)
    else:
        d_logp = c_pg * d_pg
    if KL_EST != 0:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        kl, d_kl = _kl_terms(logp, ref, ratio, KL_EST, KL_RATIO)
        d_logp += c_kl * d_kl
    d_logp = tl.where(valid, d_logp, 0.0)
    tl.store(d_logp_ptr + offs, cast(d_logp, d_logp_ptr.dtype.element_ty), mask=in_row)
    if GRAD_ENTROPY:
        d_ent = tl.where(valid, c_ent, 0.0)
        tl.store(d_ent_ptr + offs, cast(d_ent, d_ent_ptr.dtype.element_ty), mask=in_row)
    if GRAD_VALUE:
        v = tl.load(v_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        old_v = tl.load(old_v_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        ret = tl.load(ret_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        vl, d_vl, v_clipped = _value_terms(v, old_v, ret, value_clip)
        d_v = tl.where(valid, c_vl * d_vl, 0.0)
        tl.store(d_v_ptr + offs, cast(d_v, d_v_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _ppo_token_grad_kernel(
    token_weight_ptr, logp_ptr, old_logp_ptr, adv_ptr, ref_ptr, is_w_ptr, d_logp_ptr,
    d_ent_ptr,
    n_tokens, clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo,
    param_a_hi, param_a_lo, param_b_hi, param_b_lo,
    kl_coef_hi, kl_coef_lo, entropy_coef_hi, entropy_coef_lo,
    POLICY: tl.constexpr, KL_EST: tl.constexpr, KL_RATIO: tl.constexpr, HAS_IS: tl.constexpr,
    FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    # d loss / d logp and d loss / d entropy of single tokens, given each token's
    # aggregation weight w (0 for masked tokens): the fused linear_ppo_loss calls this on a
    # chunk of tokens as soon as their log-probs exist, before the rest of the batch does
    # (token losses only: a sequence loss needs its whole row first).
    acc_dtype = tl.float64 if FP64 else tl.float32
    clip_low = fp64_arg(clip_low_hi, clip_low_lo, acc_dtype)
    clip_high = fp64_arg(clip_high_hi, clip_high_lo, acc_dtype)
    param_a = fp64_arg(param_a_hi, param_a_lo, acc_dtype)
    param_b = fp64_arg(param_b_hi, param_b_lo, acc_dtype)
    kl_coef = fp64_arg(kl_coef_hi, kl_coef_lo, acc_dtype)
    entropy_coef = fp64_arg(entropy_coef_hi, entropy_coef_lo, acc_dtype)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_tokens
    w = tl.load(token_weight_ptr + offs, mask=in_range, other=0.0).to(acc_dtype)
    valid = w != 0
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    old_logp = tl.load(old_logp_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    log_ratio, ratio, pg, d_pg, low, high, dual = _policy_terms(
        logp, old_logp, adv, 0.0, clip_low, clip_high, param_a, param_b, POLICY
    )
    d_logp = d_pg
    if HAS_IS:
        d_logp = d_logp * tl.load(is_w_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
    if KL_EST != 0:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(acc_dtype)
        kl, d_kl = _kl_terms(logp, ref, ratio, KL_EST, KL_RATIO)
        d_logp += kl_coef * d_kl
    tl.store(d_logp_ptr + offs, tl.where(valid, w * d_logp, 0.0), mask=in_range)
    tl.store(d_ent_ptr + offs, tl.where(valid, -entropy_coef * w, 0.0), mask=in_range)


MAX_BLOCK_T = 1024


def block_size(T: int) -> int:
    """BLOCK_T for rows of length T: a function of T alone (batch invariance)."""
    return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(T)))


def _num_warps(block: int) -> int:
    return 4 if block >= 512 else 2


def ppo_forward(
    logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns, cfg,
    is_weights=None, kl_cov_coef=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on contiguous [B, T] inputs (None for absent optional ones;
    `is_weights` the rollout correction's, on the policy term).

    `cfg` is a `PPOKernelConfig`. Returns (outputs [N_OUTPUTS], counts [3]: valid
    tokens, non-empty rows, the terms' divisor; row_stats [B, tiles, N_ROW_STATS]), fp32
    (fp64 for fp64 logp): see N_OUTPUTS for the order of the outputs and N_ROW_STATS
    for that of the partials.
    """
    B, T = logp.shape
    fp64 = logp.dtype == torch.float64
    dtype = torch.float64 if fp64 else torch.float32
    block = block_size(T)
    n_tiles = triton.cdiv(T, block)
    # Zeros where the kernels leave columns unwritten (all but gspo and geo_mean write
    # fewer than N_ROW_STATS): row_stats is an output of the custom op rlhf_fast::ppo_loss,
    # whose outputs must be a function of its inputs.
    writes_all = cfg.policy_code in (POLICY_CODES["gspo"], POLICY_CODES["geo_mean"])
    row_stats = (torch.empty if writes_all else torch.zeros)(
        B, n_tiles, N_ROW_STATS, dtype=dtype, device=logp.device)
    outputs = torch.empty(N_OUTPUTS, dtype=dtype, device=logp.device)
    counts = torch.empty(3, dtype=dtype, device=logp.device)
    if B > 0 and T > 0 and cfg.is_sequence_loss:
        _ppo_sequence_kernel[(B, n_tiles)](
            logp, old_logp, advantages, mask, row_stats, T,
            *cfg.fp64_args("clip_low", "clip_high"),
            POLICY=cfg.policy_code, FP64=fp64, BLOCK_T=block, num_warps=_num_warps(block),
        )
    if B > 0 and T > 0:
        _ppo_fwd_kernel[(B, n_tiles)](
            logp, old_logp, advantages, mask,
            logp if ref_logp is None else ref_logp,
            logp if entropy is None else entropy,
            logp if values is None else values,
            logp if old_values is None else old_values,
            logp if returns is None else returns,
            logp if is_weights is None else is_weights,
            logp if kl_cov_coef is None else kl_cov_coef,
            row_stats, T,
            *cfg.fp64_args("clip_low", "clip_high", "param_a", "param_b", "value_clip"),
            POLICY=cfg.policy_code, KL_EST=cfg.kl_code if ref_logp is not None else 0,
            KL_RATIO=cfg.kl_ratio,
            HAS_ENTROPY=entropy is not None, HAS_VALUE=values is not None,
            HAS_IS=is_weights is not None, FP64=fp64,
            # (a sequence loss's row terms take 70 registers: 28 warps per SM, enough in
            # flight; 8 warps made it issue-bound, see benchmarks/kernel_resources.py)
            BLOCK_T=block, num_warps=_num_warps(block),
        )
    _ppo_reduce_kernel[(1,)](
        row_stats, outputs, counts, B if T > 0 else 0, n_tiles,
        *cfg.fp64_args("token_count", "seq_count"), *split_fp64(cfg.norm_count(B, T)),
        *cfg.fp64_args("dp_size", "kl_coef", "entropy_coef", "vf_coef"),
        AGG=cfg.agg_code, FP64=fp64, BLOCK_B=256, num_warps=4,
    )
    return outputs, counts, row_stats


def ppo_backward(
    grad_outputs, counts, row_stats,
    logp, old_logp, advantages, mask, ref_logp, values, old_values, returns,
    cfg, grad_entropy_dtype: torch.dtype | None, grad_values: bool, is_weights=None,
    kl_cov_coef=None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. logp, entropy (when `grad_entropy_dtype` is given, in that dtype)
    and values (when `grad_values`), each [B, T] in its input's dtype, from the upstream
    gradient of the [10] outputs."""
    B, T = logp.shape
    d_logp = torch.empty_like(logp)
    d_ent = None if grad_entropy_dtype is None else torch.empty_like(logp, dtype=grad_entropy_dtype)
    d_v = torch.empty_like(values) if grad_values else None
    if B == 0 or T == 0:
        return d_logp, d_ent, d_v
    block = block_size(T)
    _ppo_bwd_kernel[(B, triton.cdiv(T, block))](
        grad_outputs, counts, row_stats,
        logp, old_logp, advantages, mask,
        logp if ref_logp is None else ref_logp,
        logp if values is None else values,
        logp if old_values is None else old_values,
        logp if returns is None else returns,
        logp if is_weights is None else is_weights,
        logp if kl_cov_coef is None else kl_cov_coef,
        d_logp, d_logp if d_ent is None else d_ent, d_logp if d_v is None else d_v,
        T,
        *cfg.fp64_args("clip_low", "clip_high", "param_a", "param_b", "value_clip", "kl_coef",
                       "entropy_coef", "vf_coef"),
        AGG=cfg.agg_code, POLICY=cfg.policy_code,
        KL_EST=cfg.kl_code if ref_logp is not None else 0, KL_RATIO=cfg.kl_ratio,
        GRAD_ENTROPY=d_ent is not None, GRAD_VALUE=d_v is not None,
        HAS_IS=is_weights is not None, FP64=logp.dtype == torch.float64, BLOCK_T=block,
        num_warps=_num_warps(block),
    )
    return d_logp, d_ent, d_v


TOKEN_GRAD_BLOCK = 1024


def token_weights(mask: torch.Tensor, cfg: PPOKernelConfig, dtype: torch.dtype
                  ) -> torch.Tensor:
    """The weight of each token in the aggregated loss, ``[B, T]`` in `dtype`: the
    per-row w of this module's docstring on valid tokens, 0 on masked ones."""
    valid = (mask != 0).to(dtype)
    row_counts = valid.sum(-1, keepdim=True)
    n_seqs = cfg.seq_count or (row_counts > 0).sum().to(dtype)
    if cfg.agg_code == AGG_CODES["token-mean"]:
        denominator = cfg.token_count or row_counts.sum()
    elif cfg.agg_code == AGG_CODES["seq-mean-token-sum-norm"]:
        denominator = torch.tensor(cfg.norm_count(*mask.shape), dtype=dtype,
                                   device=mask.device)
    elif cfg.agg_code == AGG_CODES["token-sum"]:
        denominator = 1.0
    else:
        denominator = n_seqs
    weight = cfg.dp_size / torch.as_tensor(denominator, dtype=dtype, device=mask.device
                                           ).clamp(min=1)
    if cfg.agg_code == AGG_CODES["seq-mean-token-mean"]:
        weight = weight / row_counts.clamp(min=1)
    return valid * weight


def ppo_token_grads(
    token_weight, logp, old_logp, advantages, ref_logp, cfg, is_weights=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d logp, d loss / d entropy) of flat contiguous [n] tokens, for an upstream
    gradient of 1 on `loss`, in token_weight's dtype. `token_weight` from `token_weights`.
    Token losses only (not `cfg.is_sequence_loss`, not kl_cov)."""
    assert not cfg.is_sequence_loss, "a sequence loss needs its whole rows: ppo_backward"
    assert cfg.policy_code != POLICY_CODES["kl_cov"], "kl_cov reads the batch's covariance"
    n_tokens = logp.numel()
    d_logp = torch.empty_like(token_weight)
    d_ent = torch.empty_like(token_weight)
    if n_tokens == 0:
        return d_logp, d_ent
    _ppo_token_grad_kernel[(triton.cdiv(n_tokens, TOKEN_GRAD_BLOCK),)](
        token_weight, logp, old_logp, advantages, logp if ref_logp is None else ref_logp,
        logp if is_weights is None else is_weights, d_logp, d_ent, n_tokens,
        *cfg.fp64_args("clip_low", "clip_high", "param_a", "param_b", "kl_coef",
                       "entropy_coef"),
        POLICY=cfg.policy_code,
        KL_EST=cfg.kl_code if ref_logp is not None else 0, KL_RATIO=cfg.kl_ratio,
        HAS_IS=is_weights is not None,
        FP64=token_weight.dtype == torch.float64, BLOCK=TOKEN_GRAD_BLOCK, num_warps=4,
    )
    return d_logp, d_ent
