"""The constant per-token weights and masks of the policy-gradient term (`policy_weights`):
verl's rollout correction (importance weights, truncated or masked, and rejection sampling
against a rollout engine's log-probs), TRL's top-entropy and off-policy masks, Clip-Cov's
random draw, and KL-Cov's coefficients; the tokens chosen by covariance or quantile,
without a host sync."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlhf_fast.options import rollout_is_bounds, rollout_rs_bounds

ROLLOUT_STATISTICS = ("rollout_is_mean", "rollout_is_max", "rollout_rs_masked_fraction",
                      "rollout_kl", "rollout_k3_kl", "rollout_is_masked_fraction")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def row_reduce(x: Tensor, mask: Tensor, how: str) -> Tensor:
    """[B, 1]: each row's sum, mean or max of x over its valid tokens (0 for none)."""
    if how == "max":
        top = torch.where(mask, x, -math.inf).amax(-1, keepdim=True)
        return torch.where(mask.any(-1, keepdim=True), top, 0.0)
    total = torch.where(mask, x, 0.0).sum(-1, keepdim=True)
    return total if how == "sum" else total / mask.sum(-1, keepdim=True).clamp(min=1)


def rollout_correction(
    policy_logp: Tensor, rollout_logp: Tensor, mask: Tensor, opt: Any
) -> tuple[Tensor | None, Tensor, dict[str, Tensor]]:
    """verl's rollout correction (`rollout_corr_helper.py`) of a batch sampled by a rollout
    engine: the IS weights of the policy term and the mask rejection sampling leaves.

    `policy_logp` is pi_old's log-prob (pi_theta's, detached, in bypass_mode) and
    `rollout_logp` the engine's, ``[B, T]`` constants, `mask` bool; `opt` the options. With
    x = policy_logp - rollout_logp, clamped to [-20, 20] before any exp:

    * rollout_is "token": w = exp(x); "sequence": w = exp(sum of x over the row), one per
      row. rollout_is_threshold (`rollout_is_bounds`) a number u: w truncated at u
      (TIS, verl's); "lower_upper": w set to 0 outside [lower, upper] (masked IS, IcePop;
      TRL's token_mask / sequence_mask, whose clip_min / clip_max are lower / upper; the
      bounds themselves are inside), a whole row's for "sequence"; those tokens stay in
      the mask, so they still count in the aggregation's denominators (rejection
      sampling, below, removes them). TRL does not clamp the sequence's sum: the same
      weights unless a bound lies beyond e^20. Then
      (rollout_is_batch_normalize) w is divided by its mean over the valid tokens of
      this call (over its non-empty rows for "sequence"; verl averages over every
      data-parallel rank) when that mean is above 1e-8.
    * rollout_rs, each criterion on k1 = -x, k2 = x^2 / 2 or k3 = e^x - 1 - x: token_kN
      drops the tokens, seq_sum / seq_mean / seq_max_kN the rows whose statistic leaves
      the bounds: [log lower, log upper] for k1 (so the bounds are on pi_rollout /
      pi_old), at most upper for k2 and k3. A token stays only if every criterion keeps it.

    Returns (weights or None, the kept mask, the statistics `ROLLOUT_STATISTICS` over
    `mask`: rollout_is_mean / rollout_is_max of w before truncation or masking, the share
    of valid tokens rejected, the k1 and k3 estimates of KL(pi_rollout || pi_old), and
    the share of valid tokens whose w the masked IS set to 0).
    """
    x = torch.where(mask, policy_logp - rollout_logp, 0.0)
    safe = x.clamp(-20.0, 20.0)
    weights, raw = None, torch.zeros_like(x)
    is_masked = torch.zeros_like(mask)
    if opt.rollout_is is not None:
        level = safe if opt.rollout_is == "token" else row_reduce(x, mask, "sum").clamp(-20, 20)
        raw = torch.exp(level).expand_as(x) * mask
        lower, upper = rollout_is_bounds(opt.rollout_is_threshold)
        if lower is None:
            weights = raw.clamp(max=upper)
        else:  # (a NaN weight is neither inside nor outside: it stays NaN, as clamp keeps it)
            is_masked = mask & ((raw < lower) | (raw > upper))
            weights = torch.where(is_masked, 0.0, raw)
        if opt.rollout_is_batch_normalize:
            if opt.rollout_is == "token":
                mean = _masked_mean(weights, mask)
            else:
                rows = mask.any(-1)
                mean = (row_reduce(weights, mask, "mean")[:, 0] * rows).sum() / rows.sum().clamp(
                    min=1)
            weights = torch.where(mean > 1e-8, weights / mean, weights)
    kept = mask.clone()
    if opt.rollout_rs is not None:
        divergence = {"k1": -safe, "k2": 0.5 * safe**2, "k3": torch.exp(safe) - 1 - safe}
        for mode, lower, upper in rollout_rs_bounds(opt.rollout_rs, opt.rollout_rs_threshold):
            level, stat = mode.rsplit("_", 1)
            value = divergence[stat]
            if level != "token":
                value = row_reduce(value, mask, level.split("_")[1])
            if lower is None:
                keep = value <= upper
            else:
                keep = (value >= math.log(lower)) & (value <= math.log(upper))
            kept = kept & keep
    n_valid = mask.sum().clamp(min=1)
    statistics = {
        "rollout_is_mean": _masked_mean(raw, mask),
        "rollout_is_max": torch.where(mask, raw, 0.0).amax() if raw.numel() else raw.sum(),
        "rollout_rs_masked_fraction": (mask & ~kept).sum().to(x.dtype) / n_valid,
        "rollout_kl": _masked_mean(-x, mask),
        "rollout_k3_kl": _masked_mean(torch.exp(x) - x - 1, mask),
        "rollout_is_masked_fraction": is_masked.sum().to(x.dtype) / n_valid,
    }
    return weights, kept, statistics


