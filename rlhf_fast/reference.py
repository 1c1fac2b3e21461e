"""Plain PyTorch versions of every rlhf-fast op.

This module is the specification: each function here has the same signature and the
same semantics as the public op of the same name, written as plainly as a textbook.
It is the oracle the tests compare the Triton kernels against (in float64), and the
CPU fallback the trainers use when Triton cannot run. Readable first, fast second.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_fast.options import DPO_OPTIONS, GAE_OPTIONS, PPO_OPTIONS, TOKEN_OPTIONS
from rlhf_fast.types import (
    DPO_LENGTH_NORMALISED_TYPES,
    DPO_LOSS_TYPES,
    DPOLossOutput,
    PPOLossOutput,
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in fp32 whatever the input, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@TOKEN_OPTIONS.keywords
def logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, return_entropy: bool = False, **options: Any
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under softmax(logits / temperature), and entropy.

    Args:
        logits: ``[..., V]`` float tensor.
        labels: ``[...]`` integer tensor of token ids in ``[0, V)`` or ``ignore_index``.
        return_entropy: also return H = -sum_j p_j log p_j.
        Options: below; z = logits / temperature.

    Returns:
        ``logp [...]`` (and ``entropy [...]``) in fp32 (fp64 for fp64 logits).

    Semantics the kernels share:
      * logp = z[label] - logsumexp(z); H = logsumexp(z) - sum_j p_j z_j.
      * A logit of -inf is a token of probability 0: it adds nothing to the entropy.
      * A row whose label is ``ignore_index`` gives logp = 0 and H = 0, and no gradient
        flows into its logits from either output.
      * A row whose label is outside [0, V) (and not ignore_index) gives NaN for both, and
        a NaN gradient for every logit of the row.
      * Labels and ignore_index are compared as integers: an ignore_index outside the
        labels' dtype (int32 labels, ignore_index = 5 + 2**32) matches no label.
      * NaN or +inf anywhere in a row gives NaN for that row only.
    """
    vocab = logits.shape[-1]
    opt = TOKEN_OPTIONS.fill(options)
    temperature, ignore_index = opt.temperature, opt.ignore_index
    ignored = ignored_labels(labels, ignore_index)
    in_range = (labels >= 0) & (labels < vocab)
    # int64 for gather: torch < 2.8 takes no int32 index
    safe_labels = torch.where(in_range, labels, torch.zeros_like(labels)).long()

    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    # Ignored rows are never looked at: whatever they hold, no NaN reaches any output.
    z = torch.where(ignored.unsqueeze(-1), torch.zeros_like(z), z)
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = _mark_rows(logp, in_range, ignored)
    if not return_entropy:
        return logp
    p = log_p.exp()
    # p * log p is 0 where p is 0 (a -inf logit), not 0 * -inf = NaN, in value and gradient.
    log_p_or_zero = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    entropy = -(p * log_p_or_zero).sum(-1)
    return logp, _mark_rows(entropy, in_range, ignored)


def ignored_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels == ignore_index`` as integers. torch compares an int32 tensor with a Python
    int outside int32's range modulo 2^32 (5 would equal 5 + 2**32); such an ignore_index
    matches no label, as in the kernels, which compare in int64."""
    if not fits_dtype(ignore_index, labels.dtype):
        return torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    return labels == ignore_index


def fits_dtype(value: int, dtype: torch.dtype) -> bool:
    """Whether the int `value` is in the range of the integer `dtype`."""
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def _nan_where(bad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A constant factor: NaN where `bad`, 1 elsewhere. Multiplying by it makes a value NaN
    in its gradient too (torch.where would give the NaN branch a gradient of 0)."""
    return torch.ones_like(like).masked_fill(bad, float("nan"))


def _mark_rows(
    values: torch.Tensor, in_range: torch.Tensor, ignored: torch.Tensor
) -> torch.Tensor:
    """NaN, in value and in the gradient of every logit of the row, for rows with an
    out-of-range label (as the kernels give); a constant 0 (so no gradient reaches their
    logits) for ignored rows."""
    values = values * _nan_where(~in_range & ~ignored, values)
    return torch.where(ignored, torch.zeros_like(values), values)



