"""`clarity upscale INPUT... -o OUTPUT`: one image or a batch, on this machine or on a server.

Everything that can be checked without the model is checked first (parameters, the batch
plan, a `--server`'s address, key and model), before minutes of loading and work.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clarity import SpeedOptions
from clarity.api.config import ServerConfig
from clarity.cli.batch import Job, plan_jobs, write_atomically
from clarity.cli.options import add_option_flags, add_param_flags, options_from_args, param_texts
from clarity.cli.remote import RemoteError, RemoteUpscaler
from clarity.errors import ClarityError, ParamError
from clarity.imageio import FORMAT_ALIASES, OUTPUT_FORMATS, check_output_format
from clarity.params import UpscaleParams

#: `produce(job, show_steps) -> (encoded result, a description of it)`: the work, local or remote.
Producer = Callable[[Job, bool], tuple[bytes, str]]


def add_parser(commands: argparse._SubParsersAction) -> None:
    upscale = commands.add_parser("upscale", help="Upscale an image file, or many files and folders.")
    upscale.add_argument("inputs", type=_path_or_url, nargs="+", metavar="INPUT",
                         help="Image(s) to upscale (PNG, JPEG, WebP, ...), or folders of them; with --ray, also"
                              " s3://BUCKET/PREFIX (its images) or s3://BUCKET/KEY.png.")
    upscale.add_argument("-o", "--output", type=_path_or_url, required=True,
                         help="The result's file name (one input), or a folder where each result is named"
                              " after its input (several inputs, or a folder); with --ray, a folder or"
                              " s3://BUCKET/PREFIX.")
    upscale.add_argument("--format", dest="folder_format", choices=[*OUTPUT_FORMATS, *FORMAT_ALIASES],
                         default="png", help="Format of results written into an output folder (default: png).")
    upscale.add_argument("--overwrite", action="store_true",
                         help="Redo results already in the output folder (default: skip them, so that an"
                              " interrupted batch resumes where it stopped).")
    upscale.add_argument("--server", default=None, metavar="URL",
                         help="Have a Clarity server do the work (e.g. http://gpu-box:8000) instead of this"
                              " machine; --weights, --device and the speed flags are then the server's.")
    upscale.add_argument("--ray", default=None, metavar="ADDRESS",
                         help="Run the batch as a Ray Data job on a Ray cluster: auto (the one this machine belongs"
                              " to) or HOST:PORT of its head. Inputs and output are then folders every node"
                              " shares, or s3:// prefixes (README, \"Batch across a cluster\").")
    upscale.add_argument("--replica-resource", default="GPU", metavar="NAME[=AMOUNT]",
                         help="With --ray, what each batch actor holds, one actor per unit of it: GPU (default),"
                              " CPU=N or a custom resource, as for clarity serve --ray.")
    upscale.add_argument("--replicas", type=int, default=None, metavar="N",
                         help="With --ray, batch actors (default: one per unit of --replica-resource).")
    upscale.add_argument("--api-key", default=None, help="The server's API key (default: $CLARITY_API_KEY).")
    upscale.add_argument("--concurrency", type=int, default=2,
                         help="With --server, images on the server at once, as jobs queued or running"
                              " (default: 2, so the server's queue never runs dry between images).")
    add_option_flags(upscale, ServerConfig, only=("weights",))
    upscale.add_argument("--model", default=None,
                         help="Model id in the weights root (default: clarity-upscaler if present, else the first).")
    upscale.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available).")
    upscale.add_argument("--quality", type=int, default=None, help="Quality 0-100 for JPEG/WebP/AVIF outputs.")
    upscale.add_argument("--mask", type=Path, default=None,
                         help="Image marking what to keep unchanged: white (or opaque, if it has alpha) = keep.")
    add_option_flags(upscale, SpeedOptions, title="speed (see README, GPU)")
    add_param_flags(upscale)
    upscale.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    params = UpscaleParams.from_strings(param_texts(args))
    if args.concurrency < 1:
        raise ParamError("concurrency", f"must be at least 1, got {args.concurrency}")
    if args.ray is not None:
        return run_on_ray(args, params)
    if any(isinstance(place, str) for place in [*args.inputs, args.output]):
        raise ParamError("input", "s3:// inputs and outputs need --ray (a batch on a Ray cluster)")
    jobs = plan_jobs(args.inputs, args.output, args.folder_format)
    single = len(jobs) == 1 and jobs[0].target == args.output
    todo = [job for job in jobs if single or args.overwrite or not job.target.exists()]
    if not single and len(todo) < len(jobs):
        print(f"skipping {len(jobs) - len(todo)} image(s) whose result exists in {args.output}"
              " (--overwrite redoes them)")
    # Missing inputs are said now, not after minutes of loading the model.
    missing = [job.source for job in todo if not job.source.is_file()]
    if single and missing:
        raise ParamError("input", f"{missing[0]}: no such file")
    for source in missing:
        print(f"clarity: error: {source}: no such file", file=sys.stderr)
    todo = [job for job in todo if job.source.is_file()]
    failed = []
    if todo:
        # Bars on a terminal; silence in logs and pipes, where carriage returns are noise. Log
        # lines (the tiny model's warning, memory retries) are written above a bar, never into it.
        interactive = sys.stderr.isatty()
        with _warnings_on_stderr(), logging_redirect_tqdm(loggers=[logging.getLogger("clarity")]):
            if args.server:
                failed = _run_remote(args, params, todo, single, interactive)
            elif single:
                _write(todo[0], _local_producer(args, params), show_steps=interactive)
            else:
                failed = _run_batch(todo, _local_producer(args, params), 1, interactive)
        if single:
            return 1 if failed else 0
    print(f"done: {len(todo) - len(failed)} written, {len(jobs) - len(todo) - len(missing)} skipped,"
          f" {len(missing) + len(failed)} failed")
    for source in [*missing, *failed]:
        print(f"failed: {source}", file=sys.stderr)
    return 1 if missing or failed else 0


def _path_or_url(text: str) -> Path | str:
    """An `s3://` URL stays text (a Path would fold its "//"); anything else is a local path."""
    return text if text.startswith("s3://") else Path(text)


@contextlib.contextmanager
def _warnings_on_stderr() -> Iterator[None]:
    """The `clarity` loggers' warnings (the tiny test model, memory retries) on stderr while a command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("clarity: %(levelname)s: %(message)s"))
    logger = logging.getLogger("clarity")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _write(job: Job, produce: Producer, show_steps: bool = False) -> None:
    data, description = produce(job, show_steps)
    write_atomically(job.target, data)
    tqdm.write(f"wrote {job.target} {description}")  # above any progress bar, not into it


