"""The objectives two suites each share, from logits and from hidden states: their
settings, their inputs, the objective through rlhf_fast's op or the reference, and the
eager code trainers write instead.

* GRPO / DAPO, as TRL's GRPOTrainer uses it (``grpo`` and ``linear_ppo_loss`` suites):
  per token, the clipped surrogate with clip-higher (ratio clipped to [1 - 0.2, 1 + 0.28])
  on a per-sequence advantage, plus beta = 0.04 times the k3 KL to a reference policy,
  averaged over every valid token of the batch (TRL's ``bnpo`` / DAPO aggregation).
* sigmoid DPO, beta 0.1, mean over B preference pairs (``dpo_loss`` and
  ``linear_dpo_loss`` suites): rows 0..B-1 of a batch the chosen answers, B..2B-1 the
  rejected ones, the prompt (a random 10-30% prefix shared by a pair) and the right
  padding labelled -100. The same batch layout feeds the preference losses from hidden
  states (`preference`).
* distillation, TRL's GKD per-token divergence of a student from a teacher
  (``token_divergence`` and ``linear_token_divergence`` suites): jsd at beta 0.5, the
  forward and the reverse KL, every case at temperature 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# --------------------------------------------------------------------------- GRPO

CLIP_LOW = 0.2
CLIP_HIGH = 0.28
GRPO_BETA = 0.04
#: Std (nats) of old-policy and reference log-probs around the policy's: ~25% of the
#: ratios fall outside [0.8, 1.28], so both clip bounds and the min are exercised.
OLD_LOGP_STD = 0.2
REF_LOGP_STD = 0.3
#: No log-ratio lies within this many nats of a clip bound: the loss's gradient jumps
#: there, and a provider that rounds logits to bf16 (logp off by ~0.01) must not flip a
#: token across it and fail the gate for a discontinuity rather than an error.
CLIP_EDGE_MARGIN = 0.05


def grpo_objective(ppo_loss: Callable[..., Any], logp: torch.Tensor, mask: torch.Tensor,
                   old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor
                   ) -> torch.Tensor:
    """The GRPO loss of per-token log-probs through `ppo_loss` (rlhf_fast's, or the
    reference's); `advantages` ``[B]``, broadcast over each sequence's tokens."""
    advantages = advantages.unsqueeze(1).expand_as(logp)
    return ppo_loss(logp, old_logp, advantages, mask, **grpo_options(ref_logp)).loss


def grpo_options(ref_logp: torch.Tensor) -> dict[str, Any]:
    """The GRPO loss's options of ``ppo_loss`` (and ``linear_ppo_loss``)."""
    return dict(clip_eps=CLIP_LOW, clip_eps_high=CLIP_HIGH, ref_logp=ref_logp,
                kl_coef=GRPO_BETA, kl_estimator="k3", agg="token-mean")


def eager_token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """TRL-style per-token log-probs: fp32 log_softmax of `logits` ``[B, T, V]`` (aligned
    with `ids`), gather."""
    return logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def eager_grpo_objective(logp: torch.Tensor, mask: torch.Tensor, old_logp: torch.Tensor,
                         ref_logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The loss term by term, as TRL's GRPOTrainer writes it (``bnpo`` aggregation)."""
    per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv) + GRPO_BETA * per_token_kl
    m = mask.to(per_token_loss.dtype)
    return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)


