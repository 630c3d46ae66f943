"""Typed settings: one dataclass per command is the single source of a setting's type, default, choices and help.

A field made with ``opt(default, help, choices)`` appears three ways: in Python (the dataclass), in TOML files
(``from_dict`` coerces TOML values and CLI strings to the field's type and names unknown keys with a near match), and
as a CLI flag (``add_arguments``: ``--learning-rate X`` whose help is the field's description and whose shown default
is the field's default). ``dash_values`` lets a flag take a value that starts with '-' (``--learning-rate -1e-4``),
which argparse would otherwise read as another flag, so the value reaches validation and its message names the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from refusal_probe.core.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

S = TypeVar("S", bound="Settings")
DEST_PREFIX = (
    "cfg_"  # argparse dest of a settings flag: cfg_<field>, so settings stand apart from other options
)


def opt(default: Any, help: str, choices: Sequence[Any] | None = None, **kw: Any) -> Any:
    """A settings field: its default, its help text (the documentation and the --help line) and its closed choices."""
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = tuple(choices)
    if isinstance(default, list):
        return field(default_factory=functools.partial(list, default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def flag(key: str) -> str:
    """The CLI flag of a settings key: learning_rate -> --learning-rate."""
    return "--" + key.replace("_", "-")


class Settings:
    """Mixin for a settings dataclass whose fields are made with ``opt``."""

    NOUN: ClassVar[str] = "setting"  # how messages name one field, e.g. "training setting"

    @classmethod
    def settings_fields(cls) -> dict[str, dataclasses.Field]:
        return _fields(cls)

    @classmethod
    def field_help(cls, key: str) -> str:
        return cls.settings_fields()[key].metadata["help"]

    @classmethod
    def field_choices(cls, key: str) -> tuple[Any, ...] | None:
        return cls.settings_fields()[key].metadata.get("choices")

    @classmethod
    def field_default(cls, key: str) -> Any:
        f = cls.settings_fields()[key]
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise KeyError(f"{cls.__name__}.{key} has no default")

    @classmethod
    def base_type(cls, key: str) -> tuple[Any, bool]:
        """(the non-None type of field ``key``, whether None is allowed)."""
        hint = _hints(cls)[key]
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            non_none = [a for a in args if a is not type(None)]
            return non_none[0], len(non_none) < len(args)
        return hint, False

    @classmethod
    def coerce(cls, key: str, raw: Any, where: str = "config") -> Any:
        """``raw`` (a TOML value or a CLI string) as the type of field ``key``; UserError naming it if it does not fit."""
        typ, nullable = cls.base_type(key)
        try:
            if raw is None or (
                isinstance(raw, str) and raw.strip().lower() in ("none", "null", "") and nullable
            ):
                if not nullable:
                    raise ValueError("may not be empty")
                return None
            if typing.get_origin(typ) is list:
                (item,) = typing.get_args(typ)
                items = raw.split(",") if isinstance(raw, str) else list(raw)
                return [
                    _scalar(item, x.strip() if isinstance(x, str) else x) for x in items if str(x).strip()
                ]
            return _scalar(typ, raw)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: {key}={raw!r} is not a valid {_type_name(typ)} ({exc})") from None

    @classmethod
    def unknown_key(cls, key: str, where: str) -> UserError:
        """The error for a key that names no field, with the nearest field name as a hint."""
        known = list(cls.settings_fields())
        near = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else f"; known settings: {', '.join(known)}"
        return UserError(f"{where}: unknown {cls.NOUN} '{key}'{hint}")

    @classmethod
    def from_dict(cls: type[S], values: dict[str, Any], where: str = "config") -> S:
        """Build from plain values (TOML or CLI strings; '-' or '_' in keys), coercing each to its field's type."""
        obj = cls()
        known = cls.settings_fields()
        for key, raw in values.items():
            key = key.replace("-", "_")
            if key not in known:
                raise cls.unknown_key(key, where)
            setattr(obj, key, cls.coerce(key, raw, where))
        return obj

    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser,
        group: Callable[[str], str] | None = None,
        only: Sequence[str] | None = None,
    ) -> None:
        """One flag per field (``--learning-rate X``): help from the field, default shown from the field.

        Unset flags stay out of the namespace (``cli_values`` returns only what was given), so a TOML file or the
        defaults fill the rest. ``group(name)`` puts a flag in a named argument group; ``only`` limits the fields.
        """
        groups: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if only is not None and f.name not in only:
                continue
            target: Any = parser
            if group is not None:
                name = group(f.name)
                target = groups.get(name) or groups.setdefault(name, parser.add_argument_group(name))
            typ, _ = cls.base_type(f.name)
            default = cls.field_default(f.name)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            kw: dict[str, Any] = {
                "dest": DEST_PREFIX + f.name,
                "default": argparse.SUPPRESS,
                "help": f"{f.metadata['help']} [default: {shown}]",
            }
            if typ is bool:
                target.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
                continue
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            list_typed = typing.get_origin(typ) is list
            metavar = {int: "N", float: "X"}.get(typ) or (
                "A,B,..." if list_typed else f.name.split("_")[-1].upper()
            )
            target.add_argument(flag(f.name), metavar=None if "choices" in kw else metavar, **kw)

    def check_choices(self) -> None:
        """Every field with closed choices holds one of them (a TOML file or Python caller bypasses argparse)."""
        for key in self.settings_fields():
            choices = self.field_choices(key)
            if choices:
                check_name(key, getattr(self, key), choices, noun=self.NOUN)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_toml(self) -> str:
        """The settings as TOML, each preceded by its help (None values are written as comments: TOML has no null)."""
        lines = []
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {toml_value(value)}")
        return "\n".join(lines) + "\n"


