"""Advantage estimators and the masked statistics they normalise with."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from rlhf_fast.options import GAE_OPTIONS, GROUP_ADVANTAGE_OPTIONS, OPTIMAL_TOKEN_BASELINE_OPTIONS
from rlhf_fast.reference.common import compute_dtype


@GAE_OPTIONS.keywords
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, last_value: Tensor | None = None,
        **options: Any) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the valid positions of each row.

    Args:
        rewards, values: ``[B, T]`` float tensors.
        mask: ``[B, T]``, nonzero = valid. Masked positions are skipped: each valid token
            links to the next valid one of its row (left / right padding, holes).
        last_value: ``[B]`` value after each row's last valid token (bootstrap for a
            truncated sequence); None means 0.

    Returns:
        ``(advantages, returns)`` ``[B, T]`` in fp32 (fp64 if rewards or values are fp64):
        delta_t = r_t + gamma * V_next - V_t, A_t = delta_t + gamma * lam * A_next,
        returns = A + V; exactly 0 at masked positions.
    """
    opt = GAE_OPTIONS.fill(options)
    gamma, lam = opt.gamma, opt.lam
    dtype = compute_dtype(torch.promote_types(rewards.dtype, values.dtype))
    r, v, valid = rewards.to(dtype), values.to(dtype), mask != 0
    B, T = r.shape
    next_value = torch.zeros(B, dtype=dtype, device=r.device)
    if last_value is not None:
        next_value = last_value.to(dtype).clone()
    next_adv = torch.zeros(B, dtype=dtype, device=r.device)
    advantages = torch.zeros(B, T, dtype=dtype, device=r.device)
    for t in reversed(range(T)):
        ok = valid[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(ok, adv, torch.zeros_like(adv))
        # A masked position leaves the "next valid" state untouched.
        next_adv = torch.where(ok, adv, next_adv)
        next_value = torch.where(ok, v[:, t], next_value)
    returns = torch.where(valid, advantages + v, torch.zeros_like(advantages))
    return advantages, returns


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0,
                       last_value: Tensor | None = None) -> Tensor:
    """R_t = r_t + gamma * R_next over the valid positions of each row (R after the last
    valid one: `last_value` ``[B]``, or 0). ``[B, T]`` fp32 (fp64 for fp64 rewards), 0 where
    masked."""
    dtype = compute_dtype(rewards.dtype)
    r, valid = rewards.to(dtype), mask != 0
    B, T = r.shape
    running = torch.zeros(B, dtype=dtype, device=r.device)
    if last_value is not None:
        running = last_value.to(dtype).clone()
    out = torch.zeros(B, T, dtype=dtype, device=r.device)
    for t in reversed(range(T)):
        running = torch.where(valid[:, t], r[:, t] + gamma * running, running)
        out[:, t] = torch.where(valid[:, t], running, torch.zeros_like(running))
    return out


