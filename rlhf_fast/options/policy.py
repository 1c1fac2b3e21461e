"""The option sets of the policy-gradient family: ppo_loss (with verl's rollout-correction
specs, `rollout_is_bounds` and `rollout_rs_bounds`), gae, group_advantages and
optimal_token_baseline."""

from __future__ import annotations

import math
from collections.abc import Callable

from rlhf_fast.options.option_set import (
    Accepts,
    Checked,
    Option,
    OptionSet,
    flag,
    one_of,
    positive_int,
    real,
)
from rlhf_fast.types import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    ROLLOUT_IS_LEVELS,
    ROLLOUT_RS_MODES,
)

# --------------------------------------------------------------------------- ppo_loss


def _dual_clip_only_with_vanilla(values: Checked, label: Callable) -> None:
    if values.dual_clip is not None and values.policy_loss != "vanilla":
        raise ValueError(
            f"{label('dual_clip')} must be None for policy_loss {values.policy_loss!r} (dual "
            f"clip bounds vanilla's loss; dppo's ratio cap is clip_ratio_c), got "
            f"{values.dual_clip}")


def _rs_modes(spec: str) -> list[str]:
    return [part.strip() for part in spec.split(",") if part.strip()]


def rollout_rs_bounds(rollout_rs: str, rollout_rs_threshold: str | float | None
                      ) -> list[tuple[str, float | None, float]]:
    """verl's rejection-sampling spec as (mode, lower, upper) per criterion: one threshold
    for all or one per mode, comma-separated; a k1 mode's "lower_upper" bounds a ratio
    (a lone upper bound u means 1 / u below), the others take an upper bound (lower
    None). Raises ValueError naming rollout_rs_threshold."""
    modes = list(dict.fromkeys(_rs_modes(rollout_rs)))
    if isinstance(rollout_rs_threshold, (int, float)):  # the reference's unchecked options
        rollout_rs_threshold = repr(float(rollout_rs_threshold))
    specs = [] if rollout_rs_threshold is None else _rs_modes(rollout_rs_threshold)
    expected = (f"one threshold or {len(modes)} (one per mode of rollout_rs), comma-separated, "
                f"each a positive number or, for a k1 mode, \"lower_upper\"")
    if len(specs) not in (1, len(modes)):
        raise ValueError(f"rollout_rs_threshold must be {expected}, got {rollout_rs_threshold!r}")
    bounds = []
    for mode, spec in zip(modes, specs * len(modes) if len(specs) == 1 else specs):
        try:
            parts = [float(x) for x in spec.split("_")]
        except ValueError:
            parts = []
        ok = len(parts) in ((1, 2) if mode.endswith("k1") else (1,)) and all(
            0 < x < math.inf for x in parts)
        if not ok:
            raise ValueError(f"rollout_rs_threshold must be {expected}; {spec!r} for {mode}")
        if mode.endswith("k1"):
            lower, upper = parts if len(parts) == 2 else (1 / parts[0], parts[0])
            bounds.append((mode, lower, upper))
        else:
            bounds.append((mode, None, parts[0]))
    return bounds


ROLLOUT_IS_THRESHOLD_SPEC = ("a positive number u (truncated IS) or \"lower_upper\" with 0 <= "
                             "lower < upper <= inf (masked IS)")


def rollout_is_bounds(rollout_is_threshold: str | float) -> tuple[float | None, float]:
    """The IS weights' bounds of verl's rollout_is_threshold as (lower, upper): a number u
    truncates them at u (lower None: TIS); "lower_upper" (e.g. "0.5_2.0") zeroes those
    outside [lower, upper] (masked IS, IcePop; TRL's token_mask / sequence_mask with
    clip_min = lower, clip_max = upper). Raises ValueError naming rollout_is_threshold."""
    if isinstance(rollout_is_threshold, (int, float)) and not isinstance(
            rollout_is_threshold, bool):  # the reference's unchecked options
        rollout_is_threshold = repr(float(rollout_is_threshold))
    parts: list[float] = []
    if isinstance(rollout_is_threshold, str):
        try:
            parts = [float(x) for x in rollout_is_threshold.split("_")]
        except ValueError:
            parts = []
    if len(parts) == 1 and 0 < parts[0] < math.inf:
        return None, parts[0]
    if len(parts) == 2 and 0 <= parts[0] < parts[1] <= math.inf:
        return parts[0], parts[1]
    raise ValueError(f"rollout_is_threshold must be {ROLLOUT_IS_THRESHOLD_SPEC}, got "
                     f"{rollout_is_threshold!r}")