def _run_batch(todo: list[Job], produce: Producer, concurrency: int, interactive: bool) -> list[Path]:
    """Produce every job, `concurrency` at once; a job that fails is reported and the rest go on.

    Returns the sources that failed.
    """
    from concurrent.futures import ThreadPoolExecutor

    failed: list[Path] = []

    def write_or_report(job: Job) -> None:
        try:
            _write(job, produce)
        except Exception as error:  # one bad image must not cost the rest of the batch
            failed.append(job.source)
            known = isinstance(error, ClarityError | RemoteError)
            tqdm.write(f"clarity: error: {job.source}: {error if known else f'{type(error).__name__}: {error}'}",
                       file=sys.stderr)

    if concurrency == 1:  # on this machine the model is the bottleneck
        for job in tqdm(todo, unit="image", disable=not interactive):
            write_or_report(job)
        return failed
    # A few requests in flight keep a server's queue fed; on Ctrl-C those finish and are written,
    # and the rest never start.
    pool = ThreadPoolExecutor(concurrency)
    try:
        list(tqdm(pool.map(write_or_report, todo), total=len(todo), unit="image", disable=not interactive))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return failed


def _local_producer(args: argparse.Namespace, params: UpscaleParams) -> Producer:
    """Load the model once; return the producer that upscales on this machine."""
    from clarity import ProgressEvent, Upscaler
    from clarity.imageio import encode_image
    from clarity.models.catalogue import Catalogue, upscaler_kwargs

    catalogue = Catalogue.discover(args.weights)
    model_id = catalogue.model_id(args.model)
    upscaler = Upscaler.from_pretrained(**upscaler_kwargs(catalogue, model_id), device=args.device,
                                        speed=options_from_args(SpeedOptions, args))

    def produce(job: Job, show_steps: bool) -> tuple[bytes, str]:
        bar = tqdm(total=100, unit="%", disable=not show_steps, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

        def on_progress(event: ProgressEvent) -> None:
            bar.set_description(f"pass {event.pass_index + 1}/{event.passes}")
            bar.update(round(event.fraction * 100) - bar.n)

        result = upscaler.upscale(job.source, params, mask=args.mask, progress=on_progress)
        bar.close()
        stats = result.stats
        description = (f"({result.image.width}x{result.image.height}) in {stats.seconds:.1f} s; seed {stats.seeds[0]},"
                       f" {len(stats.passes)} pass(es), tiles per pass {[p.tiles for p in stats.passes]}")
        return encode_image(result.image, job.output_format, args.quality), description

    return produce


def _run_remote(args: argparse.Namespace, params: UpscaleParams, todo: list[Job], single: bool,
                interactive: bool) -> list[Path]:
    """Check the server once, then have it upscale `todo`: as jobs, or as edit requests (with a notice) if it
    has no jobs API. Returns the sources that failed."""
    from clarity.cli.remote_jobs import JobsClient, run_jobs

    # Only what the user set travels (the rest are the server's defaults, which are the same),
    # but always a prompt: OpenAI's `prompt` is required, and an empty one would mean "none".
    fields = {name: text for name, text in param_texts(args).items() if text is not None}
    fields.setdefault("prompt", params.prompt)
    api_key = args.api_key or os.environ.get("CLARITY_API_KEY")
    remote = RemoteUpscaler(args.server, api_key, args.model)
    remote.check()  # a wrong URL, key or model fails once, not once per image
    jobs = JobsClient(args.server, api_key)
    if jobs.available():
        form = {**fields, "response_format": "b64_json", **({"model": args.model} if args.model else {}),
                **({"output_compression": str(args.quality)} if args.quality is not None else {})}
        return run_jobs(jobs, todo, form, _read_mask(args.mask), args.concurrency, interactive)
    jobs.close()
    print(f"notice: {args.server} has no jobs API (/v1/jobs): each image goes as one edit request instead,"
          " and a server restart loses the images in flight (run the command again to redo them)")
    produce = _edits_producer(remote, fields, args)
    if single:
        _write(todo[0], produce)
        return []
    return _run_batch(todo, produce, args.concurrency, interactive)


def run_on_ray(args: argparse.Namespace, params: UpscaleParams) -> int:
    """`--ray`: the batch as a Ray Data job on the cluster (clarity/serving/ray/batch.py); its report printed."""
    from clarity.models.catalogue import Catalogue
    from clarity.serving.ray.batch import ClusterSpec, device_for, upscale_on_ray
    from clarity.serving.ray.batch_actor import ModelSpec
    from clarity.serving.ray.config import parse_resource

    if args.server or args.overwrite:
        raise ParamError("ray", "--ray runs the batch on a cluster: not with --server or --overwrite (results are"
                         " committed once; delete them to redo them)")
    if args.replicas is not None and args.replicas < 1:
        raise ParamError("replicas", f"must be at least 1, got {args.replicas}")
    parse_resource(args.replica_resource)
    if any(isinstance(place, str) for place in [*args.inputs, args.output]):
        from clarity.api.results.s3 import require_boto3

        try:
            require_boto3()
        except ImportError as error:
            raise ClarityError(str(error)) from None
    weights = args.weights.resolve()  # read by every node, at the same path
    Catalogue.discover(weights).model_id(args.model)  # wrong weights fail here, before the cluster
    spec = ModelSpec(weights, args.model, device_for(args.replica_resource, args.device),
                     options_from_args(SpeedOptions, args), params, check_output_format(args.folder_format, "format"),
                     args.quality, _read_mask(args.mask))
    cluster = ClusterSpec(args.ray, args.replica_resource, args.replicas)
    bar = tqdm(unit="image", disable=not sys.stderr.isatty())

    def on_plan(todo: int, skipped: int) -> None:
        if skipped:
            print(f"skipping {skipped} image(s) whose result exists in {args.output}", flush=True)
        print(f"upscaling {todo} image(s) on the Ray cluster at {args.ray}", flush=True)
        bar.reset(total=todo)

    def on_row(row: dict) -> None:
        bar.update(1)
        outcome = f"failed: {row['error']}" if row["status"] == "failed" else f"{row['status']} ({row['size']})"
        tqdm.write(f"{row['target']}: {outcome} on {row['node']} in {row['seconds']:.1f} s")

    with _warnings_on_stderr(), logging_redirect_tqdm(loggers=[logging.getLogger("clarity")]):
        report = upscale_on_ray([str(place) for place in args.inputs], str(args.output), spec, cluster,
                                on_row, on_plan)
    bar.close()
    for line in report.lines():
        print(line, file=sys.stderr if line.startswith("failed:") else sys.stdout)
    return 0 if report.ok else 1


def _read_mask(mask: Path | None) -> bytes | None:
    """The mask file's bytes, sent with every image; None without one."""
    if mask is None:
        return None
    try:
        return mask.read_bytes()
    except OSError as error:
        raise ParamError("mask", f"{mask}: {error.strerror}") from None


def _edits_producer(remote: RemoteUpscaler, fields: dict[str, str], args: argparse.Namespace) -> Producer:
    """The producer that sends each image as one `POST /v1/images/edits` (a server without jobs)."""

    def produce(job: Job, show_steps: bool) -> tuple[bytes, str]:
        started = time.perf_counter()
        data, description = remote.upscale(job, fields, args.quality, args.mask)
        return data, f"({description}) in {time.perf_counter() - started:.1f} s"

    return produce
