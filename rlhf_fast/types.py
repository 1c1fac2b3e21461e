"""The public types of rlhf-fast: what the losses return and the names their options take.

The ops, the reference, the option declarations (`rlhf_fast.options`) and the trainers all
read them from here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# --------------------------------------------------------------------------- ppo_loss

#: verl's names (`reference.kl_penalty`); a trailing "+": straight through, the gradient of k2.
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl", "k1+", "k3+", "abs+", "low_var_kl+")
#: verl's names (`reference.policy_terms` has each formula); gspo, gspo_token and geo_mean
#: read each row's mean log-ratio: `SEQUENCE_POLICY_LOSSES`.
POLICY_LOSSES = ("vanilla", "cispo", "sapo", "gpg", "dppo_tv", "dppo_kl", "gspo", "gspo_token",
                 "geo_mean", "bypass_mode", "clip_cov", "kl_cov", "dro")
SEQUENCE_POLICY_LOSSES = ("gspo", "gspo_token", "geo_mean")
#: verl's rollout correction (`reference.rollout_correction`): IS weight levels and
#: rejection-sampling criteria (a divergence per token, or a row's sum, mean or max).
ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_RS_MODES = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
                    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
#: Outcome advantage estimators, verl's names (`reference.group_advantages`).
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "opo", "grpo_passk", "gpg",
                        "reinforce_plus_plus_baseline", "remax", "gdpo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
             "token-sum")


class PPOLossOutput(NamedTuple):
    """What `ppo_loss` returns. All fields are fp32 (fp64 for fp64 inputs) scalars.

    `loss = policy_loss + kl_coef * kl - entropy_coef * entropy + vf_coef * value_loss`,
    the four terms aggregated with the same `agg` mode, and differentiable. The
    statistics are token-means over valid tokens (ratio_max a max), detached.

    The clip fractions count the valid tokens whose policy term a bound changed:
    clipfrac = clipfrac_low + clipfrac_high, split by the side of the ratio that was
    clipped (for dppo_tv / dppo_kl: the tokens the divergence mask drops, by the sign of
    the advantage; 0 for sapo and gpg, which clip nothing); dual_clipfrac counts those
    bounded by dual_clip (vanilla) or clip_ratio_c (dppo_tv / dppo_kl).

    The rollout statistics (0 without a rollout correction; verl's names), over the
    tokens of `mask`: rollout_is_mean / rollout_is_max of the IS weights before their
    truncation or masking, rollout_rs_masked_fraction the share the rejection sampling
    drops, rollout_kl and rollout_k3_kl the k1 and k3 estimates of KL(pi_rollout ||
    pi_old) (bypass_mode: of pi_theta), rollout_is_masked_fraction the share whose IS
    weight a "lower_upper" rollout_is_threshold set to 0 (masked IS).

    A NaN at a valid token makes every term and statistic that reads it NaN (ratio_max
    included, as torch.max), except the fractions: they count the tokens whose bound
    strictly holds, which a NaN never does.
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    value_clipfrac: torch.Tensor
    clipfrac_low: torch.Tensor
    clipfrac_high: torch.Tensor
    dual_clipfrac: torch.Tensor
    rollout_is_mean: torch.Tensor
    rollout_is_max: torch.Tensor
    rollout_rs_masked_fraction: torch.Tensor
    rollout_kl: torch.Tensor
    rollout_k3_kl: torch.Tensor
    rollout_is_masked_fraction: torch.Tensor


# --------------------------------------------------------------------------- dpo_loss

DPO_LOSS_TYPES = (
    "sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "sigmoid_norm", "discopop", "aot", "aot_unpaired",
)
#: TRL's f_divergence_type: the function of each log-ratio the loss compares (reverse_kl:
#: the log-ratio itself, DPO).
DPO_F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: Types that compare the raw log-ratios whatever f_divergence_type (TRL's): they require
#: reverse_kl. aot and aot_unpaired sort them over the batch first.
DPO_RAW_LOG_RATIO_TYPES = ("apo_zero", "apo_down", "aot", "aot_unpaired")
DPO_SORTED_TYPES = ("aot", "aot_unpaired")
#: Types whose loss depends on the two log-ratios only through their difference, so a
#: missing reference (log pi_ref = 0 for every answer) is a well-defined reference-free loss.
DPO_REFERENCE_FREE_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "sigmoid_norm",
                            "discopop")
#: Types that read `label_smoothing`; the others require it to be 0.
DPO_LABEL_SMOOTHING_TYPES = ("sigmoid", "robust", "exo_pair", "sigmoid_norm", "aot",
                             "aot_unpaired")
#: Types on per-token-averaged log-probs: they need `chosen_lengths` and `rejected_lengths`.
DPO_LENGTH_NORMALISED_TYPES = ("ipo", "sigmoid_norm")
#: TRL's "sft": the chosen answers' NLL per token over the batch, a batch-level term (not a
#: per-pair loss, not a kernel's) that `loss_type` takes alone or in a mix (MPO; RPO is
#: sigmoid + rpo_alpha * sft). It reads `chosen_lengths`, no reference, no rejected answer.
DPO_SFT = "sft"
#: What `loss_type` takes: one of these or a list of them (a weighted mix, `loss_weights`).
DPO_MIX_TYPES = DPO_LOSS_TYPES + (DPO_SFT,)
DPO_REDUCTIONS = ("mean", "sum", "none")


class DPOLossOutput(NamedTuple):
    """What `dpo_loss` returns, fp32 (fp64 for fp64 inputs).

    loss: a scalar (reduction "mean" or "sum") or ``[B]`` ("none"), differentiable.
    chosen_rewards, rejected_rewards: ``[B]`` implicit rewards beta * (log pi - log pi_ref)
        of each answer, on the log-probs the loss sees (length-normalised for ipo and
        sigmoid_norm), detached.
    reward_accuracy: scalar, fraction of pairs with chosen_reward > rejected_reward.
    reward_margin: scalar, mean of chosen_reward - rejected_reward. Both detached.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor

class PairLogps(NamedTuple):
    """What `pair_logps` returns: ``[B]`` each, fp32 (fp64 for fp64 token log-probs).

    chosen, rejected: each answer's log-prob, the sum over its tokens (LD-DPO's weighted
        sum with ld_alpha); differentiable.
    chosen_lengths, rejected_lengths: each answer's token count.
    sft_logps: the chosen answers' plain sums, for `dpo_loss`'s sft term, where they
        differ from `chosen` (with ld_alpha); else None. Differentiable.
    weights: WPO's weight of each pair, the product of its two answers' weights (with
        log_sum_p2; else None), detached.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    sft_logps: torch.Tensor | None
    weights: torch.Tensor | None