def _covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Each valid token's (A - mean A)(logp - mean logp) over the valid tokens, -inf
    elsewhere: Clip-Cov's and KL-Cov's selection statistic."""
    n = mask.sum().clamp(min=1)
    mean_a = torch.where(mask, advantages, 0.0).sum() / n
    mean_logp = torch.where(mask, logp, 0.0).sum() / n
    return torch.where(mask, (advantages - mean_a) * (logp - mean_logp), -math.inf)


def _clip_cov_kept(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   opt: Any) -> Tensor:
    """Clip-Cov's draw: max(1, clip_cov_ratio n) tokens (n valid), uniformly at random among
    the unclipped valid ones whose covariance lies in (clip_cov_lb, clip_cov_ub) (all of
    them if fewer), 0 in the returned mask. Drawn as the smallest random keys, without a
    host sync (no data-sized index list)."""
    eps_high = opt.clip_eps if opt.clip_eps_high is None else opt.clip_eps_high
    ratio = torch.exp(logp - old_logp)
    clipped = -advantages * torch.clamp(ratio, 1 - opt.clip_eps, 1 + eps_high) > \
        -advantages * ratio
    cov = torch.where(clipped, -math.inf, _covariance(logp, advantages, mask))
    candidates = (cov > opt.clip_cov_lb) & (cov < opt.clip_cov_ub) & mask
    count = _fraction_of_valid(mask, opt.clip_cov_ratio)
    keys = torch.where(candidates, torch.rand(mask.shape, device=mask.device), 2.0)
    return ~(candidates & (_ranks(keys.flatten(), descending=False).view(mask.shape) < count))


def _fraction_of_valid(mask: Tensor, ratio: float) -> Tensor:
    """max(1, floor(ratio n)) for the n valid tokens, a 0-d tensor (no host sync)."""
    return torch.floor(mask.sum().double() * ratio).clamp(min=1)


def _ranks(values: Tensor, descending: bool) -> Tensor:
    """Each element's position in `values` sorted (stable: ties in index order)."""
    order = values.argsort(descending=descending, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def kl_cov_coefficients(logp: Tensor, advantages: Tensor, mask: Tensor, opt: Any) -> Tensor:
    """kl_cov's weight of |log r| per token, ``[B, T]``: ppo_kl_coef at the
    max(1, kl_cov_ratio n) valid tokens of largest covariance (n valid; ties to the first
    in index order), 0 elsewhere; chosen by rank, without a host sync."""
    ranks = _ranks(_covariance(logp, advantages, mask).flatten(), descending=True)
    top = (ranks.view(mask.shape) < _fraction_of_valid(mask, opt.kl_cov_ratio)) & mask
    return torch.where(top, opt.ppo_kl_coef, 0.0).to(logp.dtype)


def _masked_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """torch.quantile (linear interpolation) of x's valid entries, without gathering them
    (no host sync): the valid ones sorted first, the two neighbours of rank q (n - 1)
    interpolated with torch.lerp, as torch.quantile does. +inf for no valid entry, NaN
    for a valid NaN (as torch.quantile)."""
    ordered = torch.where(mask, x, math.inf).flatten().sort().values
    position = q * (mask.sum().to(x.dtype) - 1).clamp(min=0)
    below = position.floor()
    neighbours = ordered.gather(0, torch.stack([below, position.ceil()]).long())
    quantile = torch.lerp(neighbours[0], neighbours[1], position - below)
    return torch.where((mask & x.isnan()).any(), math.nan, quantile)


def policy_weights(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, entropy: Tensor | None,
    rollout_logp: Tensor | None, mask: Tensor, opt: Any,
) -> tuple[Tensor | None, Tensor, dict[str, Tensor]]:
    """The constant weight of each token's policy term, or None for 1, the mask of every
    term, and the rollout statistics: `rollout_correction`'s weights and mask (when
    there is a rollout to correct for), times TRL's masks of the policy term:

    * top_entropy_quantile q < 1: 0 below the (1 - q) quantile of the valid tokens'
      entropies (TRL's get_high_entropy_mask, over this call's tokens where TRL gathers
      every process's);
    * clip_cov: 0 at the tokens it draws (`policy_terms`);
    * off_policy_mask_threshold d: 0 at tokens with A < 0 of rows whose mean of
      log pi_sampling - logp over the valid tokens exceeds d (TRL's get_off_policy_mask;
      pi_sampling is rollout_logp, else old_logp).

    All inputs ``[B, T]`` constants (`logp` detached), `mask` bool.
    """
    statistics = dict.fromkeys(ROLLOUT_STATISTICS, torch.zeros((), dtype=logp.dtype,
                                                               device=logp.device))
    weights = None
    if opt.policy_loss == "bypass_mode" or rollout_logp is not None:
        policy, rollout = (logp, old_logp) if rollout_logp is None else (old_logp, rollout_logp)
        weights, mask, statistics = rollout_correction(policy, rollout, mask, opt)
    keep = None
    if opt.top_entropy_quantile < 1:
        if entropy is None:
            raise ValueError("entropy is required when top_entropy_quantile < 1")
        values = entropy.to(logp.dtype)
        keep = values >= _masked_quantile(values, mask, 1 - opt.top_entropy_quantile)
    if opt.off_policy_mask_threshold is not None:
        sampling = old_logp if rollout_logp is None else rollout_logp
        drift = row_reduce(sampling - logp, mask, "mean")
        row_keep = (advantages >= 0) | (drift <= opt.off_policy_mask_threshold)
        keep = row_keep if keep is None else keep & row_keep
    if opt.policy_loss == "clip_cov":
        kept = _clip_cov_kept(logp, old_logp, advantages, mask, opt)
        keep = kept if keep is None else keep & kept
    if keep is not None:
        weights = keep.to(logp.dtype) if weights is None else weights * keep
    return weights, mask, statistics

