"""The policy-gradient loss: its KL estimators, aggregations and terms."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlhf_fast.options import PPO_OPTIONS
from rlhf_fast.reference.common import compute_dtype
from rlhf_fast.types import PPOLossOutput


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with verl's names
    (Schulman, "Approximating KL divergence", 2020; x = ref_logp - logp):

        k1 = -x   k2 = x^2 / 2   k3 = e^x - x - 1 (unbiased, >= 0)   abs = |x|
        low_var_kl = min(k3 of clamp(x, -20, 20), 10)

    k3 is Schulman's, unclamped (as TRL's); verl computes "k3" as low_var_kl, clamped for
    numerical safety (its gradient is 0 where a clamp holds). A trailing "+" (k1+, k3+,
    abs+, low_var_kl+, as verl's kl_penalty) is straight through: the estimator's value
    with the gradient of k2, d/d logp = logp - ref_logp, whose expectation is the
    gradient of the KL where k1's and k3's are not."""
    if estimator.endswith("+"):
        k2 = kl_penalty(logp, ref_logp, "k2")
        return k2 - k2.detach() + kl_penalty(logp, ref_logp, estimator[:-1]).detach()
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "abs":
        return (logp - ref_logp).abs()
    log_r = ref_logp - logp  # k3: r - log r - 1 with r = pi_ref / pi, unbiased and >= 0
    if estimator == "low_var_kl":  # clamps as where: NaN stays NaN (torch.clamp's
        # gradient at NaN differs between torch versions)
        log_r = torch.where(log_r > 20, 20.0, torch.where(log_r < -20, -20.0, log_r))
        k3 = torch.exp(log_r) - log_r - 1
        return torch.where(k3 > 10, 10.0, k3)
    return torch.exp(log_r) - log_r - 1


def aggregate(
    token_values: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int
) -> torch.Tensor:
    """Reduce per-token values [B, T] over the valid tokens to a scalar.

    token-mean: sum / number of valid tokens. seq-mean-token-mean: each sequence's mean,
    averaged over sequences with at least one valid token. seq-mean-token-sum: each
    sequence's sum, averaged over those sequences. seq-mean-token-sum-norm: sum / (B *
    max_len), a constant divisor (Dr. GRPO). No valid token at all gives 0.
    """
    m = mask.to(token_values.dtype)
    row_sums = (token_values * m).sum(-1)
    row_counts = m.sum(-1)
    n_seqs = (row_counts > 0).sum().clamp(min=1)
    if agg == "token-mean":
        return row_sums.sum() / row_counts.sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return (row_sums / row_counts.clamp(min=1)).sum() / n_seqs
    if agg == "seq-mean-token-sum":
        return row_sums.sum() / n_seqs
    # float: B * max_len may pass int64 (a tensor divided by such an int overflows)
    return row_sums.sum() / float(max(mask.shape[0] * max_len, 1))  # B or T = 0: 0


@PPO_OPTIONS.keywords
def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
             ref_logp: Tensor | None = None, entropy: Tensor | None = None,
             values: Tensor | None = None, old_values: Tensor | None = None,
             returns: Tensor | None = None, **options: Any) -> PPOLossOutput:
    """PPO clipped surrogate + KL to a reference + entropy bonus + clipped value loss.

    All tensors ``[B, T]``; mask is bool or numeric, nonzero = valid. Gradients flow into
    `logp`, `entropy` and `values`; the other inputs are constants.
    """
    opt = PPO_OPTIONS.fill(options)
    dtype = compute_dtype(logp.dtype)
    valid = mask != 0
    max_len = logp.shape[-1] if opt.max_len is None else opt.max_len
    eps_low = opt.clip_eps
    eps_high = eps_low if opt.clip_eps_high is None else opt.clip_eps_high

    # Masked-out tokens may hold anything, inf and NaN included: replace them by 0 first,
    # so that neither a value nor a gradient of theirs reaches the result.
    def valid_only(x: torch.Tensor | None, grad: bool = False) -> torch.Tensor | None:
        if x is None:
            return None
        x = x.to(dtype) if grad else x.detach().to(dtype)
        return torch.where(valid, x, torch.zeros_like(x))

    logp, entropy, values = (valid_only(x, grad=True) for x in (logp, entropy, values))
    old_logp, advantages, ref_logp, old_values, returns = (
        valid_only(x) for x in (old_logp, advantages, ref_logp, old_values, returns)
    )
    zero = torch.zeros_like(logp)

    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    # max(unclipped, clipped), written as a choice so that a tie takes the unclipped
    # branch's gradient, whole (torch.maximum would split it in halves).
    pg = torch.where(pg_clipped > pg_unclipped, pg_clipped, pg_unclipped)
    if opt.dual_clip is not None:  # bound the loss of negative advantages at -A * c
        dual_bound = -advantages * opt.dual_clip
        pg = torch.where((advantages < 0) & (pg > dual_bound), dual_bound, pg)

    kl = zero if ref_logp is None else kl_penalty(logp, ref_logp, opt.kl_estimator)
    ent = zero if entropy is None else entropy

    vl, value_clipped = zero, torch.zeros_like(valid)
    if values is not None:
        # = old_values + clamp(values - old_values, -value_clip, value_clip), without rounding
        v_clipped = torch.clamp(values, old_values - opt.value_clip, old_values + opt.value_clip)
        # A NaN old value makes the clipped value NaN, and its gradient too: spelled out,
        # since torch.clamp's gradient at NaN bounds changed (0 in torch 2.13, 1 in 2.14).
        v_clipped = torch.where(old_values.isnan(), values + old_values, v_clipped)
        vl_unclipped, vl_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
        value_clipped = vl_clipped > vl_unclipped
        # A NaN old value makes the clipped branch alone NaN: it wins, as in torch.maximum.
        only_clipped_nan = vl_clipped.isnan() & ~vl_unclipped.isnan()
        vl = 0.5 * torch.where(value_clipped | only_clipped_nan, vl_clipped, vl_unclipped)

    policy_loss = aggregate(pg, valid, opt.agg, max_len)
    kl_term = aggregate(kl, valid, opt.agg, max_len)
    entropy_term = aggregate(ent, valid, opt.agg, max_len)
    value_loss = aggregate(vl, valid, opt.agg, max_len)
    loss = (policy_loss + opt.kl_coef * kl_term - opt.entropy_coef * entropy_term
            + opt.vf_coef * value_loss)

    with torch.no_grad():
        n_valid = valid.sum().clamp(min=1)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x.to(dtype), torch.zeros_like(zero)).sum() / n_valid

        clipfrac = token_mean(pg_clipped > pg_unclipped)
        approx_kl = 0.5 * token_mean(log_ratio**2)
        ratio_mean = token_mean(ratio)
        # ratios are > 0, so masked zeros never win the max; no valid token gives 0
        ratio_max = torch.where(valid, ratio, zero).amax() if ratio.numel() else zero.sum()
        value_clipfrac = token_mean(value_clipped)
    return PPOLossOutput(
        loss, policy_loss, value_loss, kl_term, entropy_term,
        clipfrac, approx_kl, ratio_mean, ratio_max, value_clipfrac,
    )
