"""Clarity's errors, in one place: what a caller did wrong, or what is wrong with the weights.

Three siblings under one base, so that no `except` order decides what a failure means: the
API core maps each class to its HTTP answer in one table (`clarity/api/errors.py`), the CLI to
its exit code. Everything else a caller may see is a bug, reported as such.
"""

from __future__ import annotations


def echo(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, cut to its first `limit` characters: a message never
    repeats a whole hostile value."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


class ClarityError(Exception):
    """Base of the errors Clarity raises on purpose; its message is written for the user."""


class ParamError(ClarityError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range.

    `param` names the offending field so that every front end (CLI, HTTP, Python) can point
    the user at it.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class WeightsError(ClarityError):
    """A weights folder or file is missing, incomplete or unreadable; the message says what to do."""


class ContentPolicyError(ClarityError):
    """An output was flagged by the safety checker, so the request fails (OpenAI: content_policy_violation)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
