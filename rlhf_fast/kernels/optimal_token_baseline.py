"""verl's optimal token baseline (OTB): returns, path variance and a baseline per position
of each group, one launch.

Math (a group of n consecutive rows, position t, m the mask; `reference.optimal_token_baseline`):

    G_t = sum_{j >= t} m_j r_j             w_t = (1 - 2 exp(old_logp_t) + exp(log_sum_p2_t)) rho_t^2
    W_t = sum_{j <= t} m_j w_j             B_t = sum_i m G W / (sum_i m W + eps)
    A_t = m_t (G_t - B_t)                  (B = 0 for a group of one)

One program per group, its n rows one tile of [BLOCK_N, BLOCK_T] positions:
  pass 1, right to left: G as a cumulative sum of the reversed columns plus the sum of the
          blocks to their right, written as the returns output (0 where masked); each
          row's valid-token count (handle_zero_tail).
  pass 2, left to right: W as a cumulative sum plus the sum of the blocks to the left, G
          read back from the returns (cache-hot, written by the same program: a barrier
          orders the passes), B from two column sums over the rows, A written.
Both G and W come from running sums in their own direction, so neither is a difference
of two larger sums (a suffix sum as total - prefix would lose the small returns of the
last tokens to the rounding of the total).

w_t = ||e_y - pi||^2 = (1 - pi_y)^2 + (sum pi^2 - pi_y^2) is computed as two non-negative
terms, expm1(old_logp)^2 + exp(2 old_logp) expm1(log_sum_p2 - 2 old_logp): where pi_y is
near 1, 1 - 2 pi_y + sum pi^2 cancels all but a few bits in fp32 (and the baseline of a
group of one valid row, G W / (W + eps), reads W at that precision).

Traffic: each input read once (rewards twice: once per pass is cheaper than keeping the
tile), returns written once and read once, advantages written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlhf_fast.kernels.common import fp64_arg, mask_view, math_dtype, nonzero, split_fp64


@triton.jit
def _expm1(x):
    # exp(x) - 1 accurate near 0 (Kahan: u's rounding cancels in (u - 1) / log(u))
    u = tl.exp(x)
    log_u = tl.where(u == 1.0, 1.0, tl.log(u))  # (no 0 / 0 in the lanes discarded)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * x / log_u))


@triton.jit
def _optimal_token_baseline_kernel(
    rewards_ptr, mask_ptr, old_logp_ptr, sum_p2_ptr, rho_ptr, adv_ptr, ret_ptr,
    group_size, seq_len, eps_hi, eps_lo,
    HAS_RHO: tl.constexpr, ZERO_TAIL: tl.constexpr, FP64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < group_size
    row_start = (tl.program_id(0).to(tl.int64) * group_size + rows) * seq_len
    cols = tl.arange(0, BLOCK_T)

    suffix = tl.zeros([BLOCK_N], acc_dtype)
    lengths = tl.zeros([BLOCK_N], acc_dtype)
    for start in range(0, seq_len, BLOCK_T):
        pos = seq_len - 1 - (start + cols)  # right to left
        ok = row_ok[:, None] & (pos >= 0)[None, :]
        at = row_start[:, None] + pos[None, :]
        valid = ok & nonzero(tl.load(mask_ptr + at, mask=ok, other=0))
        r = tl.where(valid, tl.load(rewards_ptr + at, mask=valid, other=0.0).to(acc_dtype), 0.0)
        returns = tl.cumsum(r, axis=1) + suffix[:, None]
        suffix += tl.sum(r, axis=1)
        lengths += tl.sum(tl.where(valid, 1.0, 0.0), axis=1)
        tl.store(ret_ptr + at, tl.where(valid, returns, 0.0), mask=ok)

    # handle_zero_tail: the group's one strictly longest row, from the second length on
    longest = tl.max(tl.where(row_ok, lengths, -1.0), axis=0)
    second = tl.max(tl.where(row_ok & (lengths < longest), lengths, -1.0), axis=0)
    n_longest = tl.sum(tl.where(row_ok & (lengths == longest), 1, 0), axis=0)
    zero_tail_row = (lengths == longest) & (n_longest == 1)
    eps = fp64_arg(eps_hi, eps_lo, acc_dtype)
    tl.debug_barrier()  # pass 2 reads the returns other threads of this program wrote

    prefix = tl.zeros([BLOCK_N], acc_dtype)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + cols
        ok = row_ok[:, None] & (pos < seq_len)[None, :]
        at = row_start[:, None] + pos[None, :]
        valid = ok & nonzero(tl.load(mask_ptr + at, mask=ok, other=0))
        logp = tl.load(old_logp_ptr + at, mask=valid, other=0.0).to(acc_dtype)
        log_sum_p2 = tl.load(sum_p2_ptr + at, mask=valid, other=0.0).to(acc_dtype)
        one_minus_pi = _expm1(logp)
        w = one_minus_pi * one_minus_pi + tl.exp(2.0 * logp) * _expm1(log_sum_p2 - 2.0 * logp)
        if HAS_RHO:
            rho = tl.load(rho_ptr + at, mask=valid, other=0.0).to(acc_dtype)
            w = w * (rho * rho)
        w = tl.where(valid, w, 0.0)
        path = tl.cumsum(w, axis=1) + prefix[:, None]
        prefix += tl.sum(w, axis=1)
        returns = tl.load(ret_ptr + at, mask=valid, other=0.0)
        numerator = tl.sum(tl.where(valid, returns * path, 0.0), axis=0)
        denominator = tl.sum(tl.where(valid, path, 0.0), axis=0) + eps
        baseline = tl.where(group_size > 1, numerator / denominator, 0.0)[None, :]
        if ZERO_TAIL:
            baseline = tl.where(zero_tail_row[:, None] & (pos >= second)[None, :], 0.0,
                                baseline)
        tl.store(adv_ptr + at, tl.where(valid, returns - baseline, 0.0), mask=ok)


def optimal_token_baseline_forward(
    rewards: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
    log_sum_p2: torch.Tensor, rollout_is_weights: torch.Tensor | None, group_size: int,
    handle_zero_tail: bool, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) ``[B, T]`` of contiguous ``[B, T]`` inputs in groups of
    `group_size` consecutive rows; fp32 (fp64 if an input is fp64). One launch."""
    inputs = [rewards, old_logp, log_sum_p2] + (
        [] if rollout_is_weights is None else [rollout_is_weights])
    dtype = math_dtype(*inputs)
    advantages = torch.empty(rewards.shape, dtype=dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    n_rows, seq_len = rewards.shape
    if n_rows == 0 or seq_len == 0:
        return advantages, returns
    block_n = triton.next_power_of_2(group_size)
    block_t = max(16, min(256, 4096 // block_n))
    _optimal_token_baseline_kernel[(n_rows // group_size,)](
        rewards, mask_view(mask), old_logp, log_sum_p2,
        rewards if rollout_is_weights is None else rollout_is_weights, advantages, returns,
        group_size, seq_len, *split_fp64(eps),
        HAS_RHO=rollout_is_weights is not None, ZERO_TAIL=handle_zero_tail,
        FP64=dtype == torch.float64, BLOCK_N=block_n, BLOCK_T=block_t, num_warps=4,
    )
    return advantages, returns