@GROUP_ADVANTAGE_OPTIONS.keywords
def group_advantages(scores: Tensor, group_size: int, *, lengths: Tensor | None = None,
                     baselines: Tensor | None = None, weights: Tensor | None = None,
                     **options: Any) -> Tensor:
    """Outcome advantages of ``scores [B]`` in groups of `group_size` consecutive samples
    (one prompt's), ``[B]`` fp32 (fp64 for fp64 scores). With mean, std (unbiased, as
    torch.std) and n of the sample's group, per `estimator` (verl's
    `compute_<name>_outcome_advantage`):

    grpo: (s - mean) / (std + eps) (scale "std"), / (the batch's std + eps) ("batch",
        TRL's scale_rewards="batch"), or s - mean (None: Dr. GRPO).
    rloo (2402.14740): s minus the mean of the group's other samples, (s - mean) n / (n - 1).
    opo (2505.23585): s - sum_j len_j s_j / sum_j len_j, the length-weighted baseline of
        `lengths` [B] (answer lengths; a group of zero total length: the plain mean).
    grpo_passk (2503.19595): the group's best sample gets max - second max, scaled as
        grpo's; the others 0 (a tie for the best: 0 for all).
    gpg (2504.02546): (s - mean) B / (the batch's nonzero scores, at least 1).
    reinforce_plus_plus_baseline (2501.03262): s - mean, which the caller whitens over the
        batch's tokens (`masked_whiten`, as verl).
    remax (2310.10505): s - `baselines` [B] (the reward of each prompt's greedy answer).
    gdpo (2601.05242): `scores` [B, K], one column per reward: each column's grpo
        advantage (scale "std" or None), summed with `weights` [K] (default 1); verl then
        whitens the sum over the batch's tokens (`masked_whiten`).

    A group of one sample has no baseline: 0 (verl passes its raw score through, or for
    grpo s / (1 + eps)). A group of equal scores gives exactly 0. A NaN in a group gives
    NaN for that group only (grpo_passk included; gpg and scale="batch" read the whole
    batch, so there every group).
    """
    opt = GROUP_ADVANTAGE_OPTIONS.fill(options)
    dtype = compute_dtype(scores.dtype)
    if opt.estimator == "gdpo":
        per_reward = torch.stack([
            group_advantages(column, group_size, scale=opt.scale, eps=opt.eps)
            for column in scores.T])
        w = torch.ones(scores.shape[1], dtype=dtype, device=scores.device) \
            if weights is None else weights.to(dtype)
        return (w[:, None] * per_reward).sum(0)
    if opt.estimator == "remax":
        return scores.to(dtype) - baselines.to(dtype)
    s = scores.to(dtype).reshape(-1, group_size)
    # Deviations from the group's first score, a shift the result does not depend on:
    # equal scores give d = 0, hence A = 0 exactly, where s - mean would not (the mean of
    # 64 scores of 0.7 rounds in fp32, and 6e-8 / (std 6e-8 + eps) is 0.06). d's mean
    # errs relative to the group's spread, not to its magnitude.
    d = s - s[:, :1]
    mean = d.mean(dim=1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(s).reshape(-1) * d.reshape(-1)  # NaN stays NaN
    if opt.scale == "std":
        divisor = d.std(dim=1, keepdim=True) + opt.eps
    elif opt.scale == "batch":
        divisor = scores.to(dtype).std() + opt.eps if scores.numel() > 1 else opt.eps
    else:
        divisor = 1.0
    if opt.estimator == "rloo":
        adv = (d - mean) * (group_size / (group_size - 1))
    elif opt.estimator == "opo":
        w = lengths.to(dtype).reshape(-1, group_size)
        total = w.sum(1, keepdim=True)
        baseline = torch.where(total > 0, (w * d).sum(1, keepdim=True) / total.clamp(
            min=torch.finfo(dtype).tiny), mean)
        adv = d - baseline
    elif opt.estimator == "grpo_passk":
        top = d.topk(2, dim=1).values
        best = torch.where(d == top[:, :1], (top[:, :1] - top[:, 1:]) / divisor, 0.0)
        adv = torch.where(d.isnan().any(1, keepdim=True), math.nan, best)
    elif opt.estimator == "gpg":
        alpha = scores.numel() / torch.count_nonzero(scores).clamp(min=1).to(dtype)
        adv = (d - mean) * alpha
    elif opt.estimator == "reinforce_plus_plus_baseline":
        adv = d - mean
    else:
        adv = (d - mean) / divisor
    return adv.reshape(-1)


@OPTIMAL_TOKEN_BASELINE_OPTIONS.keywords
def optimal_token_baseline(
    rewards: Tensor, mask: Tensor, old_logp: Tensor, log_sum_p2: Tensor, group_size: int, *,
    rollout_is_weights: Tensor | None = None, **options: Any,
) -> tuple[Tensor, Tensor]:
    """verl's optimal token baseline (OTB): each token's return against a baseline per
    position, the group's returns weighted by their path variance so far.

    Per answer i of a group (`group_size` consecutive rows), position t, valid tokens m:

        G_t = sum_{j >= t} m_j r_j                         the return (no discount)
        w_t = 1 - 2 pi_t + sum_k pi_k^2  (* rho_t^2)       ||e_y - pi||^2, the score norm
        W_t = sum_{j <= t} m_j w_j                         the path variance so far
        B_t = sum_i m G W / (sum_i m W + eps)              over the group, per position
        A_t = m_t (G_t - B_t)

    with pi_t = exp(old_logp), sum_k pi_k^2 = exp(log_sum_p2) (`logprobs(...,
    return_sum_p2=True)`) and rho the rollout's truncated IS weights when given (verl
    scales w by rho^2). A group of one has B = 0. handle_zero_tail: B = 0 on the
    positions >= the second-longest length (lengths: valid-token counts; right padding
    assumed, as verl) of a group's one strictly longest answer.

    Args:
        rewards, old_logp, log_sum_p2: ``[B, T]`` float; rollout_is_weights ``[B, T]``.
        mask: ``[B, T]``, nonzero = valid; masked entries are never read.
        group_size: rows per prompt, dividing B.

    Returns:
        ``(advantages, returns)`` ``[B, T]`` fp32 (fp64 if any input is fp64), 0 at masked
        positions (verl leaves returns there as the sum of the later rewards).
    """
    opt = OPTIMAL_TOKEN_BASELINE_OPTIONS.fill(options)
    inputs = [rewards, old_logp, log_sum_p2] + (
        [] if rollout_is_weights is None else [rollout_is_weights])
    dtype = compute_dtype(functools.reduce(torch.promote_types, [t.dtype for t in inputs]))
    valid = mask != 0

    def read(t: Tensor) -> Tensor:
        t = t.to(dtype)
        return torch.where(valid, t, torch.zeros_like(t))

    r = read(rewards)
    returns = r.flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * read(old_logp).exp() + read(log_sum_p2).exp()
    if rollout_is_weights is not None:
        w = w * read(rollout_is_weights) ** 2
    path = torch.where(valid, w, torch.zeros_like(w)).cumsum(-1)
    B, T = r.shape
    n = group_size
    g_valid = valid.view(-1, n, T)
    g_returns, g_path = returns.view(-1, n, T), path.view(-1, n, T)
    zero = torch.zeros_like(g_path)
    numerator = torch.where(g_valid, g_returns * g_path, zero).sum(1, keepdim=True)
    denominator = torch.where(g_valid, g_path, zero).sum(1, keepdim=True) + opt.eps
    baseline = (numerator / denominator).expand(-1, n, -1)
    if n == 1:
        baseline = torch.zeros_like(baseline)
    if opt.handle_zero_tail and n > 1:
        lengths = g_valid.sum(-1)  # [groups, n]
        top2 = lengths.topk(2, dim=-1).values
        longest = (lengths == top2[:, :1]) & (top2[:, :1] > top2[:, 1:])
        tail = torch.arange(T, device=r.device) >= top2[:, 1:2, None]
        baseline = torch.where(longest[..., None] & tail, torch.zeros_like(baseline), baseline)
    advantages = torch.where(valid, returns - baseline.reshape(B, T), torch.zeros_like(r))
    return advantages, torch.where(valid, returns, torch.zeros_like(r))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries of `x` where `mask` (same shape, nonzero = valid) is set, over
    the whole tensor (dim=None) or along `dim`; NaN where there is no valid entry. fp32
    (fp64 for fp64 x)."""
    valid = mask != 0
    xs = x.to(compute_dtype(x.dtype))
    # where(), not x * mask: a NaN under the mask must not leak (in value or gradient).
    xs = torch.where(valid, xs, torch.zeros_like(xs))
    if dim is None:
        return xs.sum() / valid.sum()
    return xs.sum(dim) / valid.sum(dim)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid entries of the whole tensor, with the
    unbiased (n - 1) variance, as TRL's masked_whiten; a single valid entry has variance 0.
    shift_mean=False adds the mean back. fp32 (fp64 for fp64 x), 0 where masked. Equal
    valid entries give exactly 0 (their own value with shift_mean=False)."""
    valid = mask != 0
    xs = x.to(compute_dtype(x.dtype))
    xs = torch.where(valid, xs, torch.zeros_like(xs))
    selected = xs[valid]
    n = selected.numel()
    # Deviations from the first valid entry (a constant: the result does not depend on
    # it), as in group_advantages: equal entries give deviations, hence outputs, of
    # exactly 0, where x - mean would not (the mean rounds).
    shift = selected[:1].detach().sum()  # 0 without valid entries
    mean_d = (selected - shift).sum() / n
    mean = shift + mean_d
    dev = (selected - shift) - mean_d
    # 1 / sqrt(var + eps) with both terms divided by big^2 first, big a constant >= every
    # |dev| and sqrt(eps): squared deviations past ~1e19 would overflow fp32.
    root_eps = torch.tensor(math.sqrt(eps), dtype=xs.dtype, device=xs.device)
    big = torch.cat((dev.detach().abs(), root_eps.view(1))).amax()
    var_over_big2 = ((dev / big) ** 2).sum() / max(n - 1, 1)
    out = ((xs - shift) - mean_d) / (big * torch.sqrt(var_over_big2 + (root_eps / big) ** 2))
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, torch.zeros_like(out))
