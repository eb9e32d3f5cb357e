"""`clarity serve` and `python server.py`: the OpenAI-compatible server on this machine (LitServe).

Every flag is a field of `ServerConfig` (api/config.py). The weights and the speed flags are
checked here, before the server starts: otherwise every worker would fail loading, one
traceback each.
"""

from __future__ import annotations

import argparse
import sys

from clarity.api.config import ServerConfig
from clarity.api.logs import configure_logging
from clarity.cli.exits import FAILED, run_command
from clarity.cli.options import add_option_flags, options_from_args
from clarity.errors import ParamError, WeightsError

DESCRIPTION = "Serve the OpenAI-compatible API (POST /v1/images/edits)."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help=DESCRIPTION, description=DESCRIPTION)
    add_option_flags(parser, ServerConfig)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check the weights and speed flags, then serve until stopped."""
    config = options_from_args(ServerConfig, args)
    configure_logging(config.log_level)
    try:
        _check_weights(config)
    except (WeightsError, ParamError) as error:
        print(f"clarity: error: {error}", file=sys.stderr)
        return FAILED
    _check_speed(config)
    from clarity.serving.litserve.server import serve

    return serve(config)


def main(argv: list[str] | None = None) -> int:
    """`python server.py [options]`: the same as `clarity serve`."""
    parser = argparse.ArgumentParser(prog="server.py", description=DESCRIPTION)
    add_option_flags(parser, ServerConfig)
    return run_command(run, parser.parse_args(argv))


def _check_weights(config: ServerConfig) -> None:
    from clarity.models.catalogue import Catalogue
    from clarity.models.loading import check_source

    catalogue = Catalogue.discover(config.weights, models=config.models, default_model=config.default_model)
    for source in catalogue.models.values():
        check_source(source)


def _check_speed(config: ServerConfig) -> None:
    """Raise `ParamError` naming the flag if `--accelerator` and the speed flags cannot work here."""
    import torch

    from clarity.engine.acceleration import resolve_dtype

    cuda = torch.cuda.is_available()
    if config.accelerator == "cuda" and not cuda:
        raise ParamError("accelerator", "--accelerator cuda: CUDA is not available here (no NVIDIA GPU or driver,"
                                        " or a CPU-only torch build); use --accelerator cpu")
    resolve_dtype(config.speed, torch.device("cuda" if config.accelerator != "cpu" and cuda else "cpu"))
