"""Options defined once: a dataclass field that carries its meaning, limits and command-line spelling.

`UpscaleParams` (params.py), `SpeedOptions` (engine) and `ServerConfig` (api/config.py) declare
their fields with `option(...)`; the CLI derives every flag from that metadata (cli/options.py),
the HTTP form and the OpenAPI schema read the same limits, so nothing is written twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    env: str | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field documented for every front end.

    `help` says what it means (the CLI appends the default); `min`/`max` bound numbers and
    `choices` strings; `aliases` are extra flag spellings (`--scale`); `metavar` names the
    value in `--help`; `env` is an environment variable the CLI takes the default from; `parse`
    turns the flag's text into the field's value where the type alone does not say how.
    """
    metadata = {"help": help, "min": min, "max": max, "choices": choices, "aliases": aliases,
                "metavar": metavar, "env": env, "parse": parse}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)
