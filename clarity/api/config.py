"""`ServerConfig`: every option of the server, defined once with its default and meaning.

`clarity serve` and `python server.py` derive their flags from these fields (cli/options.py),
the runtimes read nothing else, and the inference workers receive it whole (it pickles).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from pathlib import Path

from clarity import SpeedOptions
from clarity.api.logs import DEFAULT_PROGRESS_SECONDS, LOG_LEVELS
from clarity.api.results.s3 import S3Location, require_boto3
from clarity.api.webhooks import MIN_SECRET_BYTES, AllowList, is_signing_secret
from clarity.errors import ParamError, echo
from clarity.imageio import DEFAULT_MAX_INPUT_PIXELS, DEFAULT_MAX_OUTPUT_PIXELS
from clarity.options import option
from clarity.params import check_range

#: Where the CLI and server look for weights when neither --weights nor $CLARITY_WEIGHTS says.
DEFAULT_WEIGHTS = Path("weights")


def default_data_dir() -> Path:
    """Where a server keeps its jobs and results unless told: the XDG data folder, as most Linux services."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "clarity"


def comma_list(text: str) -> tuple[str, ...]:
    """`--models a, b` -> ("a", "b")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def device_count(text: str) -> int | str:
    """`--devices 2` -> 2; `auto` stays a word."""
    return int(text) if text.strip().isdigit() else text.strip()


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _check_results(location: str, output_dir: Path | None) -> None:
    """Refuse a `--results` that is not `s3://BUCKET/PREFIX`, that comes with `--output-dir`, or whose storage
    needs boto3 where it is not installed, with a `ParamError` naming the option."""
    if output_dir is not None:
        raise ParamError("results", "--output-dir names another place for url-mode results; give one of them")
    try:
        S3Location.parse(location)
        require_boto3()
    except (ValueError, ImportError) as error:
        raise ParamError("results", str(error)) from None


@dataclass(frozen=True)
class ServerConfig:
    """How one Clarity server runs: its models, limits, addresses and logs."""

    weights: Path = option(
        DEFAULT_WEIGHTS, "Weights root or one model folder.", env="CLARITY_WEIGHTS", metavar="DIR"
    )
    models: tuple[str, ...] | None = option(
        None, "Serve only these model ids of the weights root (default: all; each is loaded in every worker).",
        metavar="ID,ID", parse=comma_list,
    )
    default_model: str | None = option(
        None, "Model for requests that name none (default: clarity-upscaler if served, else the first id).",
        metavar="ID",
    )
    host: str = option("0.0.0.0", "Address to listen on.")
    port: int = option(8000, "Port to listen on.")
    accelerator: str = option("auto", "Where models run: auto = CUDA if present.", choices=("auto", "cpu", "cuda"))
    devices: int | str = option("auto", "Number of GPUs to use, or auto.", parse=device_count)
    workers_per_device: int = option(1, "Model copies per device, each serving one request at a time.", min=1)
    api_key: str | None = option(
        None, "Require 'Authorization: Bearer <key>' on every route but /health; without a key the server is open"
        " to anyone who can reach its port",
        env="CLARITY_API_KEY",
    )
    metrics_public: bool = option(
        False, "Serve /metrics (Prometheus) without the API key, for a scraper on a trusted network; by default"
        " it needs the key like every other route.",
    )
    data_dir: Path | None = option(
        None, "Where the server keeps its jobs (jobs.sqlite3) and, unless --output-dir or --results says, its url-mode"
        " results; they survive a restart (default: $XDG_DATA_HOME/clarity, else ~/.local/share/clarity).",
        env="CLARITY_DATA_DIR", metavar="DIR",
    )
    output_dir: Path | None = option(
        None, "Where url-mode results are kept (default: results/ in the data folder).", metavar="DIR"
    )
    results: str | None = option(
        None, "Keep url-mode results in S3-compatible storage instead of --output-dir, so that every replica serves"
        " every result URL; endpoint and credentials come from boto3's environment and config files (README,"
        " Results in S3-compatible storage)", metavar="s3://BUCKET/PREFIX",
    )
    public_url: str | None = option(
        None, "Base URL of result URLs, for every client (default: the scheme and Host each request came by,"
        " so a client that came by another name than localhost can open its URLs).", metavar="URL",
    )
    forwarded_allow_ips: tuple[str, ...] = option(
        (), "Reverse proxies (addresses or networks, comma-separated, or *) whose X-Forwarded-Proto and"
        " X-Forwarded-Host say how clients reached the server, as uvicorn's option of that name (default: none).",
        metavar="IP,IP", parse=comma_list,
    )
    result_ttl_seconds: float = option(3600.0, "Seconds a url-mode result stays downloadable.", min=0)
    max_result_mb: float = option(
        2000.0, "Space url-mode results may take, in MB (on disk, or under the --results prefix); when full, url-mode"
        " requests get 503 storage_full until older results expire.", min=0,
    )
    job_ttl_seconds: float = option(
        3600.0, "Seconds a finished job (its status and result) is kept, then removed.", min=0
    )
    max_jobs: int = option(
        1000, "Jobs kept at once (queued, running and finished ones not yet expired); beyond it a submission"
        " gets 429 too_many_jobs.", min=1,
    )
    max_job_mb: float = option(
        2000.0, "Space the inputs of waiting jobs and the results of finished ones may take, in MB; beyond it a"
        " submission gets 429 too_many_jobs.", min=0,
    )
    max_payload_mb: float = option(50.0, "Largest request body accepted, in MB.", min=0)
    max_output_mp: float | None = option(
        None, f"Largest output accepted, in megapixels (default: {DEFAULT_MAX_OUTPUT_PIXELS / 1e6:.1f}).", min=0
    )
    max_input_mp: float = option(
        DEFAULT_MAX_INPUT_PIXELS / 1e6,
        "Largest input accepted, in megapixels, checked from the file's header before decoding.", min=0,
    )
    max_queue: int = option(
        16, "Edit requests held at once (queued or running, counted once their bodies have arrived) per HTTP"
        " process before answering 429 queue_full; with --ray, edits waiting for a free upscaler replica, per"
        " ingress replica (Ray Serve's max_queued_requests).", min=1,
    )
    max_uploads: int = option(
        64, "Request bodies received at once per HTTP process (with --ray, per ingress replica) before answering"
        " 429 too_many_uploads; each may take up to --upload-timeout.", min=1,
    )
    upload_timeout: float = option(
        120.0, "Seconds a client may take to send its request body before a 408 upload_timeout (50 MB at the"
        " default is about 3.5 Mbit/s).", min=0,
    )
    queue_timeout: float = option(
        600.0, "Seconds a request may wait for a free worker before a 504 queue_timeout. With --ray, the upscaler"
        " replica that takes the edit checks it, so the 504 comes when a replica frees, not at the deadline.", min=0
    )
    shutdown_timeout: float = option(
        30.0, "On SIGINT or SIGTERM, seconds accepted requests get to finish; any still unfinished are then"
        " answered 503 shutting_down.", min=0
    )
    max_denoising_mp_steps: float = option(
        2000.0, "Largest denoising work a request may ask for, in megapixel-steps (pixels the model sees x steps"
        " x 2 with guidance x variants; a default 2x upscale to 16.8 MP is about 220): more is a 400 naming the"
        " parameter that drives it, before any work.", min=0,
    )
    max_compute_seconds: float | None = option(
        1800.0, "Stop an upscale that has run this long and answer 504 compute_timeout (0: no limit); raise it"
        " for large outputs on a CPU (about 7 minutes per output megapixel there with real weights).", min=0,
    )
    log_level: str = option(
        "info", "Server and worker log level: info logs a line as each request starts and ends, and progress"
        " while it runs.", choices=LOG_LEVELS,
    )
    progress_log_seconds: float = option(
        DEFAULT_PROGRESS_SECONDS, "Seconds between progress lines of a running request.", min=0
    )
    webhook_secret: tuple[str, ...] = option(
        (), "Secrets that sign job webhooks, Standard Webhooks' whsec_<base64> (24 bytes or more), comma-separated;"
        " each one signs every delivery, so a new secret can be added before the old one is removed (without one,"
        " jobs naming a webhook_url are refused)",
        env="CLARITY_WEBHOOK_SECRET", metavar="WHSEC,WHSEC", parse=comma_list,
    )
    webhook_allow: tuple[str, ...] = option(
        (), "Where job webhooks may go: host names, addresses or networks (CIDR), comma-separated; a name that is"
        " not listed is allowed if it resolves only to addresses in listed networks (without any, jobs naming a"
        " webhook_url are refused)",
        metavar="HOST,NET", parse=comma_list,
    )
    webhook_retry_seconds: float = option(
        3600.0, "Seconds a webhook delivery is retried (waits from 1 s doubling to 5 minutes) before it is given up"
        " and logged.", min=0,
    )
    speed: SpeedOptions = option(default_factory=SpeedOptions, help="speed (see README, GPU)")

    def __post_init__(self) -> None:
        """Refuse out-of-range numbers and unknown choices with a `ParamError` naming the option."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ParamError(f.name, f"must be one of {', '.join(meta['choices'])}; got {echo(str(value))}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                check_range(f.name, value, meta["min"], meta["max"])
        if self.results is not None:
            _check_results(self.results, self.output_dir)
        for entry in self.forwarded_allow_ips:
            if entry != "*" and not _is_network(entry):
                raise ParamError("forwarded_allow_ips", f"expected addresses, networks or *; got {echo(entry)}")
        try:
            AllowList.parse(self.webhook_allow)
        except ValueError as error:
            raise ParamError("webhook_allow", str(error)) from None
        for number, secret in enumerate(self.webhook_secret, start=1):
            if not is_signing_secret(secret):  # not echoed: it is a secret
                raise ParamError("webhook_secret", f"secret {number} is not whsec_ followed by the base64 of at least"
                                 f" {MIN_SECRET_BYTES} bytes (README, Webhooks, says how to make one)")

    @property
    def base_url(self) -> str:
        """Where result URLs point when no request says better: `public_url`, else this machine on localhost."""
        return (self.public_url or f"http://localhost:{self.port}").rstrip("/")

    @property
    def data_path(self) -> Path:
        return self.data_dir or default_data_dir()

    @property
    def results_path(self) -> Path:
        return self.output_dir or self.data_path / "results"

    @property
    def max_job_bytes(self) -> int:
        return int(self.max_job_mb * 1_000_000)

    @property
    def max_result_bytes(self) -> int:
        return int(self.max_result_mb * 1_000_000)

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mb * 1_000_000)

    @property
    def max_input_pixels(self) -> int:
        return int(self.max_input_mp * 1_000_000)

    @property
    def max_output_pixels(self) -> int:
        return int(self.max_output_mp * 1_000_000) if self.max_output_mp else DEFAULT_MAX_OUTPUT_PIXELS
