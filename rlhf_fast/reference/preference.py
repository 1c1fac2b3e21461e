"""Pairwise preference losses on sequence log-probs."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlhf_fast.options import (
    CPO_OPTIONS,
    DPO_OPTIONS,
    KTO_OPTIONS,
    ORPO_OPTIONS,
    SIMPO_OPTIONS,
    dpo_terms,
)
from rlhf_fast.reference.common import nan_where
from rlhf_fast.types import (
    CPO_LENGTH_NORMALISED_TYPES,
    CPO_LOSS_TYPES,
    DPO_LABEL_SMOOTHING_TYPES,
    DPO_LENGTH_NORMALISED_TYPES,
    DPO_LOSS_TYPES,
    DPO_SFT,
    CPOLossOutput,
    DPOLossOutput,
    KTOLossOutput,
    ORPOLossOutput,
    SimPOLossOutput,
)

#: exo_pair with label_smoothing 0 uses this epsilon, as the EXO paper and TRL do.
EXO_DEFAULT_EPS = 1e-3


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)) = -softplus(-x) = min(x, 0) - log1p(exp(-|x|)): finite for any x."""
    return torch.minimum(x, torch.zeros_like(x)) - torch.log1p(torch.exp(-x.abs()))


@DPO_OPTIONS.keywords
def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor | None,
             ref_rejected: Tensor | None, *, chosen_lengths: Tensor | None = None,
             rejected_lengths: Tensor | None = None, weights: Tensor | None = None,
             sft_logps: Tensor | None = None, **options: Any) -> DPOLossOutput:
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
      discopop      -log s(u) (1 - m) + exp(-u) m, m = s(u / discopop_tau), the second
                    term as exp(log s(u / tau) - u): finite at any margin for tau < 1
                    (TRL's exp(-u) overflows first)  [DiscoPOP, Chan Lu et al. 2024, eq. 5]
      aot           the sigmoid loss on sorted(pc - pr) - sorted(rc - rr) over the batch
                                                 [AOT, Melnyk et al. 2024, paired]
      aot_unpaired  the sigmoid loss on sorted(a) - sorted(b)   [AOT, unpaired]

    f_divergence_type (TRL's f-DPO, Wang et al. 2023) replaces each log-ratio x by a score
    before the loss (before the length division of ipo and sigmoid_norm): reverse_kl x
    (DPO), forward_kl -exp(-x), js_divergence log s(x), alpha_divergence
    exp((alpha - 1) x) / (alpha - 1) with (alpha - 1) x clamped at 80 (alpha within 1e-6
    of 1: reverse_kl). apo_zero, apo_down, aot and aot_unpaired compare the raw log-ratios
    and require reverse_kl. aot's losses are those of the sorted positions (its "none"
    reduction too), so a NaN log-prob reaches the loss at the sort's end (torch.sort puts
    NaN last) rather than its own pair's, and every pair's gradient.

    where s is the logistic sigmoid and log s(x) is computed as -softplus(-x). ipo and
    sigmoid_norm divide all four log-probs by their answer's length (clamped to >= 1).

    A missing reference (both refs None) is log pi_ref = 0: only for the types in
    `DPO_REFERENCE_FREE_TYPES`. Rewards: beta * a and beta * b. A NaN log-prob makes its
    pair's loss NaN and, for every type (hinge included), the gradient of each input its
    terms depend on through the NaN.

    A list of types is their sum with loss_weights (TRL's, MPO: Wang et al. 2024), and
    rpo_alpha adds ("sft", rpo_alpha) to it; each type's [B] losses are multiplied by
    `weights` (WPO) before the reduction, as TRL does per type. "sft" is the chosen
    answers' NLL per token over the batch, -sum(sft_logps) / sum(chosen_lengths clamped
    to >= 1) (TRL's cross-entropy over every chosen token), the same for every pair
    (TRL's expand: its "none" values are that constant). `sft_logps` defaults to
    policy_chosen (TRL's sft reads the plain sums where LD-DPO weights policy_chosen).
    The rewards are those of the first type other than sft (raw log-ratios for sft alone).
    """
    opt = DPO_OPTIONS.fill(options)
    dtype = torch.float64 if torch.float64 in (policy_chosen.dtype, policy_rejected.dtype) \
        else torch.float32
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    rc = torch.zeros_like(pc) if ref_chosen is None else ref_chosen.to(dtype)
    rr = torch.zeros_like(pr) if ref_rejected is None else ref_rejected.to(dtype)
    total, rewards = 0.0, None
    for kind, weight in dpo_terms(opt):
        if kind == DPO_SFT:
            sft = pc if sft_logps is None else sft_logps.to(dtype)
            losses = _chosen_nll(sft, _token_counts(chosen_lengths, dtype)).expand(pc.shape)
        else:
            len_c = len_r = 1.0
            if kind in DPO_LENGTH_NORMALISED_TYPES:
                len_c = _token_counts(chosen_lengths, dtype)
                len_r = _token_counts(rejected_lengths, dtype)
            losses = pair_losses(kind, pc, pr, rc, rr, len_c, len_r, opt)
            if rewards is None:  # the log-probs the (first) loss sees
                rewards = (opt.beta * (pc - rc) / len_c).detach(), \
                    (opt.beta * (pr - rr) / len_r).detach()
        if weights is not None:
            losses = losses * weights.detach().to(dtype)
        total = total + weight * losses
    if rewards is None:
        rewards = (opt.beta * (pc - rc)).detach(), (opt.beta * (pr - rr)).detach()
    chosen_rewards, rejected_rewards = rewards
    return DPOLossOutput(
        loss=_reduce(total, opt.reduction),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
    )


def pair_losses(loss_type: str, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor,
                len_c: Tensor | float, len_r: Tensor | float, opt: Any) -> Tensor:
    """[B] the losses of one pairwise `loss_type` (sorted positions for aot's), on the
    log-probs and the lengths (1.0 where the type does not normalise)."""
    beta = opt.beta
    # the log-ratios (the rewards'), then the scores the loss compares
    a_raw, b_raw = pc - rc, pr - rr
    a, b = f_score(a_raw, opt) / len_c, f_score(b_raw, opt) / len_r
    delta = a - b
    u = beta * delta
    eps = opt.label_smoothing
    if loss_type not in DPO_LABEL_SMOOTHING_TYPES:
        eps = 0.0  # (in a mix: read only by the types that read it)
    if loss_type == "aot":
        delta = (torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values)
    elif loss_type == "aot_unpaired":
        delta = torch.sort(a, dim=0).values - torch.sort(b, dim=0).values
    if loss_type in ("aot", "aot_unpaired"):
        u = beta * delta
        losses = -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
    elif loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        # relu's gradient at NaN is 1: the factor gives a NaN pair a NaN gradient, as the
        # other types' smooth formulas do.
        losses = torch.relu(1 - u) * nan_where(u.isnan(), u)
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
    elif loss_type == "discopop":  # exp(-u) s(u / tau) as one exp: no inf * 0
        tau = opt.discopop_tau
        losses = (-log_sigmoid(u) * torch.sigmoid(-u / tau)
                  + torch.exp(log_sigmoid(u / tau) - u))
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")

    return losses


def f_score(log_ratio: Tensor, opt: Any) -> Tensor:
    """TRL's f-divergence score of each log-ratio (see `dpo_loss`)."""
    kind, alpha = opt.f_divergence_type, opt.f_alpha_divergence_coef
    if kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return -torch.exp(-log_ratio)
    if kind == "js_divergence":
        return log_sigmoid(log_ratio)
    if kind == "alpha_divergence":
        return torch.exp(((alpha - 1) * log_ratio).clamp(max=80.0)) / (alpha - 1)
    return log_ratio


# ------------------------------------------- reference-free and unpaired preference losses


def _math_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _token_counts(lengths: Tensor, dtype: torch.dtype) -> Tensor:
    """Answer lengths as `dtype`, clamped to >= 1 (an empty answer counts as one token)."""
    return lengths.to(dtype).clamp(min=1)


def _chosen_nll(pc: Tensor, len_c: Tensor) -> Tensor:
    """The chosen answers' NLL per token over the batch, as TRL's CPO and ORPO trainers and
    Liger take it (a cross-entropy mean over every chosen token): -sum(pc) / sum(len_c)."""
    return -pc.sum() / len_c.sum()


def _pair_statistics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> tuple[Tensor, ...]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    accuracy = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()
    return chosen_rewards, rejected_rewards, accuracy, (chosen_rewards - rejected_rewards).mean()


@SIMPO_OPTIONS.keywords
def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, **options: Any) -> SimPOLossOutput:
    """SimPO (Meng et al. 2024, eq. 6) on sequence log-probs ``[B]`` (sums over each answer).

    With a = policy_chosen / Lc and b = policy_rejected / Lr (per-token means, lengths
    clamped to >= 1), z = beta * (a - b) - gamma and eps = label_smoothing, per pair:

        loss = -(1 - eps) log s(z) - eps log s(-z)

    as TRL's CPOTrainer (loss_type="simpo", whose logits are (a - b) - simpo_gamma / beta,
    scaled by beta) and Liger's LigerFusedLinearSimPOFunction write it. Rewards: beta * a
    and beta * b. gamma = 0 is the reference-free `dpo_loss` with loss_type="sigmoid_norm".
    """
    opt = SIMPO_OPTIONS.fill(options)
    dtype = _math_dtype(policy_chosen, policy_rejected)
    a = policy_chosen.to(dtype) / _token_counts(chosen_lengths, dtype)
    b = policy_rejected.to(dtype) / _token_counts(rejected_lengths, dtype)
    z = opt.beta * (a - b) - opt.gamma
    eps = opt.label_smoothing
    losses = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    return SimPOLossOutput(_reduce(losses, opt.reduction),
                           *_pair_statistics(opt.beta * a, opt.beta * b))


@CPO_OPTIONS.keywords
def cpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor,
             rejected_lengths: Tensor, **options: Any) -> CPOLossOutput:
    """CPO (Xu et al. 2024, eq. 3 and its NLL term) on sequence log-probs ``[B]`` (sums over
    each answer), without a reference model, as TRL's CPOTrainer.cpo_loss writes it.

    With a, b the policy log-probs of the chosen and the rejected answer (per-token means,
    lengths clamped to >= 1, for ipo; sums for the others, as TRL's `average_log_prob`),
    delta = a - b, u = beta * delta and eps = label_smoothing, each pair's preference term:

      sigmoid   -(1 - eps) log s(u) - eps log s(-u)
      hinge     max(0, 1 - u)
      ipo       (delta - 1 / (2 beta))^2

    plus alpha times the batch's NLL of the chosen answers per token,
    nll = -sum(policy_chosen) / sum(max(chosen_lengths, 1)) (TRL's cross-entropy over
    every chosen token, Liger's too): loss_i = term_i + alpha * nll, so that the "mean"
    reduction is TRL's losses.mean() + cpo_alpha * nll_loss. alpha = 0 adds nothing
    (TRL does not compute the NLL then); nll_loss is reported either way. Rewards:
    beta * a, beta * b.
    """
    opt = CPO_OPTIONS.fill(options)
    beta, loss_type, eps = opt.beta, opt.loss_type, opt.label_smoothing
    dtype = _math_dtype(policy_chosen, policy_rejected)
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    len_c = _token_counts(chosen_lengths, dtype)
    a, b = pc, pr
    if loss_type in CPO_LENGTH_NORMALISED_TYPES:
        a, b = pc / len_c, pr / _token_counts(rejected_lengths, dtype)
    delta = a - b
    u = beta * delta
    if loss_type == "sigmoid":
        losses = -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
    elif loss_type == "hinge":  # a NaN margin: a NaN gradient (relu's at NaN is 1)
        losses = torch.relu(1 - u) * nan_where(u.isnan(), u)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {loss_type!r}")
    nll = _chosen_nll(pc, len_c)
    if opt.alpha != 0:  # TRL's cpo_alpha = 0 leaves the NLL out (a NaN in it too)
        losses = losses + opt.alpha * nll
    return CPOLossOutput(_reduce(losses, opt.reduction),
                         *_pair_statistics(beta * a, beta * b), nll.detach())


#: -ln 2: where log1mexp switches between its two forms.
MINUS_LN2 = -math.log(2)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, accurate everywhere (Maechler 2012): log1p(-e^x) below
    -ln 2, log(-expm1(x)) from there to 0. -inf at x = 0, NaN for x > 0.

    The first form is evaluated on x moved below -ln 2 where it is not taken: at x so
    close to 0 that e^x rounds to 1 its infinite slope would make torch.where's
    gradient 0 * inf = NaN (TRL's log1mexp has that NaN for |x| < 1.1e-16 in fp64)."""
    low = x < MINUS_LN2
    return torch.where(low, torch.log1p(-torch.exp(torch.where(low, x, -1.0))),
                       torch.log(-torch.expm1(x)))


@ORPO_OPTIONS.keywords
def orpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, **options: Any) -> ORPOLossOutput:
    """ORPO (Hong et al. 2024, eqs. 4-7) on sequence log-probs ``[B]`` (sums over each
    answer), as TRL's ORPOTrainer.odds_ratio_loss writes it.

    With lc = policy_chosen / Lc and lr = policy_rejected / Lr (per-token means, lengths
    clamped to >= 1), the log odds ratio of the pair is

        log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr)),  log1mexp(x) = log(1 - e^x)

    and loss_i = nll - beta * log s(log_odds_i), nll = -sum(policy_chosen) /
    sum(max(chosen_lengths, 1)) the batch's NLL of the chosen answers per token (the
    "mean" reduction is TRL's policy_nll_loss - losses.mean()). Rewards: beta * lc,
    beta * lr.

    A certain chosen answer (lc = 0 exactly) has log_odds = +inf and its odds-ratio term 0;
    its gradient is the limit d/d lc = -beta * e^lr / (1 - e^lr) (the rejected answer's
    odds), not the 0 * inf = NaN of the chain rule through log1mexp (TRL's autograd gives
    NaN there). lr = 0 exactly gives an infinite loss; both 0, or a positive mean
    log-prob, NaN.
    """
    opt = ORPO_OPTIONS.fill(options)
    beta = opt.beta
    dtype = _math_dtype(policy_chosen, policy_rejected)
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    len_c = _token_counts(chosen_lengths, dtype)
    lc, lr = pc / len_c, pr / _token_counts(rejected_lengths, dtype)
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    # the loss on lc moved off 0 where it is 0 (no 0 * inf in its gradient), and there
    # its first-order expansion lc * odds(rejected): value 0, slope the limit
    certain = lc == 0
    lc_off = torch.where(certain, -1.0, lc)
    ratio = torch.where(certain, lc * torch.exp(lr - log1mexp(lr)),
                        log_sigmoid((lc_off - lr) - (log1mexp(lc_off) - log1mexp(lr))))
    nll = _chosen_nll(pc, len_c)
    return ORPOLossOutput(_reduce(nll - beta * ratio, opt.reduction),
                          *_pair_statistics(beta * lc, beta * lr), nll.detach(),
                          ratio.detach().mean(), log_odds.detach().mean())


@KTO_OPTIONS.keywords
def kto_loss(policy_logps: Tensor, ref_logps: Tensor | None, desirable: Tensor,
             kl_ref: Tensor | None = None, **options: Any) -> KTOLossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired sequence log-probs ``[B]``, as TRL's
    KTOTrainer (loss_type="kto") writes it.

    With r = policy_logps - ref_logps (ref None: 0), z = max(kl_ref, 0) detached (None: 0)
    and u = beta * (r - z), per example:

      desirable     desirable_weight * (1 - s(u))     (computed as s(-u))
      undesirable   undesirable_weight * (1 - s(-u))  (computed as s(u))

    reduced over all B examples (TRL concatenates the two groups and means over both).
    kl_ref = None is TRL's apo_zero_unpaired. Rewards: beta * r.
    """
    opt = KTO_OPTIONS.fill(options)
    beta = opt.beta
    dtype = _math_dtype(policy_logps)
    logratio = policy_logps.to(dtype)
    if ref_logps is not None:
        logratio = logratio - ref_logps.to(dtype)
    z = torch.zeros((), dtype=dtype, device=logratio.device)
    if kl_ref is not None:
        z = kl_ref.detach().to(dtype).reshape(()).clamp(min=0)
    u = beta * (logratio - z)
    losses = torch.where(desirable, opt.desirable_weight * torch.sigmoid(-u),
                         opt.undesirable_weight * torch.sigmoid(u))
    rewards = (beta * logratio).detach()
    chosen, rejected = rewards[desirable].mean(), rewards[~desirable].mean()
    return KTOLossOutput(_reduce(losses, opt.reduction), rewards, chosen, rejected,
                         chosen - rejected, z)