def _is_rollout_is_threshold(value: object) -> bool:
    try:
        rollout_is_bounds(value)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


#: TRL GRPOConfig's vllm_importance_sampling_mode values: the rollout_is level of each
TRL_IS_MODES = {"token_truncate": "token", "token_mask": "token",
                "sequence_truncate": "sequence", "sequence_mask": "sequence"}


def trl_is_clip_max(value: str | float | None) -> float:
    """TRL's vllm_importance_sampling_clip_max as a number: None (or "none") is no upper
    bound, inf."""
    return math.inf if value is None or str(value).lower() == "none" else float(value)


def trl_is_clip_min(value: str | float | None) -> float:
    """TRL's vllm_importance_sampling_clip_min as a number: None (or "none") is no lower
    bound, 0 (every ratio is positive)."""
    return 0.0 if value is None or str(value).lower() == "none" else float(value)


def rollout_is_from_trl(vllm_importance_sampling_correction: bool = True,
                        vllm_importance_sampling_mode: str = "sequence_mask",
                        vllm_importance_sampling_clip_max: str | float | None = 3.0,
                        vllm_importance_sampling_clip_min: str | float | None = None,
                        ) -> dict[str, object]:
    """rollout_is and rollout_is_threshold from TRL GRPOConfig's importance sampling of
    vLLM's log-probs (TRL's defaults for the names not given, so any of them turns it
    on, as TRL's vllm_importance_sampling_correction=True does): a *_mask mode is the
    masked IS "clip_min_clip_max" (0 and inf for a bound that is None), a *_truncate
    mode the truncation at clip_max; correction False is rollout_is None. TRL's
    truncation from below (clip_min with a *_truncate mode) has no equivalent here.
    Raises ValueError naming TRL's name."""
    correction = vllm_importance_sampling_correction
    if not isinstance(correction, bool):
        raise ValueError(f"vllm_importance_sampling_correction must be True or False, got "
                         f"{correction!r}")
    mode = vllm_importance_sampling_mode
    if mode not in TRL_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {tuple(TRL_IS_MODES)}, "
                         f"got {mode!r}")
    if not correction:
        return dict(rollout_is=None)
    try:
        upper = trl_is_clip_max(vllm_importance_sampling_clip_max)
    except (TypeError, ValueError):
        upper = math.nan
    try:
        lower = trl_is_clip_min(vllm_importance_sampling_clip_min)
    except (TypeError, ValueError):
        lower = math.nan
    if not upper > 0:
        raise ValueError(f"vllm_importance_sampling_clip_max must be a float > 0 or None, got "
                         f"{vllm_importance_sampling_clip_max!r}")
    if not 0 <= lower < math.inf:
        raise ValueError(f"vllm_importance_sampling_clip_min must be a finite float >= 0 or "
                         f"None, got {vllm_importance_sampling_clip_min!r}")
    if not lower < upper:
        raise ValueError(f"vllm_importance_sampling_clip_min ({lower}) must be less than "
                         f"vllm_importance_sampling_clip_max ({upper})")
    level = TRL_IS_MODES[mode]
    if mode.endswith("_mask"):
        return dict(rollout_is=level, rollout_is_threshold=f"{lower!r}_{upper!r}")
    if lower > 0:
        raise ValueError(
            f"vllm_importance_sampling_clip_min has no equivalent with "
            f"vllm_importance_sampling_mode {mode!r}: rollout_is_threshold truncates the "
            f"weights from above only (a *_mask mode takes a lower bound); got {lower}")
    if upper == math.inf:
        raise ValueError(f"vllm_importance_sampling_clip_max must be a float with "
                         f"vllm_importance_sampling_mode {mode!r} (the truncation's bound), "
                         f"got {vllm_importance_sampling_clip_max!r}")
    return dict(rollout_is=level, rollout_is_threshold=repr(upper))


def _rollout_rs_has_thresholds(values: Checked, label: Callable) -> None:
    if values.rollout_rs is not None:
        try:
            rollout_rs_bounds(values.rollout_rs, values.rollout_rs_threshold)
        except ValueError as error:
            raise ValueError(str(error).replace("rollout_rs_threshold",
                                                label("rollout_rs_threshold"), 1)) from None


