"""The option sets of the preference losses: dpo_loss (and `dpo_terms`, the weighted mix it
sums), pair_logps and the DPO options read per token, simpo_loss, cpo_loss, orpo_loss and
kto_loss."""

from __future__ import annotations

import math
from collections.abc import Callable

from rlhf_fast.options.option_set import (
    Checked,
    OneOrMore,
    Option,
    OptionSet,
    Reals,
    flag,
    one_of,
    real,
)
from rlhf_fast.types import (
    CPO_LOSS_TYPES,
    DPO_F_DIVERGENCES,
    DPO_LABEL_SMOOTHING_TYPES,
    DPO_MIX_TYPES,
    DPO_RAW_LOG_RATIO_TYPES,
    DPO_REDUCTIONS,
    DPO_SFT,
    DPO_SORTED_TYPES,
    PREFERENCE_REDUCTIONS,
)

# --------------------------------------------------------------------------- dpo_loss


def dpo_loss_types(values: Checked) -> tuple[str, ...]:
    """The loss types of checked DPO options, as a tuple (`loss_type` is a str or a tuple)."""
    return (values.loss_type,) if isinstance(values.loss_type, str) else tuple(values.loss_type)


def dpo_terms(values: Checked) -> tuple[tuple[str, float], ...]:
    """The (loss type, weight) terms whose weighted sum `dpo_loss` returns: loss_type with
    loss_weights (1 each by default), then ("sft", rpo_alpha) when rpo_alpha is set."""
    kinds = dpo_loss_types(values)
    weights = values.loss_weights or (1.0,) * len(kinds)
    terms = tuple(zip(kinds, weights))
    if values.rpo_alpha is not None:
        terms += ((DPO_SFT, values.rpo_alpha),)
    return terms


def _dpo_options_read(values: Checked, label: Callable) -> None:
    """Each option set away from its default must be read by a type of the mix; a mix's
    parts must fit together."""
    kinds = dpo_loss_types(values)
    if values.loss_weights is not None and len(values.loss_weights) != len(kinds):
        raise ValueError(f"{label('loss_weights')} must have one weight per loss_type "
                         f"({len(kinds)}: {kinds}), got {values.loss_weights}")
    if values.rpo_alpha is not None and DPO_SFT in kinds:
        raise ValueError(f"{label('rpo_alpha')} adds the sft term, which loss_type {kinds} "
                         f"already has: give one of them, got {values.rpo_alpha}")
    if values.label_smoothing != 0 and not set(kinds) & set(DPO_LABEL_SMOOTHING_TYPES):
        raise ValueError(
            f"{label('label_smoothing')} must be 0 for loss_type {values.loss_type!r} (it is "
            f"read only by {DPO_LABEL_SMOOTHING_TYPES}), got {values.label_smoothing}"
        )
    raw = [kind for kind in kinds if kind in DPO_RAW_LOG_RATIO_TYPES]
    if values.f_divergence_type != "reverse_kl" and raw:
        raise ValueError(
            f"{label('f_divergence_type')} must be 'reverse_kl' for loss_type {raw[0]!r} (it "
            f"compares the raw log-ratios, as TRL's), got {values.f_divergence_type!r}")
    if values.f_alpha_divergence_coef != 0.5 and values.f_divergence_type != "alpha_divergence":
        raise ValueError(
            f"{label('f_alpha_divergence_coef')} is read only by f_divergence_type "
            f"'alpha_divergence'; leave it at 0.5, got {values.f_alpha_divergence_coef}")
    if values.discopop_tau != 0.05 and "discopop" not in kinds:
        raise ValueError(f"{label('discopop_tau')} is read only by loss_type 'discopop'; "
                         f"leave it at 0.05, got {values.discopop_tau}")
    if values.reduction == "none" and len(dpo_terms(values)) > 1 and set(kinds) & set(
            DPO_SORTED_TYPES):
        raise ValueError(f"{label('reduction')} must be 'mean' or 'sum' for a mix with "
                         f"{DPO_SORTED_TYPES} (their losses are of sorted positions, not "
                         f"of pairs), got 'none'")


DPO_OPTIONS = OptionSet((
    Option("beta", 0.1, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "the KL-regularisation strength (IPO's tau for ipo); rewards are beta * log-ratios"),
    Option("loss_type", "sigmoid", OneOrMore(str, f"one of {DPO_MIX_TYPES}",
                                             lambda v: v in DPO_MIX_TYPES),
           "the pairwise loss (`rlhf_fast.reference.dpo_loss` has each formula), or a list "
           "of them summed with loss_weights (TRL's MPO mixes sigmoid, bco_pair and sft)"),
    Option("loss_weights", None, Reals(float, "that are finite", math.isfinite,
                                       optional=True),
           "the weight of each loss_type in the sum (TRL's); None: 1 each"),
    Option("label_smoothing", 0.0, real("in [0, 0.5)", lambda v: 0 <= v < 0.5),
           "probability that a preference label is flipped (sigmoid, sigmoid_norm, robust, "
           "exo_pair, aot, aot_unpaired; exo_pair's 0 means 1e-3; in a mix, those of them "
           "there)"),
    Option("reduction", "mean", one_of(DPO_REDUCTIONS),
           "mean or sum over the batch, or none for the [B] losses"),
    Option("f_divergence_type", "reverse_kl", one_of(DPO_F_DIVERGENCES),
           "TRL's f-divergence regulariser (f-DPO, Wang et al. 2023): the loss compares "
           "f(log-ratio) scores; reverse_kl is DPO"),
    Option("f_alpha_divergence_coef", 0.5,
           real("a finite float", lambda v: -math.inf < v < math.inf),
           "alpha of f_divergence_type alpha_divergence (1: reverse_kl)"),
    Option("discopop_tau", 0.05, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "temperature of discopop's blend of the logistic and exponential losses"),
    Option("rpo_alpha", None, real("a finite float >= 0", lambda v: 0 <= v < math.inf,
                                   optional=True),
           "RPO (Pang et al. 2024): the sft term (the chosen answers' NLL per token) added "
           "with this weight, as TRL's former rpo_alpha (now its loss_type [..., 'sft'] with "
           "loss_weights); None: none"),
), rules=(_dpo_options_read,))

