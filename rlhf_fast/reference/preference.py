"""Pairwise preference losses on sequence log-probs."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlhf_fast.options import DPO_OPTIONS
from rlhf_fast.reference.common import nan_where
from rlhf_fast.types import DPO_LENGTH_NORMALISED_TYPES, DPO_LOSS_TYPES, DPOLossOutput

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
    """
    opt = DPO_OPTIONS.fill(options)
    beta, loss_type, reduction = opt.beta, opt.loss_type, opt.reduction
    dtype = torch.float64 if torch.float64 in (policy_chosen.dtype, policy_rejected.dtype) \
        else torch.float32
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    rc = torch.zeros_like(pc) if ref_chosen is None else ref_chosen.to(dtype)
    rr = torch.zeros_like(pr) if ref_rejected is None else ref_rejected.to(dtype)
    len_c = len_r = 1.0
    if loss_type in DPO_LENGTH_NORMALISED_TYPES:
        len_c = chosen_lengths.to(dtype).clamp(min=1)
        len_r = rejected_lengths.to(dtype).clamp(min=1)

    # the log-ratios (the rewards'), then the scores the loss compares
    a_raw, b_raw = pc - rc, pr - rr
    a, b = f_score(a_raw, opt) / len_c, f_score(b_raw, opt) / len_r
    delta = a - b
    u = beta * delta
    eps = opt.label_smoothing
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

    if reduction == "mean":
        loss = losses.mean()
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    chosen_rewards = (beta * a_raw / len_c).detach()
    rejected_rewards = (beta * b_raw / len_r).detach()
    return DPOLossOutput(
        loss=loss,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
    )


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
