"""Settings: a command's configuration as frozen dataclasses, read from files and flags.

A configuration is a frozen dataclass of *sections*; a section is a frozen dataclass of
settings, each with a one-line docstring (its help). A section field marked :func:`inline`
holds another dataclass whose fields sit in the section itself (``targets.k``, not
``targets.spec.k``). This module turns such a class into command-line flags, reads YAML/JSON
files keeping line numbers, and builds the configuration from its defaults, a file and flag
values. Unknown keys and wrong types are all reported at once, each naming the key, where it
came from (file and line, or the flag as typed), the value seen and the fix.

Two flag styles: ``--section.field VALUE`` for every key (`logitcache train`, values parsed
here so that every problem is reported), or one flag per setting spelled by :func:`flag`
metadata, by default ``--field-name`` (``--no-field-name`` for a setting that is on by
default; `logitcache build`, values typed by argparse).

Not jsonargparse (4.53, tried for issue 12): it takes ``--teacher`` and ``--targets`` for
"load this section from a file", has no per-field spelling (``--k`` for ``targets.k``) and no
``--prompts A B`` for a tuple, and stops at the first problem without the file's line.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import InputError

_FLAG, _METAVAR, _INLINE = "settings.flag", "settings.metavar", "settings.inline"


def flag(spelling: str | None = None, *, metavar: str | None = None) -> dict[str, Any]:
    """Field metadata: the flag of this setting (default ``--field-name``) and its metavar."""
    return {_FLAG: spelling, _METAVAR: metavar}


def inline(**spellings: str) -> dict[str, Any]:
    """Field metadata: this dataclass-valued field's own fields are settings of the section;
    ``spellings`` gives flags for those not spelled ``--field-name``."""
    return {_INLINE: spellings}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


@dataclass(frozen=True)
class Setting:
    """One leaf of a configuration: its key in files, its place in the object, its flag."""

    key: str
    """``section.field`` as files, ``--set`` and messages spell it."""
    path: tuple[str, ...]
    """Attribute path from the configuration: (section, field) or (section, field, inner)."""
    type: Any
    default: Any
    """The default value; dataclasses.MISSING when the setting is required."""
    doc: str
    """The field's docstring on one line."""
    flag: str
    """The flag of the one-flag-per-setting style, e.g. ``--k``."""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """The argparse attribute the flag fills (``--no-progress`` fills ``progress``)."""
        if self.flag.startswith("--no-"):
            return self.path[-1]
        return self.flag.lstrip("-").replace("-", "_")

    def help(self, *, with_type: bool) -> str:
        """The docstring, then the type (``--section.field`` style) and the default."""
        if with_type:
            shown = "required" if self.default is MISSING else json.dumps(self.default)
            tail = f" [{describe_type(self.type)}; default {shown}]"
        elif self.default in (MISSING, None) or isinstance(self.default, bool):
            tail = ""
        else:
            tail = f" [default: {self.default}]"
        return f"{self.doc}{tail}".replace("%", "%%")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


@cache
def sections(root: type) -> dict[str, type]:
    """Section name -> section class, in field order."""
    hints = typing.get_type_hints(root)
    return {f.name: hints[f.name] for f in fields(root)}


@cache
def settings(root: type) -> tuple[Setting, ...]:
    """Every setting of the configuration class ``root``, in field order."""
    out = []
    for section, cls in sections(root).items():
        for f in fields(cls):
            if _INLINE not in f.metadata:
                out.append(_setting(cls, f, (section, f.name), _default(f), f.metadata))
                continue
            inner, base, spelled = (
                typing.get_type_hints(cls)[f.name],
                _default(f),
                f.metadata[_INLINE],
            )
            for g in fields(inner):
                path, meta = (section, f.name, g.name), {_FLAG: spelled.get(g.name)}
                out.append(_setting(inner, g, path, getattr(base, g.name), meta))
    return tuple(out)


def _setting(
    owner: type, f: dataclasses.Field, path: tuple[str, ...], default: Any, meta: Any
) -> Setting:
    spelled = meta.get(_FLAG) or ("--no-" if default is True else "--") + f.name.replace("_", "-")
    doc = " ".join(field_docs(owner).get(f.name, "").split())
    tp = typing.get_type_hints(owner)[f.name]
    return Setting(f"{path[0]}.{f.name}", path, tp, default, doc, spelled, meta.get(_METAVAR))


# --------------------------------------------------------------------------- values


def describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple:
        return f"list of {describe_type(args[0])}"
    if type(None) in args:
        return " | ".join(describe_type(a) for a in args if a is not type(None)) + " | null"
    return getattr(tp, "__name__", str(tp))


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def coerce(tp: Any, value: Any, *, from_text: bool) -> Any:
    """``value`` as type ``tp``; raises ValueError naming the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"expected one of {describe_type(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (from_text and value in ("none", "null"))):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, from_text=from_text)
    if origin is tuple:
        if isinstance(value, list | tuple):
            return tuple(coerce(args[0], v, from_text=from_text) for v in value)
        raise ValueError(f"expected a {describe_type(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise ValueError("expected true or false")
    if tp in (int, float):
        expected = "expected an integer" if tp is int else "expected a finite number"
        if isinstance(value, bool):
            raise ValueError(expected)
        number = None
        if isinstance(value, int if tp is int else int | float):
            number = tp(value)
        elif from_text:
            with contextlib.suppress(ValueError):
                number = tp(str(value))
        # inf and nan are not settings: JSON has neither, so a saved config would not load
        if number is None or not math.isfinite(number):
            raise ValueError(expected)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError("expected a string")
    raise AssertionError(f"unsupported config type {tp}")


@dataclass
class Source:
    """One value to apply: the dotted key, the value, where it came from."""

    key: str
    value: Any
    where: str
    from_text: bool


def _read(path: str) -> str:
    if "://" not in path:
        return Path(path).read_text()
    import fsspec

    with fsspec.open(path, "rt") as f:
        return f.read()


def file_sources(path: str | Path, root: type) -> list[Source]:
    """``section.field`` values of a YAML/JSON file, each with its line number."""
    try:
        text = _read(str(path))
    except OSError as e:
        raise InputError(
            f"--config {path}: cannot read it ({e.strerror or e}); check the path"
        ) from None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise InputError(f"--config {path}: not valid YAML/JSON: {e}") from None
    if node is None:
        return []
    if not isinstance(node, yaml.MappingNode):
        raise InputError(
            f"--config {path}: expected a mapping of sections ({', '.join(sections(root))})"
        )
    constructor = yaml.constructor.SafeConstructor()
    out: list[Source] = []
    problems: list[str] = []
    for k_node, v_node in node.value:
        section, line = str(k_node.value), k_node.start_mark.line + 1
        if not isinstance(v_node, yaml.MappingNode):
            problems.append(f"{path}:{line}: {section} must be a mapping of fields")
            continue
        for fk, fv in v_node.value:
            value = constructor.construct_object(fv, deep=True)
            out.append(
                Source(f"{section}.{fk.value}", value, f"{path}:{fk.start_mark.line + 1}", False)
            )
        if not v_node.value:
            out.append(Source(section, None, f"{path}:{line}", from_text=False))
    if problems:
        raise InputError("\n".join(problems))
    return out


def mapping_sources(obj: Any, where: str) -> tuple[list[Source], list[str]]:
    """``section.field`` values of a parsed JSON object; and the problems with its shape."""
    if not isinstance(obj, dict):
        return [], [f"{where}: expected a JSON object of sections, got {type(obj).__name__}"]
    out, problems = [], []
    for section, values in obj.items():
        if values is None:
            out.append(Source(section, None, where, from_text=False))
        elif isinstance(values, dict):
            out += [Source(f"{section}.{k}", v, where, False) for k, v in values.items()]
        else:
            problems.append(f"{where}: {section} must be a mapping of fields")
    return out, problems


def flag_sources(args: argparse.Namespace, root: type) -> list[Source]:
    """The values of the one-flag-per-setting flags that were given (see :func:`add_flags`)."""
    out = []
    for s in settings(root):
        value = getattr(args, s.dest, None)
        if value is None or (isinstance(value, bool) and value == s.default):
            continue  # not given: a switch left as it is, or no value
        out.append(Source(s.key, value, s.flag, from_text=False))
    return out


# --------------------------------------------------------------------------- building


def build(
    root: type, sources: list[Source], *, command: str, example: str, partial: bool = False
) -> tuple[Any, list[str]]:
    """The configuration: defaults, then ``sources`` in order; else every problem with them.

    ``command`` and ``example`` (a key) complete the message for a key of no section. With
    ``partial``, a configuration is returned beside the problems whenever every required key is
    set: the badly typed values left at their defaults, so that a caller can check the rest's
    values too and report every problem at once."""
    known = {s.key: s for s in settings(root)}
    values: dict[str, Any] = {}
    problems = []
    for src in sources:
        section, _, name = src.key.partition(".")
        if section in sections(root) and not name and src.value is None:
            continue  # an empty section in a file
        s = known.get(src.key)
        if s is None:
            problems.append(_unknown(root, src, command, example))
            continue
        try:
            values[s.key] = coerce(s.type, src.value, from_text=src.from_text)
        except ValueError as e:
            problems.append(f"{src.where}: {src.key}={src.value!r}: {e}")
    missing = [s for s in settings(root) if s.default is MISSING and s.key not in values]
    problems += [f"{s.key} is not set: pass {s.flag}" for s in missing]
    if problems and (missing or not partial):
        return None, problems
    return _assemble(root, values), problems


def _assemble(root: type, values: dict[str, Any]) -> Any:
    by_path = {s.path: values[s.key] for s in settings(root) if s.key in values}
    parts: dict[str, Any] = {}
    for section, cls in sections(root).items():
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if _INLINE in f.metadata:
                inner = {p[2]: v for p, v in by_path.items() if p[:2] == (section, f.name)}
                kwargs[f.name] = dataclasses.replace(_default(f), **inner)
            elif (section, f.name) in by_path:
                kwargs[f.name] = by_path[section, f.name]
        parts[section] = cls(**kwargs)
    return root(**parts)


def _unknown(root: type, src: Source, command: str, example: str) -> str:
    section, _, _ = src.key.partition(".")
    if section in sections(root):
        valid = ", ".join(s.path[-1] for s in settings(root) if s.path[0] == section)
        return f"{src.where}: unknown key {src.key!r}; valid keys of {section}: {valid}"
    return (
        f"{src.where}: unknown key {src.key!r}; keys are section.field with sections "
        f"{', '.join(sections(root))} (e.g. {example}); run `logitcache {command} --help` for all"
    )


def format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid config: {problems[0]}"
    return f"invalid config ({len(problems)} problems):\n  - " + "\n  - ".join(problems)


def to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    """``{section: {field: value}}`` with inline fields flattened (what files hold)."""
    out: dict[str, dict[str, Any]] = {}
    for s in settings(type(cfg)):
        value = cfg
        for name in s.path:
            value = getattr(value, name)
        out.setdefault(s.path[0], {})[s.path[-1]] = value
    return out


# --------------------------------------------------------------------------- flags


class ConfigFile(argparse.Action):
    """``--config FILE``: the settings come from a file, so flags otherwise required are not."""

    def __init__(self, *args: Any, relaxes: tuple[argparse.Action, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.relaxes = relaxes

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)
        for action in self.relaxes:
            action.required = False  # argparse checks required flags after reading them all


def add_flags(
    parser: argparse.ArgumentParser, root: type, *, dotted: bool
) -> list[argparse.Action]:
    """One argument group per section, one flag per setting, help from the docstrings.

    ``dotted``: ``--section.field V`` flags holding text (in ``field:section.field``), to be
    parsed by :func:`build`. Otherwise each setting's own flag, typed by argparse (choices of a
    Literal, ``nargs="+"`` for a tuple, whose repeats add up, a switch for a bool), None when
    not given. Returns the flags of required settings (argparse-required: see
    :class:`ConfigFile`)."""
    required = []
    for section, cls in sections(root).items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__})")
        for s in (s for s in settings(root) if s.path[0] == section):
            if dotted:
                help_text = s.help(with_type=True)
                group.add_argument(f"--{s.key}", dest=f"field:{s.key}", metavar="V", help=help_text)
                continue
            action = group.add_argument(
                s.flag, dest=s.dest, help=s.help(with_type=False), **_typed(s)
            )
            if s.default is MISSING:
                required.append(action)
    return required


def _typed(s: Setting) -> dict[str, Any]:
    if s.type is bool:
        return {"action": "store_false" if s.default else "store_true"}
    kw: dict[str, Any] = {"required": s.default is MISSING, "metavar": s.metavar}
    tp = s.type
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
    if typing.get_origin(tp) is tuple:  # `--prompts a b` and `--prompts a --prompts b` alike
        kw["nargs"], kw["action"], tp = "+", "extend", typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        kw["choices"] = list(typing.get_args(tp))
    else:
        kw["type"] = tp
    return kw
