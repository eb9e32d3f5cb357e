"""How the commands end: their errors become one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from clarity.cli.remote import RemoteError
from clarity.errors import ClarityError, ParamError

#: Exit codes: done; failed (weights, files, a server's refusal); a wrong parameter or flag;
#: stopped by Ctrl-C (128 + SIGINT, as shells report it).
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`command(args)`, with Clarity's errors reported as `clarity: error: ...` and their exit code, and
    Ctrl-C as one line (results are written whole or not at all, so nothing half-written is left)."""
    try:
        return command(args)
    except KeyboardInterrupt:
        print("clarity: interrupted", file=sys.stderr)
        return INTERRUPTED
    except ParamError as error:
        print(f"clarity: error: {error}", file=sys.stderr)
        return USAGE
    except (ClarityError, RemoteError, FileNotFoundError) as error:
        print(f"clarity: error: {error}", file=sys.stderr)
        return FAILED
