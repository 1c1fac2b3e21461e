"""The command-line flags of a trainer config dataclass, built by transformers'
`HfArgumentParser` (the field's standard: the same flags as TRL's and transformers'
scripts), documented from each field's docstring, with TRL's names of fields as aliases;
the config built back from the parsed flags (its checks' errors as usage errors naming
the flag); and config files (``--config run.yaml``) as the flags' defaults.

Every field is a flag in both spellings, ``--max-steps`` and ``--max_steps``. What
HfArgumentParser cannot express is handled here, each in one place:

* bools: HfArgumentParser gives ``--x [true|false]``, and ``--no_x`` only to fields that
  default to True; `BoolFlag` takes all of ``--x``, ``--x false``, ``--no-x``, ``--no_x``
  for every bool (the CLI has always had ``--no-x``);
* optional fields: HfArgumentParser types them by their non-None type; "none" gives None
  here (``--clip-eps-high none``);
* ``str | list[str]`` (DPOConfig.loss_type: one type or a mix): HfArgumentParser parses
  it as a list but leaves its default unset; the field's default is restored.

A field's flags come from HfArgumentParser's private ``_parse_dataclass_field(parser,
field)`` (its public API parses whole dataclasses only); `hf_field_parser` checks that
the installed transformers has it, and says which versions do if not.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRL_PREFIX = "trl_name_"
#: the private HfArgumentParser method a field's flags are built with, and the
#: transformers versions known to have it with this signature (CI tests the version a
#: fresh install takes)
HF_FIELD_PARSER = "_parse_dataclass_field"
HF_FIELD_PARSER_VERSIONS = "4.46 through 5.25"


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


def spellings(name: str) -> list[str]:
    """A name's flags: ``--max-steps`` and ``--max_steps`` (one when it has no "_")."""
    return list(dict.fromkeys(["--" + name.replace("_", "-"), "--" + name]))


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if isinstance(text, str) and text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


BARE = object()  # a bool flag given without a value