# ------------------------------------------- simpo_loss, cpo_loss, orpo_loss, kto_loss

#: TRL CPOTrainer's loss types without AlphaPO and without "simpo" (that is `simpo_loss`).
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
#: The CPO types on per-token-mean log-probs (as TRL's `average_log_prob` has them).
CPO_LENGTH_NORMALISED_TYPES = ("ipo",)
#: The reductions of the reference-free and unpaired losses (those of `dpo_loss`).
PREFERENCE_REDUCTIONS = DPO_REDUCTIONS


class SimPOLossOutput(NamedTuple):
    """What `simpo_loss` returns, fp32 (fp64 for fp64 inputs).

    loss: a scalar (reduction "mean" or "sum") or ``[B]`` ("none"), differentiable.
    chosen_rewards, rejected_rewards: ``[B]`` beta times each answer's per-token-mean
        log-prob (TRL's and Liger's rewards), detached.
    reward_accuracy: scalar, fraction of pairs with chosen_reward > rejected_reward.
    reward_margin: scalar, mean of chosen_reward - rejected_reward. Both detached.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor


class CPOLossOutput(NamedTuple):
    """What `cpo_loss` returns, fp32 (fp64 for fp64 inputs).

    loss: a scalar (reduction "mean" or "sum") or ``[B]`` ("none"): each pair's preference
        loss plus alpha * nll_loss, reduced; differentiable.
    chosen_rewards, rejected_rewards: ``[B]`` beta times the log-probs the preference loss
        sees (per-token means for ipo, sums otherwise), detached.
    reward_accuracy, reward_margin: scalars as in `DPOLossOutput`, detached.
    nll_loss: scalar, the chosen answers' negative log-likelihood per token over the batch
        (-sum of policy_chosen / sum of the lengths), detached.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    nll_loss: torch.Tensor


class ORPOLossOutput(NamedTuple):
    """What `orpo_loss` returns, fp32 (fp64 for fp64 inputs); TRL ORPOTrainer's values.

    loss: a scalar (reduction "mean" or "sum") or ``[B]`` ("none"): nll_loss minus beta
        times each pair's log-sigmoid of its log odds ratio, reduced; differentiable.
    chosen_rewards, rejected_rewards: ``[B]`` beta times each answer's per-token-mean
        log-prob, detached.
    reward_accuracy, reward_margin: scalars as in `DPOLossOutput`, detached.
    nll_loss: scalar, the chosen answers' negative log-likelihood per token over the batch,
        detached.
    log_odds_ratio: scalar, the batch mean of log sigmoid(log odds ratio) (TRL's
        ``log_odds_ratio``), detached.
    log_odds_chosen: scalar, the batch mean of the log odds ratio (TRL's
        ``log_odds_chosen``), detached.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    nll_loss: torch.Tensor
    log_odds_ratio: torch.Tensor
    log_odds_chosen: torch.Tensor


class KTOLossOutput(NamedTuple):
    """What `kto_loss` returns, fp32 (fp64 for fp64 inputs).

    loss: a scalar (reduction "mean" or "sum", over all B examples as TRL's mean of the
        two groups' concatenated losses) or ``[B]`` ("none", in input order), differentiable.
    rewards: ``[B]`` beta * (policy_logps - ref_logps) of every example, detached.
    chosen_reward, rejected_reward: scalars, the mean reward of the desirable and of the
        undesirable examples (TRL's ``rewards/chosen`` and ``rewards/rejected``); NaN for a
        group with no example (TRL logs nothing then), detached.
    reward_margin: scalar, chosen_reward - rejected_reward (TRL's ``rewards/margins``).
    kl: scalar, the KL estimate the loss used: kl_ref clamped at 0 (0 without one).
    """

    loss: torch.Tensor
    rewards: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    reward_margin: torch.Tensor
    kl: torch.Tensor

# ------------------------------------------------------------------ token_divergence

#: The divergences of a student's token distribution q from a teacher's p
#: (`reference.token_divergence`): KL(p || q), KL(q || p), and TRL's generalized JSD.
DIVERGENCES = ("jsd", "forward_kl", "reverse_kl")
#: How `topk_token_divergence` treats the mass outside the teacher's top k (TRL's server
#: distillation's two ways): one more bucket holding it, or both distributions
#: renormalised over the k tokens.
TOPK_TAILS = ("bucket", "renormalize")
