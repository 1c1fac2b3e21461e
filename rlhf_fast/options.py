"""Every option set of rlhf-fast, declared once.

An option is a keyword setting of a loss (a clip range, a coefficient, a mode): its name,
default, accepted values and one line of documentation are written here and nowhere else.
From each `OptionSet` come

* the keyword arguments of the functional ops and of `rlhf_fast.reference` (their
  signatures and the "Options" part of their docstrings, `OptionSet.keywords`), and the
  checks of those arguments, whose errors name the argument (`OptionSet.check`);
* the constructor of the loss modules (`PPOLoss`, `DPOLoss`);
* the fields of the trainer configs and, through them, the CLI flags (`OptionSet.fields`),
  whose errors name the field (``PPOConfig.clip_eps must be ...``).

Adding an option to a loss is one `Option` in its set here, plus its math: the reference,
the kernel, and their tests.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_fast.ops.checks import INT64_MAX, INT64_MIN, check_fp32, specialised
from rlhf_fast.types import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    CPO_LOSS_TYPES,
    DIVERGENCES,
    DPO_F_DIVERGENCES,
    DPO_LABEL_SMOOTHING_TYPES,
    DPO_MIX_TYPES,
    DPO_RAW_LOG_RATIO_TYPES,
    DPO_REDUCTIONS,
    DPO_SFT,
    DPO_SORTED_TYPES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PREFERENCE_REDUCTIONS,
    ROLLOUT_IS_LEVELS,
    ROLLOUT_RS_MODES,
    TOPK_TAILS,
)


@dataclass(frozen=True)
class Accepts:
    """The values an option accepts: `test` on the value of the right `kind`, described as
    `expected` in errors ("clip_eps must be >= 0.0 and < 1.0, got 1.5")."""

    kind: type  # float, int, str or bool (an int is accepted as a float)
    expected: str
    test: Callable[[Any], bool] = lambda value: True
    optional: bool = False  # None is accepted too
    numbers_as_text: bool = False  # a str option that takes a number as its str too

    @property
    def annotation(self) -> Any:
        return self.kind | None if self.optional else self.kind

    def __call__(self, name: str, value: Any) -> Any:
        """`value` checked and normalised (ints to floats for float options, which the
        kernels take as fp32), or TypeError / ValueError naming `name`."""
        if value is None and self.optional:
            return None
        if self.numbers_as_text and isinstance(value, (int, float)) and not isinstance(
                value, bool):
            value = repr(float(value))
        kinds = (int, float) if self.kind is float else (self.kind,)
        wrong_type = (isinstance(value, bool) and self.kind is not bool) or not isinstance(
            value, kinds)
        if wrong_type and self.kind is not str:  # a str option's error lists its choices
            raise TypeError(
                f"{name} must be {self._a_kind()}, got {type(value).__name__} {value!r}")
        if self.kind is float:
            value = float(value)
        if not self.test(value):
            raise ValueError(f"{name} must be {self.expected}, got {value!r}")
        return check_fp32(name, value) if self.kind is float else value

    def _a_kind(self) -> str:
        kind = {float: "a float", int: "an int", str: "a str", bool: "a bool"}[self.kind]
        return f"{kind} or None" if self.optional else kind


def real(expected: str, test: Callable[[float], bool], *, optional: bool = False) -> Accepts:
    """A float setting (NaN never passes `test`: every comparison with it is False)."""
    return Accepts(float, expected, test, optional)


def one_of(choices: tuple[str, ...], *, optional: bool = False) -> Accepts:
    return Accepts(str, f"one of {choices}" + (" or None" if optional else ""),
                   lambda value: value in choices, optional)


@dataclass(frozen=True)
class OneOrMore(Accepts):
    """A choice that takes a list of its values too (a weighted mix of losses): one value
    comes back a str, several a tuple of them."""

    @property
    def annotation(self) -> Any:
        return str | list[str]

    def __call__(self, name: str, value: Any) -> Any:
        values = [value] if isinstance(value, str) else value
        if not (isinstance(values, (list, tuple)) and values
                and all(isinstance(v, str) for v in values)):
            raise ValueError(f"{name} must be {self.expected} or a non-empty list of them, "
                             f"got {value!r}")
        for item in values:
            if not self.test(item):
                raise ValueError(f"{name} must be {self.expected} (or a list of them), got "
                                 f"{item!r}")
        return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class Reals(Accepts):
    """A list of floats, each passing `test`, or None (when optional); comes back a tuple."""

    @property
    def annotation(self) -> Any:
        return list[float] | None if self.optional else list[float]

    def __call__(self, name: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if not (isinstance(value, (list, tuple)) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise TypeError(f"{name} must be a non-empty list of floats"
                            + (" or None" if self.optional else "") + f", got {value!r}")
        for item in value:
            if not self.test(float(item)):
                raise ValueError(f"{name} must hold floats {self.expected}, got {item!r}")
        return tuple(check_fp32(name, float(item)) for item in value)


def flag(*, optional: bool = False) -> Accepts:
    return Accepts(bool, "a bool or None" if optional else "a bool", optional=optional)


class Checked:
    """Checked option values as attributes: a SimpleNamespace that torch.compile traces
    (Dynamo follows ``setattr`` and ``vars()`` on a plain class, not on SimpleNamespace)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Checked) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Checked({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


#: OptionSet.check's results: (id of the set, owner, the given options) -> checked values
_CHECKED: dict[tuple, Checked] = {}


#: every OptionSet by its `key` (an argument Dynamo can hold as a constant)
_OPTION_SETS: dict[int, OptionSet] = {}


@torch.compiler.assume_constant_result
def _checked_while_tracing(key: int, given: dict[str, Any], owner: str | None) -> Checked:
    # Dynamo calls this with the constant values and puts its result in the graph as a
    # constant: the checks are host-side Python it need not (and could not all) trace.
    return _OPTION_SETS[key]._cached_check(given, owner)


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    accepts: Accepts
    doc: str


@dataclass(frozen=True)
class OptionSet:
    """The options of one loss family. `rules` check combinations of options: each takes
    the checked values and a function naming a field in errors, and raises ValueError."""

    options: tuple[Option, ...]
    rules: tuple[Callable[[Checked, Callable[[str], str]], None], ...] = ()

    def __post_init__(self) -> None:
        _OPTION_SETS[self.key] = self

    @property
    def key(self) -> int:
        return id(self)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(option.name for option in self.options)

    def __add__(self, other: OptionSet) -> OptionSet:
        """The options of an op that takes both sets (linear_ppo_loss: token and PPO)."""
        return OptionSet(self.options + other.options, self.rules + other.rules)

    def pick(self, values: Mapping[str, Any] | Checked) -> dict[str, Any]:
        """The entries of `values` (a dict or checked options) that are options of this set."""
        values = vars(values) if isinstance(values, Checked) else values
        return {name: values[name] for name in self.names if name in values}

    def fill(self, given: Mapping[str, Any]) -> Checked:
        """`given` with the defaults of the options it lacks, unchecked (the reference's
        way: it is the math, not the validation). Unknown names raise TypeError."""
        unknown = sorted(set(given) - set(self.names))
        if unknown:
            raise TypeError(f"unexpected option {unknown[0]!r}; the options are {self.names}")
        return Checked(**{o.name: given.get(o.name, o.default) for o in self.options})

    def check(self, given: Mapping[str, Any], owner: str | None = None) -> Checked:
        """`given` filled with defaults, each value checked and normalised, then the rules.
        Errors name the option, as ``owner.name`` when an `owner` (a config class) is given.
        A call repeating the options of an earlier one (the same names, types and values)
        takes its result from a cache: an op's options are checked once per training run,
        not at every step. The result is the caller's to change.

        Under torch.compile the check runs once, while Dynamo traces, on the options'
        values: constants of the graph, guarded, so that another value compiles another
        graph (past torch's recompile limit, 8, Dynamo runs the function eagerly). A
        number torch's automatic dynamic made symbolic (one that changed between calls)
        is specialised to its value first."""
        if torch.compiler.is_compiling():
            given = {name: specialised(value) for name, value in given.items()}
            return _checked_while_tracing(self.key, given, owner)
        return self._cached_check(given, owner)

    def _cached_check(self, given: Mapping[str, Any], owner: str | None) -> Checked:
        # the types are part of the key: True == 1 == 1.0, but only 1 and 1.0 are floats
        key = (id(self), owner, *sorted((name, type(value), value)
                                        for name, value in given.items()))
        try:
            checked = _CHECKED.get(key)
        except TypeError:  # an unhashable value: checked (and refused) every time
            return self._check(given, owner)
        if checked is None:
            checked = self._check(given, owner)
            if len(_CHECKED) >= 4096:
                _CHECKED.clear()
            _CHECKED[key] = checked
        return Checked(**vars(checked))

    def _check(self, given: Mapping[str, Any], owner: str | None) -> Checked:
        filled = self.fill(given)
        label = (lambda name: f"{owner}.{name}") if owner else (lambda name: name)
        for option in self.options:
            value = option.accepts(label(option.name), getattr(filled, option.name))
            setattr(filled, option.name, value)
        for rule in self.rules:
            rule(filled, label)
        return filled

    def keywords(self, function: Callable) -> Callable:
        """Decorator of a function taking these options as ``**options``: its signature
        (for `inspect`, `help` and IDEs) and docstring list them, with defaults and docs."""
        signature = inspect.signature(function)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                                     annotation=o.accepts.annotation) for o in self.options]
        function.__signature__ = signature.replace(parameters=params)
        function.__doc__ = (function.__doc__ or "").rstrip() + "\n\n" + self.docs()
        return function

    def docs(self) -> str:
        """The options as a docstring section, one line each (continued when long)."""
        lines = ["    Options (declared in `rlhf_fast.options`):"]
        for o in self.options:
            text = f"{o.name}: {o.doc} ({o.accepts.expected}; default {o.default!r})."
            lines += textwrap.wrap(text, 92, initial_indent=" " * 8, break_on_hyphens=False,
                                   subsequent_indent=" " * 12)
        return "\n".join(lines) + "\n"

    def fields(self, *, exclude: Iterable[str] = (), defaults: Mapping[str, Any] | None = None,
               after: str | None = None) -> Callable[[type], type]:
        """Class decorator, under ``@dataclass``: adds these options (but `exclude`) to a
        config class as fields, after the field `after` (default: at the end), with the
        trainer's own `defaults` where they differ; each field's doc in its metadata.
        The config's ``__post_init__`` checks them with ``check_fields``."""
        defaults = dict(defaults or {})
        chosen = [o for o in self.options if o.name not in set(exclude)]
        unknown = set(defaults) - {o.name for o in chosen}
        if unknown:
            raise ValueError(f"defaults for options not declared here: {sorted(unknown)}")

        def add(cls: type) -> type:
            own = dict(cls.__dict__.get("__annotations__", {}))
            new = {o.name: o.accepts.annotation for o in chosen}
            names = list(own)
            at = names.index(after) + 1 if after is not None else len(names)
            order = names[:at] + list(new) + names[at:]
            cls.__annotations__ = {n: new[n] if n in new else own[n] for n in order}
            for o in chosen:
                setattr(cls, o.name, dataclasses.field(
                    default=defaults.get(o.name, o.default),
                    metadata={"doc": f"{o.doc} ({o.accepts.expected})"}))
            cls.option_set = self
            return cls

        return add

    def check_fields(self, config: Any) -> None:
        """Check the options that `config` (a dataclass built with `fields`) holds as fields;
        the errors are ValueError and name ``ConfigClass.field``."""
        given = {n: getattr(config, n) for n in self.names if hasattr(config, n)}
        values = self.check_as_values(given, type(config).__name__)
        for name in given:
            setattr(config, name, getattr(values, name))

    def check_as_values(self, given: Mapping[str, Any], owner: str) -> Checked:
        """`check` where a wrong type is a wrong value (a config field, a CLI flag)."""
        try:
            return self.check(given, owner)
        except TypeError as error:
            raise ValueError(str(error)) from None