_FIELDS: dict[type, dict[str, dataclasses.Field]] = {}
_HINTS: dict[type, dict[str, Any]] = {}


def check_name(key: str, value: Any, names: Sequence[Any], source: str = "", noun: str = "setting") -> None:
    """A value from a closed vocabulary; the message names the flag and lists the valid names, nearest first."""
    if value in names:
        return
    text, valid = str(value), [str(n) for n in names]
    near = [n for n in valid if n.startswith(text)] or difflib.get_close_matches(text, valid, n=1)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    origin = f" from {source}" if source else ""
    raise UserError(
        f"{noun} {key}={value!r} is invalid{hint}; expected one of {', '.join(valid)}{origin} ({flag(key)})"
    )


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    if cls not in _FIELDS:
        _FIELDS[cls] = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    return _FIELDS[cls]


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _scalar(typ: Any, raw: Any) -> Any:
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if typ is int:
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError("expected a whole number")
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        return int(raw) if not isinstance(raw, str) else int(float(raw)) if "e" in raw.lower() else int(raw)
    if typ is float:
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        return float(raw)
    if typ is str:
        if not isinstance(raw, str | int | float):
            raise ValueError("expected text")
        return str(raw)
    raise TypeError(f"unsupported type {typ}")


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is list:
        return f"list of {typing.get_args(typ)[0].__name__}"
    return getattr(typ, "__name__", str(typ))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file; a bad one is one UserError naming the file and the line (binary, not UTF-8, invalid TOML)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass an existing .toml file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}: not valid TOML (line {line}: not UTF-8 text, a binary file?); pass a .toml text file"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = str(exc).replace("at end of document", f"at end of document, line {text.count(chr(10)) + 1}")
        raise UserError(f"{path}: not valid TOML ({where}); fix the file") from None


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given explicitly on the command line (flags made by ``add_arguments``)."""
    return {k[len(DEST_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(DEST_PREFIX)}


def to_flags(values: dict[str, Any]) -> list[str]:
    """CLI flags that set ``values`` (the inverse of add_arguments), for printed commands."""
    out: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            out.append(flag(key) if value else f"--no-{key.replace('_', '-')}")
        elif value is None:
            out += [flag(key), "none"]
        elif isinstance(value, list):
            out += [flag(key), ",".join(str(v) for v in value)]
        elif isinstance(value, float):
            out += [flag(key), repr(value)]
        else:
            out += [flag(key), str(value)]
    return out


# ---- values that start with '-' ----


def _option_table(
    parser: argparse.ArgumentParser,
) -> tuple[dict[str, bool], dict[str, argparse.ArgumentParser]]:
    """(option string -> takes exactly one value, subcommand name -> its parser) for one parser level."""
    options: dict[str, bool] = {}
    subparsers: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subparsers.update(action.choices)
            continue
        for s in action.option_strings:
            options[s] = action.nargs is None or action.nargs == 1
    return options, subparsers


def _resolve(token: str, options: dict[str, bool]) -> str | None:
    """The option a token names, exactly or as argparse's unique long-option abbreviation."""
    name = token.split("=", 1)[0]
    if name in options:
        return name
    if name.startswith("--"):
        matches = [o for o in options if o.startswith(name)]
        if len(matches) == 1:
            return matches[0]
    return None


def dash_values(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--opt -1e-4`` -> ``--opt=-1e-4`` for options that take one value, when the value is not itself an option.

    argparse takes a token that starts with '-' (and is not a plain negative number) for the next flag, so
    ``--learning-rate -1e-4`` or ``--shard -1/2`` would fail with "expected one argument" instead of reaching the
    setting's validation, whose message names the flag and the allowed values. Subcommands are followed.
    """
    out: list[str] = []
    options, subparsers = _option_table(parser)
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            out += tokens[i:]
            break
        if token in subparsers and not token.startswith("-"):
            sub_options, subparsers = _option_table(subparsers[token])
            options = {**options, **sub_options}
            out.append(token)
            i += 1
            continue
        name = _resolve(token, options) if token.startswith("-") and "=" not in token else None
        if name and options[name] and i + 1 < len(tokens):
            value = tokens[i + 1]
            is_option = value == "--" or _resolve(value, options) is not None
            if (
                not is_option
            ):  # a value: one starting with '-' is glued on; any other is kept from the subcommand check
                out += [f"{token}={value}"] if value.startswith("-") and value != "-" else [token, value]
                i += 2
                continue
        out.append(token)
        i += 1
    return out
