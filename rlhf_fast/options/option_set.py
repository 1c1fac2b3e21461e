"""The option mechanism: what a value must be (`Accepts` and its makers `real`, `one_of`,
`flag`, `positive_int`, ...), an `Option`, and an `OptionSet`, from which the ops' keyword
arguments and their checks, the loss modules' constructors and the trainer configs'
fields come (`rlhf_fast.options` says how). The sets themselves are declared beside it:
`policy`, `preference` and `tokens`.
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_fast.ops.checks import INT64_MAX, check_fp32, specialised


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

    def _check(self, given: Mapping[str, Any], owner: str | None,
               renames: Mapping[str, str] | None = None) -> Checked:
        filled = self.fill(given)
        renames = renames or {}
        label = ((lambda name: f"{owner}.{renames.get(name, name)}") if owner
                 else (lambda name: name))
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
               after: str | None = None,
               rename: Mapping[str, str] | None = None) -> Callable[[type], type]:
        """Class decorator, under ``@dataclass``: adds these options (but `exclude`) to a
        config class as fields, after the field `after` (default: at the end), with the
        trainer's own `defaults` where they differ; each field's doc in its metadata.
        `rename` maps an option to its field's name where the config's own field of that
        name means something else (DPOConfig.cpo_loss_type: cpo_loss's loss_type); the
        class records it (`field_values`, `check_fields` and errors use it).
        The config's ``__post_init__`` checks them with ``check_fields``."""
        defaults, rename = dict(defaults or {}), dict(rename or {})
        chosen = [o for o in self.options if o.name not in set(exclude)]
        for what, names in (("defaults", defaults), ("renames", rename)):
            unknown = set(names) - {o.name for o in chosen}
            if unknown:
                raise ValueError(f"{what} for options not declared here: {sorted(unknown)}")

        def add(cls: type) -> type:
            own = dict(cls.__dict__.get("__annotations__", {}))
            new = {rename.get(o.name, o.name): o.accepts.annotation for o in chosen}
            names = list(own)
            at = names.index(after) + 1 if after is not None else len(names)
            order = names[:at] + list(new) + names[at:]
            cls.__annotations__ = {n: new[n] if n in new else own[n] for n in order}
            for o in chosen:
                setattr(cls, rename.get(o.name, o.name), dataclasses.field(
                    default=defaults.get(o.name, o.default),
                    metadata={"doc": f"{o.doc} ({o.accepts.expected})"}))
            if rename:
                cls.option_renames = {**getattr(cls, "option_renames", {}), self.key: rename}
            return cls

        return add

    def renames(self, config_class: type) -> dict[str, str]:
        """The fields of `config_class` that hold options of this set under other names
        (option -> field), as `fields` recorded them."""
        return getattr(config_class, "option_renames", {}).get(self.key, {})

    def field_values(self, config: Any) -> dict[str, Any]:
        """The options of this set that `config` holds as fields, by option name: each in
        its renamed field (`fields`), else in the field of its own name."""
        renames = self.renames(type(config))
        return {name: getattr(config, renames.get(name, name)) for name in self.names
                if hasattr(config, renames.get(name, name))}

    def check_fields(self, config: Any) -> None:
        """Check the options that `config` (a dataclass built with `fields`) holds as fields;
        the errors are ValueError and name ``ConfigClass.field``."""
        renames = self.renames(type(config))
        given = self.field_values(config)
        try:
            values = self._check(given, type(config).__name__, renames)
        except TypeError as error:
            raise ValueError(str(error)) from None
        for name in given:
            setattr(config, renames.get(name, name), getattr(values, name))


def positive_int(*, optional: bool = False) -> Accepts:
    """An int in [1, INT64_MAX] (a count or a length), or None when optional."""
    return Accepts(int, "a positive int (int64)" + (" or None" if optional else ""),
                   lambda v: not isinstance(v, bool) and isinstance(v, int)
                   and 1 <= v <= INT64_MAX, optional)