PPO_OPTIONS = OptionSet((
    Option("policy_loss", "vanilla", one_of(POLICY_LOSSES),
           "the policy-gradient term, with verl's names (`reference.policy_terms` has each "
           "formula and the peers' differences)"),
    Option("clip_eps", 0.2, real(">= 0.0 and < 1.0", lambda v: 0 <= v < 1),
           "lower clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] "
           "(geo_mean: the log-ratio to [-clip_eps, clip_eps_high]; dppo_tv / dppo_kl: the "
           "divergence bound of a falling probability)"),
    Option("clip_eps_high", None, real(">= 0.0", lambda v: 0 <= v < math.inf, optional=True),
           "upper clip range (clip-higher, DAPO; TRL's epsilon_high; dppo: the bound of a "
           "rising probability); None: clip_eps"),
    Option("dual_clip", None, real("> 1.0", lambda v: 1 < v < math.inf, optional=True),
           "c bounding the loss of negative-advantage tokens at -A c (dual-clip PPO, vanilla "
           "only); None: off"),
    Option("tau_pos", 1.0, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "sapo: the gate's temperature for tokens with A > 0 (TRL's sapo_temperature_pos)"),
    Option("tau_neg", 1.05, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "sapo: the gate's temperature for tokens with A <= 0 (TRL's sapo_temperature_neg)"),
    Option("clip_cov_ratio", 0.0002, real("in (0, 1]", lambda v: 0 < v <= 1),
           "clip_cov: the share of valid tokens whose policy gradient is dropped"),
    Option("clip_cov_lb", 1.0, real("finite", math.isfinite),
           "clip_cov: the covariance above which a token may be dropped"),
    Option("clip_cov_ub", 5.0, real("finite", math.isfinite),
           "clip_cov: the covariance below which a token may be dropped"),
    Option("kl_cov_ratio", 0.0002, real("in (0, 1]", lambda v: 0 < v <= 1),
           "kl_cov: the share of valid tokens, those of largest covariance, that get the "
           "|log-ratio| penalty"),
    Option("ppo_kl_coef", 1.0, real(">= 0.0", lambda v: 0 <= v < math.inf),
           "kl_cov: the weight of that penalty"),
    Option("dro_beta", 0.1, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "dro: the weight of its quadratic log-ratio penalty"),
    Option("clip_ratio_c", 20.0, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "dppo_tv / dppo_kl: the cap of their detached ratio (verl's clip_ratio_c)"),
    Option("kl_coef", 0.0, real(">= 0.0", lambda v: 0 <= v < math.inf),
           "weight of the KL to the reference (needs ref_logp when > 0)"),
    Option("kl_estimator", "k3", one_of(KL_ESTIMATORS),
           "estimator of KL(pi || pi_ref) per token (verl's names; `reference.kl_penalty`)"),
    Option("use_bias_correction_kl", False, flag(),
           "multiply each token's KL by its ratio r, gradient included (TRL's importance-"
           "sampling correction of a KL estimated on pi_old's samples)"),
    Option("entropy_coef", 0.0, real("finite", math.isfinite),
           "weight of the entropy bonus, subtracted from the loss (needs entropy when != 0)"),
    Option("value_clip", 0.2, real(">= 0.0 (inf: no clipping)", lambda v: v >= 0),
           "clip of the new values around old_values"),
    Option("vf_coef", 0.5, real(">= 0.0", lambda v: 0 <= v < math.inf),
           "weight of the value loss"),
    Option("agg", "token-mean", one_of(AGG_MODES),
           "how each term's token values reduce to a scalar: token-mean (sum / valid tokens), "
           "seq-mean-token-mean (mean over non-empty rows of each row's mean), "
           "seq-mean-token-sum (mean over non-empty rows of each row's sum), "
           "seq-mean-token-sum-norm (sum / (B * max_len), Dr. GRPO), token-sum (the sum)"),
    Option("max_len", None, positive_int(optional=True),
           "the constant of seq-mean-token-sum-norm; None: T. The other modes do not read it "
           "(as TRL's max_completion_length: a trainer may pass its generation length "
           "whatever the mode)"),
    Option("batch_num_tokens", None, positive_int(optional=True),
           "token-mean's divisor: the valid tokens of the global batch (every rank and "
           "micro-batch; verl's batch_num_tokens, TRL's num_items_in_batch); None: this "
           "call's"),
    Option("global_batch_size", None, positive_int(optional=True),
           "the sequences of the global batch: the divisor of the seq-mean modes (None: "
           "this call's non-empty rows) and the B of seq-mean-token-sum-norm (None: this "
           "call's B)"),
    Option("dp_size", 1, positive_int(),
           "the data-parallel ranks whose gradients are averaged: every term is multiplied "
           "by it, so that the average over ranks of per-rank losses on global counts is "
           "the global batch's loss (verl's dp_size)"),
    Option("top_entropy_quantile", 1.0, real("in (0, 1]", lambda v: 0 < v <= 1),
           "the policy term only on the tokens whose entropy is in this top share of the "
           "call's (TRL's; needs entropy); 1: every token"),
    Option("off_policy_mask_threshold", None, real(">= 0.0", lambda v: 0 <= v < math.inf,
                                                   optional=True),
           "drop the policy term of a token with A < 0 in a sequence whose mean of "
           "log pi_sampling - log pi_theta exceeds it (DeepSeek-V3.2's off-policy sequence "
           "mask, TRL's; pi_sampling: rollout_logp, else old_logp); None: off"),
    Option("rollout_is", None, one_of(ROLLOUT_IS_LEVELS, optional=True),
           "rollout correction (needs rollout_logp, or bypass_mode): importance weights "
           "pi_old / pi_rollout per token or per sequence on the policy term; None: none"),
    Option("rollout_is_threshold", "2.0", Accepts(
        str, ROLLOUT_IS_THRESHOLD_SPEC, _is_rollout_is_threshold, numbers_as_text=True),
           "the bounds of the IS weights (`rollout_is_bounds`): a number truncates them at "
           "it (TIS); \"lower_upper\" sets those outside [lower, upper] to 0 (masked IS, "
           "IcePop; TRL's token_mask / sequence_mask), the tokens staying in the mask and "
           "the aggregation's counts; with rollout_is \"sequence\" whole rows. A number comes "
           "back as its text"),
    Option("rollout_is_batch_normalize", False, flag(),
           "divide the IS weights (truncated or masked) by their mean over this call's valid "
           "tokens (rows for sequence; verl averages over every rank)"),
    Option("rollout_rs", None, Accepts(
        str, f"None or a comma-separated list of {ROLLOUT_RS_MODES}",
        lambda v: bool(_rs_modes(v)) and all(m in ROLLOUT_RS_MODES for m in _rs_modes(v)),
        optional=True),
           "rejection sampling: tokens (token_*) or sequences (seq_*) whose divergence from "
           "the rollout passes rollout_rs_threshold leave the mask of every term"),
    Option("rollout_rs_threshold", None, Accepts(
        str, "None, a positive number or a comma-separated verl spec (\"lower_upper\" for "
        "k1 modes)", optional=True, numbers_as_text=True),
           "the bounds of rollout_rs, one or one per mode (verl's spec)"),
), rules=(_dual_clip_only_with_vanilla, _rollout_rs_has_thresholds))


