"""The `clarity` command: `upscale`, `serve`, `weights list | download | tiny`, one module each.

argparse (standard library, no extra dependency) with flags derived from the option dataclasses
(`UpscaleParams`, `SpeedOptions`, `ServerConfig`; see options.py), so none is written twice.
"""

from __future__ import annotations

import argparse
import sys

from clarity.cli import serve, upscale, weights
from clarity.cli.exits import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clarity", description="Creative image upscaler (SD1.5 + ControlNet-tile).")
    commands = parser.add_subparsers(dest="command", required=True)
    upscale.add_parser(commands)
    weights.add_parser(commands)
    serve.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