@TOKEN_OPTIONS.keywords
def linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
    bias: torch.Tensor | None = None, return_entropy: bool = False, **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`logprobs` of the materialised logits ``F.linear(hidden, weight, bias)`` (in the
    input dtype, or autocast's, as a model's lm_head computes them). hidden ``[..., D]``,
    weight ``[V, D]``.
    Ignored rows are zeroed first: their hidden state (NaN at fully masked padding, say)
    reaches neither an output nor a gradient. A row with an out-of-range label is NaN, and
    so is its d hidden row, all of d weight and d bias (its NaN d logits row meets every
    vocab row in d logits^T hidden); the other rows' d hidden is unaffected."""
    opt = TOKEN_OPTIONS.fill(options)
    hidden = hidden.masked_fill(ignored_labels(labels, opt.ignore_index).unsqueeze(-1), 0)
    logits = F.linear(hidden, weight, bias)
    return logprobs(logits, labels, return_entropy=return_entropy, **vars(opt))

# --------------------------------------------------------------------------- ppo_loss

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
    dtype = _compute_dtype(logp.dtype)
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


# ----------------------------------------------------------------- GAE and advantages


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
    dtype = _compute_dtype(torch.promote_types(rewards.dtype, values.dtype))
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
    dtype = _compute_dtype(rewards.dtype)
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


