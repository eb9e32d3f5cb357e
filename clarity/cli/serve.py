"""`clarity serve` and `python server.py`: the OpenAI-compatible server, on this machine (LitServe) or, with
`--ray [ADDRESS]`, on a Ray cluster (Ray Serve).

Every flag is a field of `ServerConfig` (api/config.py), or of `RayConfig` (serving/ray/config.py) for
the cluster's own options. The weights and the speed flags are checked here, before the server starts:
otherwise every worker would fail loading, one traceback each. `ray_application` is the same command as
Ray Serve's application builder, for a Serve config (KubeRay's RayService; README, "Several machines").
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

from clarity.api.config import ServerConfig
from clarity.api.logs import configure_logging
from clarity.cli.exits import FAILED, run_command
from clarity.cli.options import add_option_flags, flag_names, options_from_args
from clarity.errors import ClarityError, ParamError, WeightsError
from clarity.serving.ray.config import LOCAL_CLUSTER, RayConfig

if TYPE_CHECKING:
    from ray.serve import Application

DESCRIPTION = "Serve the OpenAI-compatible API (POST /v1/images/edits)."
#: The `RayConfig` fields that are flags of their own (the address is `--ray`'s value).
RAY_FLAGS = tuple(f.name for f in dataclasses.fields(RayConfig) if f.name != "address")
#: `ServerConfig` fields that place LitServe's workers; on a cluster, `RayConfig`'s replica options do.
LITSERVE_ONLY = ("devices", "workers_per_device")
RAY_HELP = ("Serve on a Ray cluster with Ray Serve (needs pip install 'clarity-upscaler[ray]'): auto (the cluster this"
            " machine belongs to), HOST:PORT of its head, or nothing to start a cluster on this machine.")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help=DESCRIPTION, description=DESCRIPTION)
    _add_flags(parser)
    parser.set_defaults(run=run)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    add_option_flags(parser, ServerConfig)
    parser.add_argument("--ray", dest="address", nargs="?", const=LOCAL_CLUSTER, default=None, metavar="ADDRESS",
                        help=RAY_HELP)
    add_option_flags(parser, RayConfig, only=RAY_FLAGS, title="Ray cluster (with --ray)")


def run(args: argparse.Namespace) -> int:
    """Check the weights and speed flags, then serve until stopped."""
    config = options_from_args(ServerConfig, args)
    ray_config = ray_config_from_args(args)
    configure_logging(config.log_level)
    try:
        _check_weights(config)
    except (WeightsError, ParamError) as error:
        print(f"clarity: error: {error}", file=sys.stderr)
        return FAILED
    if ray_config is None:
        _check_speed(config)
        from clarity.serving.litserve.server import serve

        return serve(config)
    _check_dtype(config, ray_config.device(config.accelerator))
    try:
        from clarity.serving.ray.server import serve_on_ray
    except ImportError as error:
        print(f"clarity: error: --ray needs Ray ({error}): pip install 'clarity-upscaler[ray]'", file=sys.stderr)
        return FAILED
    return serve_on_ray(config, ray_config)


def ray_config_from_args(args: argparse.Namespace) -> RayConfig | None:
    """The cluster's options with `--ray`, else None; a `ParamError` for a cluster flag given without `--ray`,
    or for a flag of LitServe's workers given with it."""
    if args.address is not None:
        _refuse_given(args, ServerConfig, LITSERVE_ONLY, "places LitServe's workers on one machine; on a Ray"
                      " cluster, --replica-resource and --replicas place the upscaler replicas")
        return options_from_args(RayConfig, args)
    _refuse_given(args, RayConfig, RAY_FLAGS, "places the server on a Ray cluster: add --ray [ADDRESS]")
    return None


def _refuse_given(args: argparse.Namespace, cls: type, names: tuple[str, ...], why: str) -> None:
    """A `ParamError` for the first field of `cls` among `names` whose flag was given a value but its default."""
    for f in dataclasses.fields(cls):
        if f.name in names and getattr(args, f.name) != f.default:
            raise ParamError(f.name, f"{flag_names(f)[0]} {why}")


#: The `ServerConfig` and `RayConfig` fields a Serve config sets itself (`http_options`, `proxy_location`).
SERVE_CONFIG_OWNS = ("host", "port", "proxy_location")


class _ConfigFlagParser(argparse.ArgumentParser):
    """`clarity serve`'s parser that raises, instead of exiting, on a wrong flag (it runs in a Ray task)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ClarityError(f"{self.prog}: {message}")


def ray_application(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder for a Serve config (KubeRay's RayService `serveConfigV2`, `serve deploy`):

        applications:
          - name: clarity
            route_prefix: /
            import_path: clarity.cli.serve:ray_application
            args: {flags: [--weights, /weights, --replicas, "2", --results, s3://bucket/urls]}

    `flags` are `clarity serve --ray`'s own, read by its parser (environment variables such as
    $CLARITY_API_KEY included) and checked as the command checks them; the cluster is the one Ray Serve runs
    the builder on. `--host`, `--port` and `--proxy-location` are refused: the config's `http_options` and
    `proxy_location` place Ray Serve's proxies. Set `--replicas` (or `--max-replicas`): when the config is
    deployed, the GPU nodes may not have joined yet."""
    parser = _ConfigFlagParser(prog="clarity serve (Serve config args.flags)", description=DESCRIPTION,
                               allow_abbrev=False)
    _add_flags(parser)
    flags = args.get("flags", [])
    if isinstance(flags, str) or set(args) - {"flags"}:
        raise ClarityError("the Serve config's args must be {flags: [--flag, value, ...]}, the flags of clarity"
                           f" serve --ray; got {args!r}")
    parsed = parser.parse_args([str(flag) for flag in flags])
    parsed.address = "auto"  # the cluster Ray Serve builds the application on
    defaults = vars(parser.parse_args([]))
    for name in SERVE_CONFIG_OWNS:
        if getattr(parsed, name) != defaults[name]:
            flag = f"--{name.replace('_', '-')}"
            raise ParamError(name, f"{flag} is the Serve config's: set http_options (host, port) and proxy_location"
                                   " there")
    config = options_from_args(ServerConfig, parsed)
    ray_config = ray_config_from_args(parsed)
    assert ray_config is not None
    configure_logging(config.log_level)
    _check_weights(config)
    _check_dtype(config, ray_config.device(config.accelerator))
    from clarity.serving.ray.server import application

    return application(config, ray_config)


def main(argv: list[str] | None = None) -> int:
    """`python server.py [options]`: the same as `clarity serve`."""
    parser = argparse.ArgumentParser(prog="server.py", description=DESCRIPTION)
    _add_flags(parser)
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

    cuda = torch.cuda.is_available()
    if config.accelerator == "cuda" and not cuda:
        raise ParamError("accelerator", "--accelerator cuda: CUDA is not available here (no NVIDIA GPU or driver,"
                                        " or a CPU-only torch build); use --accelerator cpu")
    _check_dtype(config, "cuda" if config.accelerator != "cpu" and cuda else "cpu")


def _check_dtype(config: ServerConfig, device: str) -> None:
    """Raise `ParamError` naming the flag if `--dtype` cannot work on `device` (the replicas' on a cluster,
    which this machine need not have)."""
    import torch

    from clarity.engine.acceleration import resolve_dtype

    resolve_dtype(config.speed, torch.device(device))