def policy_neighbours(
    logp64: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 old-policy and reference log-probs near the policy's float64 `logp64`: noise
    of std OLD_LOGP_STD / REF_LOGP_STD, the log-ratios kept CLIP_EDGE_MARGIN away from
    both clip bounds (pushed to the near side of the band)."""

    def noise(std: float) -> torch.Tensor:
        return std * torch.randn(
            logp64.shape, generator=gen, device=logp64.device, dtype=torch.float64
        )

    log_ratio = noise(OLD_LOGP_STD)  # logp - old_logp
    for edge in (math.log(1 - CLIP_LOW), math.log(1 + CLIP_HIGH)):
        side = torch.where(log_ratio >= edge, 1.0, -1.0).to(log_ratio.dtype)
        near = (log_ratio - edge).abs() < CLIP_EDGE_MARGIN
        log_ratio = torch.where(near, edge + side * CLIP_EDGE_MARGIN, log_ratio)
    return (logp64 - log_ratio).float(), (logp64 + noise(REF_LOGP_STD)).float()


def advantages(b: int, gen: torch.Generator) -> torch.Tensor:
    """``[B]`` fp32 advantages of alternating sign: group-normalised advantages have both
    signs, and each sign makes a different clip bound bite."""
    signs = torch.tensor([1.0, -1.0], device=gen.device).repeat((b + 1) // 2)[:b]
    return torch.randn(b, generator=gen, device=gen.device).abs() * signs


# --------------------------------------------------------------------------- DPO

DPO_BETA = 0.1
#: Prompt length, as a fraction of T, drawn per pair; the answers fill >= 25% of the rest.
PROMPT_FRACTION = (0.1, 0.3)


def pair_labels(pairs: int, t: int, v: int, gen: torch.Generator) -> torch.Tensor:
    """``[2B, T]`` random labels of B chosen / rejected pairs: a prompt prefix shared by a
    pair (PROMPT_FRACTION of T) and right padding set to -100, answers filling >= 25% of
    the rest, one full-length answer on each side."""
    device = gen.device
    rows = 2 * pairs
    lo, hi = (max(1, round(f * t)) for f in PROMPT_FRACTION)
    prompt = torch.randint(lo, hi + 1, (pairs,), generator=gen, device=device).repeat(2)
    answer = torch.rand(rows, generator=gen, device=device) * 0.75 + 0.25
    end = prompt + (answer * (t - prompt)).ceil().long()
    end[0] = end[pairs] = t
    pos = torch.arange(t, device=device)
    keep = (pos >= prompt.unsqueeze(1)) & (pos < end.unsqueeze(1))
    labels = torch.randint(0, v, (rows, t), generator=gen, device=device)
    return labels.masked_fill(~keep, IGNORE_INDEX)


def dpo_objective(dpo_loss: Callable[..., Any], seq: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor) -> torch.Tensor:
    """The DPO loss of the sequence log-probs `seq` ``[2B]`` (chosen, then rejected)
    through `dpo_loss` (rlhf_fast's, or the reference's)."""
    pairs = seq.shape[0] // 2
    return dpo_loss(seq[:pairs], seq[pairs:], ref_chosen, ref_rejected, beta=DPO_BETA).loss


def eager_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sequence log-probs as TRL-style trainers write them: fp32 log_softmax of `logits`
    (aligned with `labels`), gather, masked sum per row."""
    loss_mask = labels != IGNORE_INDEX
    log_p = logits.float().log_softmax(-1)
    token_logps = log_p.gather(-1, labels.masked_fill(~loss_mask, 0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * loss_mask).sum(-1)


def eager_dpo_objective(seq: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor) -> torch.Tensor:
    """The sigmoid DPO loss of `seq` ``[2B]`` as TRL-style trainers write it."""
    pairs = seq.shape[0] // 2
    policy_chosen, policy_rejected = seq[:pairs], seq[pairs:]
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(DPO_BETA * margin).mean()


# --------------------------------------------------------------------------- GKD

#: The divergences (each a suite's variant) and jsd's mixture weight of the teacher.
DIVERGENCES = ("jsd", "forward_kl", "reverse_kl")
JSD_BETA = 0.5
#: The beta at which TRL's GKD loss and Liger's JSD give each divergence (their KLs:
#: beta 0 the forward KL(teacher || student), beta 1 the reverse KL(student || teacher)).
PEER_BETA = {"jsd": JSD_BETA, "forward_kl": 0.0, "reverse_kl": 1.0}


def divergence_options(divergence: str) -> dict[str, Any]:
    """`token_divergence`'s (and `linear_token_divergence`'s) options for a divergence
    (beta is read by jsd only)."""
    if divergence == "jsd":
        return {"divergence": divergence, "beta": JSD_BETA}
    return {"divergence": divergence}


def eager_divergence(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                     divergence: str) -> torch.Tensor:
    """TRL's GKD ``generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py) per token:
    its vocabulary sum, not reduced over tokens, log-probs in fp32 (TRL takes them in the
    logits' dtype; trainers upcast bf16 logits), the rows labelled -100 zeroed (TRL drops
    them before its reduction, which costs the same)."""
    beta = PEER_BETA[divergence]
    log_q = F.log_softmax(student.float(), dim=-1)  # the student's
    log_p = F.log_softmax(teacher.float(), dim=-1)  # the teacher's
    if beta == 0.0:  # KL(p || q): F.kl_div(input, target) sums target * (target - input)
        terms = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    elif beta == 1.0:  # KL(q || p)
        terms = F.kl_div(log_p, log_q, reduction="none", log_target=True)
    else:  # log m = log(beta p + (1 - beta) q), a logsumexp over the two weighted terms
        log_m = torch.stack([log_q + math.log1p(-beta), log_p + math.log(beta)]).logsumexp(0)
        terms = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
                 + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True))
    return terms.sum(-1).masked_fill(labels == IGNORE_INDEX, 0.0)