def group_advantages(
    scores: torch.Tensor, group_size: int, *, scale: str | None = "std", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: ``scores [B]`` in groups of `group_size` consecutive samples,
    A_i = (s_i - mean_g) / (std_g + eps) (scale="std", unbiased std as torch.std; a group of
    one has std 0, so A = 0), or s_i - mean_g (scale=None). ``[B]`` fp32 (fp64 for fp64).
    A group of equal scores gives exactly 0."""
    s = scores.to(_compute_dtype(scores.dtype)).reshape(-1, group_size)
    # Deviations from the group's first score, a shift the result does not depend on:
    # equal scores give d = 0, hence A = 0 exactly, where s - mean would not (the mean of
    # 64 scores of 0.7 rounds in fp32, and 6e-8 / (std 6e-8 + eps) is 0.06). d's mean
    # errs relative to the group's spread, not to its magnitude.
    d = s - s[:, :1]
    adv = d - d.mean(dim=1, keepdim=True)
    if scale == "std":
        std = d.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(s)
        adv = adv / (std + eps)
    return adv.reshape(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries of `x` where `mask` (same shape, nonzero = valid) is set, over
    the whole tensor (dim=None) or along `dim`; NaN where there is no valid entry. fp32
    (fp64 for fp64 x)."""
    valid = mask != 0
    xs = x.to(_compute_dtype(x.dtype))
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
    xs = x.to(_compute_dtype(x.dtype))
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


# --------------------------------------------------------------------------- sequence_logps


def sequence_logps(
    token_logp: torch.Tensor, mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Per-sequence sum (or mean) of the valid tokens' log-probs.

    ``token_logp [..., T]`` float, ``mask [..., T]`` (nonzero = valid). Returns ``[...]``
    fp32 (fp64 for fp64 input). A sequence with no valid token gives 0 (sum and mean).
    Masked entries are never read: a NaN there reaches neither the value nor the gradient.
    """
    valid = mask != 0
    x = token_logp.to(_compute_dtype(token_logp.dtype))
    total = torch.where(valid, x, torch.zeros_like(x)).sum(-1)
    if not average:
        return total
    count = valid.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


# --------------------------------------------------------------------------- dpo_loss

#: exo_pair with label_smoothing 0 uses this epsilon, as the EXO paper and TRL do.
EXO_DEFAULT_EPS = 1e-3


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)) = -softplus(-x) = min(x, 0) - log1p(exp(-|x|)): finite for any x."""
    return torch.minimum(x, torch.zeros_like(x)) - torch.log1p(torch.exp(-x.abs()))


@DPO_OPTIONS.keywords
def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None,
             ref_rejected: Tensor | None, *, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None, **options: Any) -> DPOLossOutput:
    """Pairwise preference losses on sequence log-probs ``[B]`` (sums over each answer).

    With a = log pi(y_w) - log pi_ref(y_w), b = log pi(y_l) - log pi_ref(y_l) (the chosen
    and rejected log-ratios), delta = a - b, u = beta * delta and eps = label_smoothing,
    per pair (TRL's DPOTrainer names and forms; the paper of each in brackets):

      sigmoid       -(1 - eps) log s(u) - eps log s(-u)          [DPO, Rafailov et al. 2023,
                                                 eq. 7; eps > 0: conservative DPO, Mitchell 2023]
      ipo           (delta - 1 / (2 beta))^2 on per-token-mean log-probs
                                                 [IPO, Azar et al. 2023, eq. 17]
      hinge         max(0, 1 - u)                [SLiC-HF, Zhao et al. 2023]
      robust        (-(1 - eps) log s(u) + eps log s(-u)) / (1 - 2 eps)
                                                 [rDPO, Chowdhury et al. 2024, eq. 8]
      exo_pair      s(u) (log s(u) - log(1 - eps)) + s(-u) (log s(-u) - log eps),
                    eps = 1e-3 when 0 is given   [EXO, Ji et al. 2024, pairwise form]
      nca_pair      -log s(beta a) - log s(-beta a) / 2 - log s(-beta b) / 2
                                                 [NCA, Chen et al. 2024]
      bco_pair      -log s(beta a) - log s(-beta b), without BCO's running-mean shift
                                                 [BCO, Jung et al. 2024]
      sppo_hard     (a - 1 / (2 beta))^2 + (b + 1 / (2 beta))^2
                                                 [SPPO, Wu et al. 2024, hard labels]
      apo_zero      1 - s(beta a) + s(beta b)    [APO-zero, D'Oosterlinck et al. 2024]
      apo_down      s(beta a) + 1 - s(beta (a - b))   [APO-down, same paper]
      sigmoid_norm  the sigmoid loss on per-token-mean log-probs
                                                 [length-normalised DPO, Tulu 3, 2024]

    where s is the logistic sigmoid and log s(x) is computed as -softplus(-x). ipo and
    sigmoid_norm divide all four log-probs by their answer's length (clamped to >= 1).
    A missing reference (both refs None) is log pi_ref = 0: only for the types in
    `DPO_REFERENCE_FREE_TYPES`. Rewards: beta * a and beta * b. A NaN log-prob makes its
    pair's loss NaN and, for every type (hinge included), the gradient of each input its
    terms depend on through the NaN.
    """
    opt = DPO_OPTIONS.fill(options)
    beta, loss_type, reduction = opt.beta, opt.loss_type, opt.reduction
    dtype = torch.float64 if torch.float64 in (policy_chosen.dtype, policy_rejected.dtype) \
        else torch.float32
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    rc = torch.zeros_like(pc) if ref_chosen is None else ref_chosen.to(dtype)
    rr = torch.zeros_like(pr) if ref_rejected is None else ref_rejected.to(dtype)
    if loss_type in DPO_LENGTH_NORMALISED_TYPES:
        len_c = chosen_lengths.to(dtype).clamp(min=1)
        len_r = rejected_lengths.to(dtype).clamp(min=1)
        pc, rc, pr, rr = pc / len_c, rc / len_c, pr / len_r, rr / len_r

    a = pc - rc
    b = pr - rr
    delta = a - b
    u = beta * delta
    eps = opt.label_smoothing
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        # relu's gradient at NaN is 1: the factor gives a NaN pair a NaN gradient, as the
        # other types' smooth formulas do.
        losses = torch.relu(1 - u) * _nan_where(u.isnan(), u)
    elif loss_type == "robust":
        losses = (-(1 - eps) * log_sigmoid(u) + eps * log_sigmoid(-u)) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        eps = eps or EXO_DEFAULT_EPS
        losses = (torch.sigmoid(u) * (log_sigmoid(u) - math.log(1 - eps))
                  + torch.sigmoid(-u) * (log_sigmoid(-u) - math.log(eps)))
    elif loss_type == "nca_pair":
        losses = (-log_sigmoid(beta * a) - 0.5 * log_sigmoid(-beta * a)
                  - 0.5 * log_sigmoid(-beta * b))
    elif loss_type == "bco_pair":
        losses = -log_sigmoid(beta * a) - log_sigmoid(-beta * b)
    elif loss_type == "sppo_hard":
        losses = (a - 1 / (2 * beta)) ** 2 + (b + 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":  # 1 - s(x) written as s(-x): exact for tiny losses
        losses = torch.sigmoid(-beta * a) + torch.sigmoid(beta * b)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * a) + torch.sigmoid(-beta * (a - b))
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")

    if reduction == "mean":
        loss = losses.mean()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    chosen_rewards = (beta * a).detach()
    rejected_rewards = (beta * b).detach()
    return DPOLossOutput(
        loss=loss,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
    )