# --------------------------------------------------------------------------- ppo_loss


def positive_int(*, optional: bool = False) -> Accepts:
    """An int in [1, INT64_MAX] (a count or a length), or None when optional."""
    return Accepts(int, "a positive int (int64)" + (" or None" if optional else ""),
                   lambda v: not isinstance(v, bool) and isinstance(v, int)
                   and 1 <= v <= INT64_MAX, optional)


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
    Option("rollout_is_threshold", 2.0, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "the truncation of the IS weights (TIS)"),
    Option("rollout_is_batch_normalize", False, flag(),
           "divide the truncated IS weights by their batch mean (per sequence for sequence)"),
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
            f"{label('label_smoothing')} must be 0 for loss_type {values.loss_type!r} (only "
            f"'sigmoid' reads it, as in TRL's CPOTrainer), got {values.label_smoothing}")


CPO_OPTIONS = OptionSet((
    _beta("the scale of the log-prob difference (IPO's tau for ipo); rewards are "
          "beta * log-probs"),
    Option("loss_type", "sigmoid", one_of(CPO_LOSS_TYPES),
           "the preference term, TRL CPOTrainer's names (`rlhf_fast.reference.cpo_loss` "
           "has each formula); ipo on per-token-mean log-probs"),
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


# --------------------------------------------------------------- token log-probs

TOKEN_OPTIONS = OptionSet((
    Option("temperature", 1.0, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "the logits are divided by it (1 / temperature reaches the kernels as two fp32 "
           "halves: exact to ~48 bits)"),
    Option("ignore_index", -100, Accepts(int, f"an int in [{INT64_MIN}, {INT64_MAX}] (int64)",
                                         lambda v: INT64_MIN <= v <= INT64_MAX),
           "labels equal to it give log-prob 0, entropy 0 and no gradient"),
))

#: The ops' own: the reference does not check labels.
LABEL_CHECK = OptionSet((
    Option("check_labels", None, flag(optional=True),
           "raise for labels outside [0, V) but ignore_index; None: on for CPU tensors, off "
           "for CUDA ones (the check needs a device sync); unchecked, such a row is NaN"),
))

#: What the log-prob ops take: the token options and the label check.
LOGPROB_OPTIONS = TOKEN_OPTIONS + LABEL_CHECK


# --------------------------------------------------------------- token_divergence


def _beta_only_with_jsd(values: Checked, label: Callable) -> None:
    if values.divergence != "jsd" and values.beta != 0.5:
        raise ValueError(
            f"{label('beta')} is read only by divergence 'jsd' (beta 0: forward KL, 1: "
            f"reverse KL); leave it at 0.5 for {values.divergence!r}, got {values.beta}")


#: What `token_divergence` takes beside the token options (temperature, ignore_index).
DIVERGENCE_OPTIONS = TOKEN_OPTIONS + OptionSet((
    Option("divergence", "jsd", one_of(DIVERGENCES),
           "jsd: TRL's generalized Jensen-Shannon divergence (beta weights the teacher); "
           "forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher)"),
    Option("beta", 0.5, real("in [0, 1]", lambda v: 0 <= v <= 1),
           "jsd's mixture weight of the teacher, m = beta p + (1 - beta) q; 0 and 1 give "
           "the forward and reverse KL, as TRL's GKD and Liger's JSD define them"),
), rules=(_beta_only_with_jsd,))

#: `topk_token_divergence`'s: the divergence options and the tail's treatment.
TOPK_DIVERGENCE_OPTIONS = DIVERGENCE_OPTIONS + OptionSet((
    Option("tail", "bucket", one_of(TOPK_TAILS),
           "bucket: the mass outside the top k is one more outcome of both distributions "
           "(1 - their top-k sums); renormalize: both renormalised over the top k (TRL's "
           "server distillation, loss_add_tail True / False)"),
))