# --------------------------------------------------------------------------- gae

GAE_OPTIONS = OptionSet((
    Option("gamma", 1.0, real("a float in [0, 1]", lambda v: 0 <= v <= 1),
           "discount of the next valid token's value"),
    Option("lam", 0.95, real("a float in [0, 1]", lambda v: 0 <= v <= 1),
           "GAE lambda: 0 is the one-step TD error, 1 the Monte-Carlo return minus V"),
))


# --------------------------------------------------------------------- group_advantages

GROUP_ADVANTAGE_OPTIONS = OptionSet((
    Option("estimator", "grpo", one_of(ADVANTAGE_ESTIMATORS),
           "the baseline and scale of each score, verl's names (`reference.group_advantages` "
           "has each formula)"),
    Option("scale", "std", one_of(("std", "batch"), optional=True),
           "grpo and grpo_passk: divide by the group's std + eps (TRL's scale_rewards="
           "'group'), by the batch's ('batch'), or not (None: Dr. GRPO, TRL's 'none')"),
    Option("eps", 1e-6, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "added to the std it divides by"),
))


# --------------------------------------------------------------- optimal_token_baseline

OPTIMAL_TOKEN_BASELINE_OPTIONS = OptionSet((
    Option("handle_zero_tail", False, flag(),
           "verl's option: the baseline is 0 past the second-longest answer of a group on "
           "the tokens of its one longest answer (which alone would be its own baseline)"),
    Option("eps", 1e-8, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "added to each column's sum of path weights it divides by"),
))

