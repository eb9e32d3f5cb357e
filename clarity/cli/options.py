"""Command-line flags derived from the option dataclasses, so that none is written twice.

`UpscaleParams` fields become flags whose text is parsed later by `UpscaleParams.from_strings`
(one parser and one error message for the CLI, the HTTP form and Python callers); the
fields of `ServerConfig` and `SpeedOptions` become typed flags, and `options_from_args` builds
the dataclass back from the parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from clarity.params import UpscaleParams, format_number, param_fields

T = TypeVar("T")


def flag_names(field: dataclasses.Field) -> list[str]:
    """`--field-name` and the field's aliases."""
    return [f"--{field.name.replace('_', '-')}", *field.metadata.get("aliases", ())]


def add_param_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per `UpscaleParams` field; unset flags stay None, meaning the parameter's default."""
    group = parser.add_argument_group("upscaling parameters")
    hints = get_type_hints(UpscaleParams)
    for f in param_fields():
        meta = f.metadata
        limits = ""
        if meta["choices"]:
            limits = f" One of: {', '.join(meta['choices'])}."
        elif meta["min"] is not None:
            limits = f" Range {format_number(meta['min'])}-{format_number(meta['max'])}."
        if hints[f.name] is bool:
            # A switch: present means "true", as users expect of a flag.
            group.add_argument(*flag_names(f), dest=f.name, action="store_const", const="true", default=None,
                               help=f"{meta['help']} Off by default.")
            continue
        group.add_argument(*flag_names(f), dest=f.name, metavar="VALUE", default=None,
                           help=f"{meta['help']}{limits} Default: {f.default}.")


def param_texts(args: argparse.Namespace) -> dict[str, str | None]:
    """The upscaling parameters' flag texts, by field name (None where not given)."""
    return {f.name: getattr(args, f.name) for f in param_fields()}


def add_option_flags(
    parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None, title: str | None = None
) -> None:
    """A typed flag per field of the option dataclass `cls` (or its fields named in `only`), in a
    group called `title` if given; a nested option dataclass gets a group of its own."""
    target = parser.add_argument_group(title) if title else parser
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        value_type = _value_type(hints[f.name])
        if dataclasses.is_dataclass(value_type):
            add_option_flags(parser, value_type, title=f.metadata["help"] or f.name)
            continue
        meta = f.metadata
        default = _default(f)
        if value_type is bool:
            target.add_argument(*flag_names(f), dest=f.name, action="store_true", help=meta["help"])
            continue
        target.add_argument(
            *flag_names(f), dest=f.name, type=meta.get("parse") or value_type, default=default,
            choices=meta.get("choices"), metavar=meta.get("metavar"), help=_help(f, default),
        )


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """An instance of the option dataclass `cls` from parsed flags."""
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value_type = _value_type(hints[f.name])
        if dataclasses.is_dataclass(value_type):
            values[f.name] = options_from_args(value_type, args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def _value_type(hint: Any) -> Any:
    """The type a flag's text is converted to: `Path | None` -> Path, `int | str` -> str."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        return members[0] if len(members) == 1 else str
    return hint


def _default(field: dataclasses.Field) -> Any:
    env = field.metadata.get("env")
    if env and os.environ.get(env):
        return Path(os.environ[env]) if isinstance(field.default, Path) else os.environ[env]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _help(field: dataclasses.Field, default: Any) -> str:
    """The field's help, with its default (and the environment variable that sets it) appended."""
    meta = field.metadata
    text = meta["help"].rstrip(".")
    env = f"${meta['env']}" if meta.get("env") else None
    if field.default in (None, ()):
        return f"{text} ({env} if set)." if env else f"{text}."
    shown = f"{field.default:g}" if isinstance(field.default, float) else field.default
    return f"{text} (default: {shown}{f', or {env}' if env else ''})."