#: LD-DPO's option, read where the per-token log-probs are (`pair_logps`).
PAIR_LOGPS_OPTIONS = OptionSet((
    Option("ld_alpha", None, real("in [0, 1]", lambda v: 0 <= v <= 1, optional=True),
           "LD-DPO (Liu et al. 2024; TRL's): each answer's log-prob is the sum over its "
           "first tokens, as many as its pair's shorter answer has, plus ld_alpha times the "
           "sum over the rest (the verbose tail); None: the plain sums"),
))

#: The DPO options that need per-token log-probs: the hidden-state path and the trainer.
DPO_TOKEN_OPTIONS = PAIR_LOGPS_OPTIONS + OptionSet((
    Option("use_weighting", False, flag(),
           "WPO (Zhou et al. 2024; TRL's): each term of each pair weighted by its two "
           "answers' exp(mean over the answer of log p_t - log sum_j p_j^2), detached"),
))


# ------------------------------------------- simpo_loss, cpo_loss, orpo_loss, kto_loss


def _beta(doc: str) -> Option:
    return Option("beta", 0.1, real("a finite float > 0", lambda v: 0 < v < math.inf), doc)


def _reduction(doc: str) -> Option:
    return Option("reduction", "mean", one_of(PREFERENCE_REDUCTIONS), doc)


_LABEL_SMOOTHING_DOC = "probability that a preference label is flipped (conservative form"

SIMPO_OPTIONS = OptionSet((
    _beta("the scale of the per-token-mean log-probs; rewards are beta * mean log-prob "
          "(TRL CPOConfig's and Liger's default 0.1; the SimPO paper uses 2 to 10)"),
    Option("gamma", 0.5, real("finite", math.isfinite),
           "the target reward margin, subtracted from beta times the mean log-prob "
           "difference (Liger's gamma, TRL's simpo_gamma; the SimPO code's gamma_beta_ratio "
           "r is gamma = r * beta)"),
    Option("label_smoothing", 0.0, real("in [0, 0.5)", lambda v: 0 <= v < 0.5),
           _LABEL_SMOOTHING_DOC + ")"),
    _reduction("mean or sum over the pairs, or none for the [B] losses"),
))


def _cpo_label_smoothing_only_for_sigmoid(values: Checked, label: Callable) -> None:
    if values.label_smoothing != 0 and values.loss_type != "sigmoid":
        raise ValueError(
            f"{label('label_smoothing')} must be 0 for {label('loss_type')} "
            f"{values.loss_type!r} (only 'sigmoid' reads it, as in TRL's CPOTrainer), got "
            f"{values.label_smoothing}")


CPO_OPTIONS = OptionSet((
    _beta("the scale of the log-prob difference (IPO's tau for ipo); rewards are "
          "beta * log-probs"),
    Option("loss_type", "sigmoid", one_of(CPO_LOSS_TYPES),
           "cpo_loss's preference term, TRL CPOTrainer's loss_type names "
           "(`rlhf_fast.reference.cpo_loss` has each formula); ipo on per-token-mean "
           "log-probs"),
    Option("label_smoothing", 0.0, real("in [0, 0.5)", lambda v: 0 <= v < 0.5),
           _LABEL_SMOOTHING_DOC + "; sigmoid only)"),
    Option("alpha", 1.0, real(">= 0.0", lambda v: 0 <= v < math.inf),
           "the weight of the chosen answers' NLL (the behaviour-cloning term: TRL's "
           "cpo_alpha, Liger's alpha; not TRL's AlphaPO alpha)"),
    _reduction("mean or sum over the pairs of preference loss + alpha * NLL, or none for "
               "the [B] values"),
), rules=(_cpo_label_smoothing_only_for_sigmoid,))

ORPO_OPTIONS = OptionSet((
    _beta("the weight of the odds-ratio term (the ORPO paper's lambda); rewards are "
          "beta * mean log-prob"),
    _reduction("mean or sum over the pairs of NLL - beta * log s(log odds ratio), or none "
               "for the [B] values"),
))


def _weight(name: str, doc: str) -> Option:
    return Option(name, 1.0, real("a finite float >= 0", lambda v: 0 <= v < math.inf), doc)


KTO_OPTIONS = OptionSet((
    _beta("the scale of the log-ratios to the reference; rewards are beta * log-ratio"),
    _weight("desirable_weight", "the weight of each desirable example's loss"),
    _weight("undesirable_weight", "the weight of each undesirable example's loss"),
    _reduction("mean or sum over all B examples, or none for the [B] losses"),
))