class BoolFlag(argparse.Action):
    """One bool field's flags: ``--x`` (True), ``--x true|false|yes|no|1|0``
    (HfArgumentParser's and TRL's spelling), ``--no-x`` / ``--no_x`` (False); an optional
    field also takes ``--x none``."""

    def __init__(self, option_strings: list[str], dest: str, optional: bool = False,
                 name: str | None = None, **kwargs: Any):
        from transformers.hf_argparser import string_to_bool

        name = name or dest  # the flag's name, where its dest is another
        self.negations = [f"--no-{name.replace('_', '-')}", f"--no_{name}"]
        convert = _none_or(string_to_bool) if optional else string_to_bool
        # const: what a bare --x passes (None is what "--x none" passes)
        super().__init__(option_strings + self.negations, dest, nargs="?", type=convert,
                         const=BARE, metavar="BOOL", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string in self.negations:
            if values is not BARE:
                parser.error(f"{option_string} takes no value (or give "
                             f"{self.option_strings[0]} {values})")
            values = False
        setattr(namespace, self.dest, True if values is BARE else values)


def field_aliases(config_class: type) -> dict[str, list[str]]:
    """Each field's TRL names that are plain renames (``--learning-rate`` for lr), as
    extra flags of the field's own."""
    aliases: dict[str, list[str]] = {}
    for name, (field, meaning) in getattr(config_class, "trl_names", {}).items():
        if meaning is None:
            aliases.setdefault(field, []).extend(spellings(name))
    return aliases


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def hf_field_parser() -> Callable[[Any, dataclasses.Field], None]:
    """``HfArgumentParser._parse_dataclass_field``, which adds one dataclass field's flags
    to a parser: a private method, so a transformers that renamed it or changed its
    arguments raises RuntimeError naming the method and the versions that have it."""
    import transformers
    from transformers import HfArgumentParser

    method = getattr(HfArgumentParser, HF_FIELD_PARSER, None)
    try:
        parameters = None if method is None else list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        parameters = []
    if parameters != ["parser", "field"]:
        found = "lacks it" if method is None else f"has it taking {parameters}"
        raise RuntimeError(
            f"rlhf-fast builds its command-line flags with transformers' private "
            f"HfArgumentParser.{HF_FIELD_PARSER}(parser, field), and transformers "
            f"{transformers.__version__} {found}; transformers {HF_FIELD_PARSER_VERSIONS} "
            f"have it (pip install 'transformers<={HF_FIELD_PARSER_VERSIONS.split()[-1]}'), "
            "or report the new version to rlhf-fast")
    return method


def add_field_flag(parser: Any, field: dataclasses.Field, hint: Any, help_text: str,
                   aliases: list[str]) -> None:
    """The flags of one config field, added to `parser` (a parser or argument group)."""
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)
                and type(None) in args)
    base = next(a for a in args if a is not type(None)) if optional else hint
    if base is bool:
        parser.add_argument(*spellings(field.name), *aliases, dest=field.name,
                            action=BoolFlag, optional=optional, default=_default(field),
                            help=help_text)
        return
    spec = dataclasses.field(default=field.default, default_factory=field.default_factory,
                             metadata={"help": help_text, "aliases": aliases})
    spec.name, spec.type = field.name, hint
    first = len(parser._actions)
    hf_field_parser()(parser, spec)
    action = parser._actions[first]
    action.default = _default(field)  # (unset for loss_type's str | list[str])
    if optional:
        action.type = _none_or(action.type)


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of `config_class` in both spellings (HfArgumentParser's),
    with TRL's names of fields as aliases and TRL's names that mean settings of ours
    (PPO's --loss-type) as flags of their own; see the module's docstring."""
    hints = typing.get_type_hints(config_class)
    docs = field_docs(config_class)
    aliases = field_aliases(config_class)
    group = parser.add_argument_group(f"{config_class.__name__} fields")
    for field in dataclasses.fields(config_class):
        help_text = f"{docs.get(field.name, '')} (default: {_default(field)})"
        add_field_flag(group, field, hints[field.name], help_text,
                       aliases.get(field.name, []))
    add_trl_flags(parser, config_class)


def add_trl_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """TRL's names whose values mean settings of ours (PPO's --loss-type dr_grpo) as
    flags of their own (`from_trl_names` translates them): a choice of the values in
    its table, a bool, or a value of the type its table names; one given beside a flag
    of a field it sets wins."""
    names = {name: meaning for name, (_, meaning) in
             getattr(config_class, "trl_names", {}).items() if meaning is not None}
    if not names:
        return
    group = parser.add_argument_group("TRL's names (aliases)")
    for name, meaning in names.items():
        flags, dest = spellings(name), TRL_PREFIX + name
        if isinstance(meaning, dict):  # its values
            group.add_argument(*flags, dest=dest, default=None, choices=tuple(meaning),
                               help=f"TRL's {name}")
        elif meaning is bool:
            group.add_argument(*flags, dest=dest, action=BoolFlag, name=name, default=None,
                               help=f"TRL's {name}")
        else:  # a value its converter reads, which from_trl_names translates
            group.add_argument(*flags, dest=dest, default=None, type=meaning,
                               metavar="VALUE", help=f"TRL's {name}")


#: "DPOConfig.lr must be ..." -> the field lr
FIELD_IN_ERROR = re.compile(r"\b[A-Za-z]+Config\.(\w+)")


def usage_message(error: ValueError) -> str:
    """A config check's error as a usage error naming the flag of the field it names."""
    message = str(error)
    match = FIELD_IN_ERROR.search(message)
    return f"{spellings(match.group(1))[0]}: {message}" if match else message


def config_from_args(config_class: type, args: argparse.Namespace,
                     parser: argparse.ArgumentParser) -> Any:
    """The config dataclass from the parsed flags; its checks' errors become usage
    errors (exit 2) naming the flag."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    # "--reward-weights none": None, not [None]
    values = {k: None if v == [None] else v for k, v in values.items()}
    trl = {k[len(TRL_PREFIX):]: v for k, v in vars(args).items()
           if k.startswith(TRL_PREFIX) and v is not None}
    try:
        if trl:
            values |= config_class.from_trl_names(**trl)
        return config_class(**values)
    except ValueError as exc:
        parser.error(usage_message(exc))


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping of a YAML (.yaml / .yml) or JSON config file; ValueError saying what
    is wrong with it."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML: {exc}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc}); YAML files end in .yaml or .yml"
                             ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"expected a mapping of field names to values, got "
                         f"{type(values).__name__}")
    return values


def flag_dests(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every name `parser` takes a value under (a flag without its dashes, in either
    spelling; TRL's aliases included) -> the dest it sets. The --no-x forms are left out:
    a file gives a bool its value."""
    dests = {}
    for action in parser._actions:
        negations = getattr(action, "negations", [])
        for option in action.option_strings:
            if option.startswith("--") and option not in negations:
                dests[option[2:].replace("-", "_")] = action.dest
    for skipped in ("help", "config"):
        dests.pop(skipped, None)
    return dests


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """The values of config file `path` as `parser`'s defaults, so flags given on the
    command line override them; an unreadable file or an unknown key is a usage error
    naming the file (and the key)."""
    try:
        values = read_config_file(path)
    except (OSError, ValueError) as exc:
        parser.error(f"--config {path}: {exc}")
    dests = flag_dests(parser)
    defaults = {}
    for key, value in values.items():
        dest = dests.get(str(key).replace("-", "_"))
        if dest is None:
            parser.error(f"--config {path}: unknown key {key!r} (expected a field or "
                         "flag name, in either spelling, or one of TRL's names; see --help)")
        defaults[dest] = value
    parser.set_defaults(**defaults)
