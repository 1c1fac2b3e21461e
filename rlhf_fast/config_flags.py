"""The command-line flags of a trainer config dataclass: one per field, typed from its
annotation and documented from its docstring, plus TRL's names of fields as aliases; and
the config built back from the parsed flags (its checks' errors as usage errors)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any


def field_docs(config_class: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (its --help text), its base
    classes' fields included; a field a subclass redeclares takes the subclass's."""
    docs = {}
    for cls in reversed(config_class.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    for field in dataclasses.fields(config_class):  # fields an option set declares
        if "doc" in field.metadata:
            docs[field.name] = field.metadata["doc"]
    return docs


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of `config_class`: --field-name, typed from its annotation;
    bools as --x / --no-x; optional fields also take "none"."""
    hints = typing.get_type_hints(config_class)
    docs = field_docs(config_class)
    group = parser.add_argument_group(f"{config_class.__name__} fields")
    for field in dataclasses.fields(config_class):
        hint = hints[field.name]
        args = typing.get_args(hint)
        optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)
                    and type(None) in args)
        base = next(a for a in args if a is not type(None)) if optional else hint
        # str | list[str] (one loss type or a mix): a list of one or more on the CLI
        base = next((a for a in args if typing.get_origin(a) is list), base)
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{docs.get(field.name, '')} (default: {field.default})"
        if base is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=field.default, help=help_text)
        elif typing.get_origin(base) is list:  # one or more values: --reward-weights 1 0.5
            (item,) = typing.get_args(base)
            group.add_argument(flag, dest=field.name, type=item, nargs="+",
                               default=field.default, metavar=item.__name__.upper(),
                               help=help_text)
        else:
            convert = _none_or(base) if optional else base
            group.add_argument(flag, dest=field.name, type=convert, default=field.default,
                               metavar=base.__name__.upper(), help=help_text)
    add_trl_flags(parser, config_class, hints)


TRL_PREFIX = "trl_name_"


def add_trl_flags(parser: argparse.ArgumentParser, config_class: type,
                  hints: dict[str, Any]) -> None:
    """TRL's names of the config's fields as flags of their own (--beta, --loss-type,
    ...), when the config has them (`PPOConfig.from_trl_names`); one given beside its
    field's flag wins."""
    names = getattr(config_class, "trl_names", {})
    if not names:
        return
    group = parser.add_argument_group("TRL's names (aliases)")
    for name, (field, meaning) in names.items():
        convert = str if meaning is not None else _none_or(
            next(a for a in typing.get_args(hints[field]) or (hints[field],)
                 if a is not type(None)))
        what = f"TRL's name of --{field.replace('_', '-')}" if meaning is None else \
            f"TRL's {name}: one of {tuple(meaning)}"
        group.add_argument("--" + name.replace("_", "-"), dest=TRL_PREFIX + name,
                           type=convert, default=None, help=what,
                           metavar=convert.__name__.upper())


def config_from_args(config_class: type, args: argparse.Namespace,
                     parser: argparse.ArgumentParser) -> Any:
    """The config dataclass from the parsed flags; its checks' errors become usage
    errors."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    trl = {k[len(TRL_PREFIX):]: v for k, v in vars(args).items()
           if k.startswith(TRL_PREFIX) and v is not None}
    try:
        if trl:
            values |= config_class.from_trl_names(**trl)
        return config_class(**values)
    except ValueError as exc:
        parser.error(str(exc))
