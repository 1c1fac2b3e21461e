"""The policy-gradient loss: its KL estimators, aggregations and terms (the constant
weights and masks of its policy term: `policy_masks`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlhf_fast.options import PPO_OPTIONS
from rlhf_fast.reference.common import compute_dtype
from rlhf_fast.reference.policy_masks import (
    ROLLOUT_STATISTICS,
    kl_cov_coefficients,
    policy_weights,
    row_reduce,
)
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
    token_values: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int,
    batch_num_tokens: int | None = None, global_batch_size: int | None = None,
    dp_size: int = 1,
) -> torch.Tensor:
    """Reduce per-token values [B, T] over the valid tokens to a scalar.

    token-mean: sum / number of valid tokens. seq-mean-token-mean: each sequence's mean,
    averaged over sequences with at least one valid token. seq-mean-token-sum: each
    sequence's sum, averaged over those sequences. seq-mean-token-sum-norm: sum / (B *
    max_len), a constant divisor (Dr. GRPO). token-sum: the sum. No valid token at all
    gives 0. The global counts, when given, replace the batch's (`batch_num_tokens` the
    valid tokens, `global_batch_size` the sequences), and the result is multiplied by
    `dp_size` (verl's `agg_loss`): the mean over dp_size ranks of such losses is the
    loss of their whole batch.
    """
    m = mask.to(token_values.dtype)
    row_sums = (token_values * m).sum(-1)
    row_counts = m.sum(-1)
    if global_batch_size is None:
        n_seqs = (row_counts > 0).sum().clamp(min=1)
    else:
        n_seqs = float(global_batch_size)
    if agg == "token-mean":
        tokens = row_counts.sum().clamp(min=1) if batch_num_tokens is None else float(
            batch_num_tokens)
        total = row_sums.sum() / tokens
    elif agg == "seq-mean-token-mean":
        total = (row_sums / row_counts.clamp(min=1)).sum() / n_seqs
    elif agg == "seq-mean-token-sum":
        total = row_sums.sum() / n_seqs
    elif agg == "token-sum":
        total = row_sums.sum()
    else:
        # float: B * max_len may pass int64 (a tensor divided by such an int overflows)
        rows = mask.shape[0] if global_batch_size is None else global_batch_size
        total = row_sums.sum() / float(max(rows * max_len, 1))  # B or T = 0: 0
    return total * dp_size


def _below(x: Tensor, bound: float) -> Tensor:
    """min(x, bound) as a choice: NaN stays NaN, and the gradient is 1 up to the bound."""
    return torch.where(x > bound, bound, x)


def _above(x: Tensor, bound: float) -> Tensor:
    return torch.where(x < bound, bound, x)


def policy_terms(logp: Tensor, old_logp: Tensor, advantages: Tensor, valid: Tensor,
                 opt: Any, kl_cov_coef: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The policy-gradient term of each token, ``[B, T]``, and which bound changed it.

    `logp` differentiable, the others constants, all 0 at masked tokens; `opt` the
    options (`PPO_OPTIONS`). Returns (pg, low, high, dual): pg the loss of each token
    before aggregation, low / high (bool) the tokens clipped at the lower / upper bound
    (the ratio's side), dual those bounded by dual_clip or clip_ratio_c. With
    r = exp(logp - old_logp), A the advantage, [l, h] = [1 - clip_eps, 1 + clip_eps_high],
    sg a stop-gradient, per policy_loss (verl's `compute_policy_loss_<name>`):

    vanilla (PPO, Schulman 2017; dual clip, Ye 2020; clip-higher, DAPO):
        pg = max(-A r, -A clip(r, l, h)), and with dual_clip c, for A < 0: min(pg, -A c).
        verl clamps log r to [-20, 20] before exp, a guard this formula does not need
        within it (|log r| > 20 is a ratio past 5e8: clipped for A > 0, and for A < 0
        bounded by dual_clip); here r is exp(log r) as written, so the two differ only
        beyond that, where verl's gradient is 0 and ours is the formula's.
    cispo (MiniMax-M1, 2506.13585): pg = -sg(clip(r, l, h)) A logp, as the paper and verl
        write it. TRL caps r at its epsilon_high itself (ScaleRL's eps_max, 5 advised) and
        has no lower bound: TRL's epsilon_high = e is clip_eps_high = e - 1 here, with
        clip_eps close to 1.
    sapo (2511.20347): pg = -A (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos for A > 0
        and tau_neg otherwise; the log-ratio is clamped to [-20, 20] first (verl, TRL).
    gpg (2504.02546): pg = -A logp.
    bypass_mode: verl's bypass mode with loss_type="reinforce": pg = -A logp, weighted by
        the rollout correction's IS weights of pi_theta against old_logp, which is the
        rollout's (`rollout_correction`). verl's loss_type="ppo_clip" is vanilla with
        old_logp the rollout's.
    dppo_tv, dppo_kl (2602.04879): pg = -A sg(min(r, clip_ratio_c)) logp on the tokens
        whose divergence is within bounds, 0 on the others: with p = exp(logp), a token
        with A > 0 is dropped when its probability rose too far (tv: p - p_old >
        clip_eps_high; kl: the binary KL p_old log(p_old / p) + (1 - p_old)
        log((1 - p_old + 1e-8) / (1 - p + 1e-8)) > clip_eps_high with p > p_old), with
        A <= 0 when it fell too far (clip_eps). verl writes the kept set (<=), which
        keeps a NaN token out of the loss; here it is the dropped set, so NaN reaches it.
    gspo (2507.18071): s = exp(min(m, 10)) with m the row's mean log-ratio, one ratio per
        sequence (a function of every token's logp, as TRL's importance_sampling_level=
        "sequence"); pg = max(-A s, -A clip(s, l, h)) at each token.
    gspo_token: the same value with s_t = sg(s) r / sg(r) (the paper's GSPO-token, verl's
        "gspo", TRL's "sequence_token"): each token's gradient is its own. The two agree
        when A is constant along each sequence.
    clip_cov, kl_cov (2505.22617, verl's from PRIME-RL's code): with each valid token's
        covariance (A - mean A)(logp - mean logp) over the call's valid tokens, clip_cov
        is vanilla (no dual clip) with the policy gradient of max(1, clip_cov_ratio n)
        tokens dropped, drawn at random (torch's global generator, as verl) among the
        unclipped ones of covariance in (clip_cov_lb, clip_cov_ub): `policy_weights`;
        kl_cov is the unclipped -A r plus ppo_kl_coef |log r| at the max(1, kl_cov_ratio
        n) tokens of largest covariance (`kl_cov_coefficients`). Both read the count n
        on the host (a device sync, as verl's).
    dro (Direct Reward Optimization, verl's "dro"): pg = -(A logp - dro_beta (logp -
        old_logp)^2 / 2), REINFORCE with a quadratic pull towards pi_old.
    geo_mean (GMPO, 2507.20673): pg = -A exp(m) with m the row's mean of the log-ratio
        clipped on the advantage's side (at clip_eps_high for A > 0, at -clip_eps for
        A < 0; 0 for A = 0, as verl's sign(A) makes it). verl averages -mean(A) exp(m)
        over every row, empty ones included, whatever its agg; here it is a token term
        like the others: seq-mean-token-mean gives verl's value on batches without empty
        rows.

    verl and TRL aggregate gspo and sapo with seq-mean-token-mean whatever the mode
    asked; here `agg` is honoured: pass agg="seq-mean-token-mean" to match them.
    """
    name = opt.policy_loss
    eps_low = opt.clip_eps
    eps_high = eps_low if opt.clip_eps_high is None else opt.clip_eps_high
    low_bound, high_bound = 1 - eps_low, 1 + eps_high
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    none = torch.zeros_like(valid)
    dual = none
    if name == "kl_cov":
        pg = -advantages * ratio + kl_cov_coef * log_ratio.abs()
        low, high = none, none
    elif name in ("vanilla", "gspo", "gspo_token", "clip_cov"):
        if name in ("vanilla", "clip_cov"):
            r = ratio
        else:
            m = row_reduce(log_ratio, valid, "mean")
            log_s = logp - logp.detach() + m.detach() if name == "gspo_token" else m
            r = torch.exp(_below(log_s, 10.0)).expand_as(logp)
        pg_unclipped = -advantages * r
        pg_clipped = -advantages * torch.clamp(r, low_bound, high_bound)
        # max(unclipped, clipped), written as a choice so that a tie takes the unclipped
        # branch's gradient, whole (torch.maximum would split it in halves).
        clipped = pg_clipped > pg_unclipped
        pg = torch.where(clipped, pg_clipped, pg_unclipped)
        low, high = clipped & (r < 1), clipped & (r > 1)
        if opt.dual_clip is not None:  # bound the loss of negative advantages at -A * c
            dual_bound = -advantages * opt.dual_clip
            dual = (advantages < 0) & (pg > dual_bound)
            pg = torch.where(dual, dual_bound, pg)
    elif name == "cispo":
        weight = _above(_below(ratio, high_bound), low_bound).detach()
        pg = -weight * advantages * logp
        low, high = ratio < low_bound, ratio > high_bound
    elif name == "sapo":
        tau = torch.where(advantages > 0, torch.full_like(advantages, opt.tau_pos), opt.tau_neg)
        r = torch.exp(_above(_below(log_ratio, 20.0), -20.0))
        pg = -advantages * torch.sigmoid(tau * (r - 1)) * (4 / tau)
        low, high = none, none
    elif name == "dro":
        pg = -(advantages * logp - 0.5 * opt.dro_beta * log_ratio**2)
        low, high = none, none
    elif name in ("gpg", "bypass_mode"):
        pg = -advantages * logp
        low, high = none, none
    elif name in ("dppo_tv", "dppo_kl"):
        p, p_old = torch.exp(logp.detach()), torch.exp(old_logp)
        if name == "dppo_tv":
            too_high, too_low = p - p_old > eps_high, p - p_old < -eps_low
        else:
            binary_kl = p_old * (old_logp - logp.detach()) + (1 - p_old) * torch.log(
                (1 - p_old + 1e-8) / (1 - p + 1e-8))
            too_high = (binary_kl > eps_high) & (p > p_old)
            too_low = (binary_kl > eps_low) & (p < p_old)
        dropped = torch.where(advantages > 0, too_high, too_low)
        capped = _below(ratio, opt.clip_ratio_c).detach()
        pg = -advantages * capped * logp * (~dropped).to(logp.dtype)
        low, high = dropped & (advantages <= 0), dropped & (advantages > 0)
        dual = ~dropped & (ratio > opt.clip_ratio_c)
    elif name == "geo_mean":
        clipped_log_ratio = torch.where(
            advantages > 0, _below(log_ratio, eps_high),
            torch.where(advantages < 0, _above(log_ratio, -eps_low), 0.0))
        pg = -advantages * torch.exp(row_reduce(clipped_log_ratio, valid, "mean"))
        low = (advantages < 0) & (log_ratio < -eps_low)
        high = (advantages > 0) & (log_ratio > eps_high)
    else:
        raise ValueError(f"unknown policy_loss {name!r}")
    return pg, low & valid, high & valid, dual & valid


@PPO_OPTIONS.keywords
def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
             ref_logp: Tensor | None = None, entropy: Tensor | None = None,
             values: Tensor | None = None, old_values: Tensor | None = None,
             returns: Tensor | None = None, rollout_logp: Tensor | None = None,
             **options: Any) -> PPOLossOutput:
    """PPO's objective: a policy-gradient term (`policy_terms`: clipped ratio and the
    2026 family) + KL to a reference + entropy bonus + clipped value loss.

    All tensors ``[B, T]``; mask is bool or numeric, nonzero = valid. Gradients flow into
    `logp`, `entropy` and `values`; the other inputs are constants. `rollout_logp`, the
    rollout engine's log-probs, with rollout_is / rollout_rs: `rollout_correction`.
    """
    opt = PPO_OPTIONS.fill(options)
    dtype = compute_dtype(logp.dtype)
    valid = mask != 0
    max_len = logp.shape[-1] if opt.max_len is None else opt.max_len

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

    is_weights, valid, statistics = policy_weights(
        logp.detach(), old_logp, advantages, None if entropy is None else entropy.detach(),
        None if rollout_logp is None else valid_only(rollout_logp), valid, opt)
    kl_cov_coef = None
    if opt.policy_loss == "kl_cov":
        kl_cov_coef = kl_cov_coefficients(logp.detach(), advantages, valid, opt)
    pg, clipped_low, clipped_high, dual_clipped = policy_terms(
        logp, old_logp, advantages, valid, opt, kl_cov_coef)
    if is_weights is not None:
        pg = pg * is_weights
    log_ratio = (logp - old_logp).detach()
    ratio = torch.exp(log_ratio)
    kl = zero if ref_logp is None else kl_penalty(logp, ref_logp, opt.kl_estimator)
    if opt.use_bias_correction_kl:
        kl = kl * torch.exp(logp - old_logp)
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

    def agg(x: Tensor) -> Tensor:
        return aggregate(x, valid, opt.agg, max_len, opt.batch_num_tokens,
                         opt.global_batch_size, opt.dp_size)

    policy_loss, kl_term, entropy_term, value_loss = agg(pg), agg(kl), agg(ent), agg(vl)
    loss = (policy_loss + opt.kl_coef * kl_term - opt.entropy_coef * entropy_term
            + opt.vf_coef * value_loss)

    with torch.no_grad():
        n_valid = valid.sum().clamp(min=1)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x.to(dtype), torch.zeros_like(zero)).sum() / n_valid

        clipfrac = token_mean(clipped_low | clipped_high)
        clipfrac_low, clipfrac_high = token_mean(clipped_low), token_mean(clipped_high)
        approx_kl = 0.5 * token_mean(log_ratio**2)
        ratio_mean = token_mean(ratio)
        # ratios are > 0, so masked zeros never win the max; no valid token gives 0
        ratio_max = torch.where(valid, ratio, zero).amax() if ratio.numel() else zero.sum()
        value_clipfrac = token_mean(value_clipped)
    return PPOLossOutput(
        loss, policy_loss, value_loss, kl_term, entropy_term,
        clipfrac, approx_kl, ratio_mean, ratio_max, value_clipfrac,
        clipfrac_low, clipfrac_high, token_mean(dual_clipped),
        *(statistics[name] for name in ROLLOUT_STATISTICS),
    )
