"""PPO loss: clipped surrogate + KL penalty + entropy bonus + clipped value loss, fused.

Math: the per-token terms pg (the policy loss), kl, H (the entropy) and vl (the value loss)
of `ppo_terms`, whose docstring has each with its derivative, reduce to

    loss = agg(pg) + kl_coef agg(kl) - entropy_coef agg(H) + vf_coef agg(vl)

agg is linear: agg(x) = sum_t w_t x_t with a weight per row, so the backward of every term
is that weight times its per-token derivative:

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

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import cast, fp64_arg, nonzero, split_fp64
from rlhf_fast.kernels.ppo_terms import (
    POLICY_CODES,
    POLICY_SETTINGS,
    max_keep_nan,
    policy_settings,
    sequence_log_ratio,
    tile_kl_terms,
    value_terms,
    weighted_policy_terms,
)

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


@triton.jit
def _row_sums(row_stats_ptr, row, n_tiles, column):
    # The sum of one column of the row's tile partials, in tile order.
    total = tl.zeros([], row_stats_ptr.dtype.element_ty)
    for t in range(0, n_tiles):
        total += tl.load(row_stats_ptr + (row * n_tiles + t) * ROW_STATS + column)
    return total


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
def _tile_value_terms(v_ptr, old_v_ptr, ret_ptr, offs, valid, value_clip):
    # `value_terms` of one tile's values, old values and returns (masked lanes unread), in
    # value_clip's dtype (the accumulation's).
    v = tl.load(v_ptr + offs, mask=valid, other=0.0).to(value_clip.dtype)
    old_v = tl.load(old_v_ptr + offs, mask=valid, other=0.0).to(value_clip.dtype)
    ret = tl.load(ret_ptr + offs, mask=valid, other=0.0).to(value_clip.dtype)
    return value_terms(v, old_v, ret, value_clip)


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
    value, slope = sequence_log_ratio(logp - old_logp, adv, clip_low, clip_high, POLICY)
    out = row_stats_ptr + (row * tl.num_programs(1) + tile) * ROW_STATS
    tl.store(out + 12, tl.sum(tl.where(valid, 1.0, 0.0), axis=0))
    tl.store(out + 13, tl.sum(tl.where(valid, value, 0.0), axis=0))


@triton.jit
def _row_log_ratio(row_stats_ptr, row, n_tiles, POLICY: tl.constexpr):
    # m of a sequence loss (0 for the others, which do not read it) and the row's tokens.
    if POLICY >= 7 and POLICY <= 9:  # gspo, gspo_token, geo_mean (`SEQUENCE_CODES`)
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
    clip_low, clip_high, param_a, param_b = policy_settings(
        clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo, param_a_hi, param_a_lo,
        param_b_hi, param_b_lo, FP64)
    value_clip = fp64_arg(value_clip_hi, value_clip_lo, acc_dtype)
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    cols, offs, valid, logp, old_logp, adv = _tile_inputs(
        logp_ptr, old_logp_ptr, adv_ptr, mask_ptr, row, tile, T, FP64, BLOCK_T)
    row_lr, _ = _row_log_ratio(row_stats_ptr, row, n_tiles, POLICY)
    log_ratio, ratio, pg, d_pg, low, high, dual = weighted_policy_terms(
        logp, old_logp, adv, row_lr, offs, valid, aux_ptr, is_w_ptr, clip_low, clip_high,
        param_a, param_b, POLICY, HAS_IS,
    )
    zero = tl.zeros([], acc_dtype)
    s_kl, s_ent, s_vl, s_vclip = zero, zero, zero, zero
    if KL_EST != 0:
        kl, d_kl = tile_kl_terms(ref_ptr, offs, valid, logp, ratio, KL_EST, KL_RATIO)
        s_kl = tl.sum(tl.where(valid, kl, 0.0), axis=0)
    if HAS_ENTROPY:
        s_ent = tl.sum(tl.load(ent_ptr + offs, mask=valid, other=0.0).to(acc_dtype), axis=0)
    if HAS_VALUE:
        vl, d_vl, v_clipped = _tile_value_terms(v_ptr, old_v_ptr, ret_ptr, offs, valid,
                                                value_clip)
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
    tl.store(out + 7, tl.reduce(tl.where(valid, ratio, 0.0), 0, max_keep_nan))
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
            r_max = max_keep_nan(r_max, tl.load(stats + 7, mask=ok, other=0.0))
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
    tl.store(out_ptr + 8, tl.reduce(r_max, 0, max_keep_nan))
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
    clip_low, clip_high, param_a, param_b = policy_settings(
        clip_low_hi, clip_low_lo, clip_high_hi, clip_high_lo, param_a_hi, param_a_lo,
        param_b_hi, param_b_lo, FP64)
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
    log_ratio, ratio, pg, d_pg, low, high, dual = weighted_policy_terms(
        logp, old_logp, adv, row_lr, offs, valid, aux_ptr, is_w_ptr, clip_low, clip_high,
        param_a, param_b, POLICY, HAS_IS,
    )
    if POLICY == 7 or POLICY == 9:  # through m: the row's d pg / d m, shared by its tokens
        d_m = _row_sums(row_stats_ptr, row, n_tiles, 14) / tl.maximum(n_seq, 1.0)
        _, slope = sequence_log_ratio(log_ratio, adv, clip_low, clip_high, POLICY)
        # a token whose clip holds is outside the mean: 0, even where d_m is NaN
        d_logp = tl.where(slope == 0.0, 0.0, c_pg * d_m * slope)
    else:
        d_logp = c_pg * d_pg
    if KL_EST != 0:
        kl, d_kl = tile_kl_terms(ref_ptr, offs, valid, logp, ratio, KL_EST, KL_RATIO)
        d_logp += c_kl * d_kl
    d_logp = tl.where(valid, d_logp, 0.0)
    tl.store(d_logp_ptr + offs, cast(d_logp, d_logp_ptr.dtype.element_ty), mask=in_row)
    if GRAD_ENTROPY:
        d_ent = tl.where(valid, c_ent, 0.0)
        tl.store(d_ent_ptr + offs, cast(d_ent, d_ent_ptr.dtype.element_ty), mask=in_row)
    if GRAD_VALUE:
        vl, d_vl, v_clipped = _tile_value_terms(v_ptr, old_v_ptr, ret_ptr, offs, valid,
                                                value_clip)
        d_v = tl.where(valid, c_vl * d_vl, 0.0)
        tl.store(d_v_ptr + offs, cast(d_v, d_v_ptr.dtype.element_ty), mask=in_row)


MAX_BLOCK_T = 1024


def block_size(T: int) -> int:
    """BLOCK_T for rows of length T: a function of T alone (batch invariance)."""
    return min(MAX_BLOCK_T, max(16, triton.next_power_of_2(T)))


def _num_warps(block: int) -> int:
    return 4 if block >= 512 else 2


def _pointers(present: torch.Tensor, *optional: torch.Tensor | None) -> list[torch.Tensor]:
    """The optional tensors as kernel arguments: `present` in place of an absent one (the
    kernel's flags tell it not to touch that one)."""
    return [present if tensor is None else tensor for tensor in optional]


def ppo_forward(
    logp, old_logp, advantages, mask, ref_logp, entropy, values, old_values, returns, cfg,
    is_weights=None, kl_cov_coef=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on contiguous [B, T] inputs (None for absent optional ones;
    `is_weights` the rollout correction's, on the policy term).

    `cfg` is a `ppo_terms.PPOKernelConfig`. Returns (outputs [N_OUTPUTS], counts [3]: valid
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
            *_pointers(logp, ref_logp, entropy, values, old_values, returns, is_weights,
                       kl_cov_coef),
            row_stats, T,
            *cfg.fp64_args(*POLICY_SETTINGS, "value_clip"),
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
    gradient of the [N_OUTPUTS] outputs."""
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
        *_pointers(logp, ref_logp, values, old_values, returns, is_weights, kl_cov_coef),
        d_logp, *_pointers(d_logp, d_ent, d_v),
        T,
        *cfg.fp64_args(*POLICY_SETTINGS, "value_clip", "kl_coef", "entropy_coef", "vf_coef"),
        AGG=cfg.agg_code, POLICY=cfg.policy_code,
        KL_EST=cfg.kl_code if ref_logp is not None else 0, KL_RATIO=cfg.kl_ratio,
        GRAD_ENTROPY=d_ent is not None, GRAD_VALUE=d_v is not None,
        HAS_IS=is_weights is not None, FP64=logp.dtype == torch.float64, BLOCK_T=block,
        num_warps=_num_warps(block),
    )
    return d_logp, d_ent, d_v

