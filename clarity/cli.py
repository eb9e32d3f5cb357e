"""The `clarity` command: `upscale`, `serve`, `weights list | download | tiny`.

argparse (standard library, no extra dependency) with options generated from
`UpscaleParams`' fields, so every engine parameter is a flag with its documented default and
range, and none is repeated here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_type_hints

from clarity.errors import ClarityError, ParamError
from clarity.imageio import OUTPUT_FORMATS
from clarity.params import UpscaleParams, param_fields
from clarity.remote import RemoteError

#: Where the CLI and server look for weights when no --weights is given: a weights root or
#: one model folder (see clarity/models/catalogue.py).
DEFAULT_WEIGHTS = os.environ.get("CLARITY_WEIGHTS", "weights")
#: The --weights help shared by every command that reads weights.
WEIGHTS_HELP = f"Weights root or one model folder (default: {DEFAULT_WEIGHTS}, or $CLARITY_WEIGHTS)."

#: Short spellings users expect, for the most used parameters.
_ALIASES = {"scale_factor": ["--scale"], "num_inference_steps": ["--steps"]}


def _add_param_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("upscaling parameters")
    hints = get_type_hints(UpscaleParams)
    for f in param_fields():
        meta = f.metadata
        limits = ""
        if meta["choices"]:
            limits = f" One of: {', '.join(meta['choices'])}."
        elif meta["min"] is not None:
            limits = f" Range {meta['min']:g}-{meta['max']:g}."
        flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
        if hints[f.name] is bool:
            # A switch: present means "true", as users expect of a flag.
            group.add_argument(*flags, dest=f.name, action="store_const", const="true", default=None,
                               help=f"{meta['help']} Off by default.")
            continue
        group.add_argument(*flags, dest=f.name, metavar="VALUE", default=None,
                           help=f"{meta['help']}{limits} Default: {f.default}.")


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `SpeedOptions` (engine/acceleration.py), shared by `upscale` and `serve`."""
    from clarity.engine.acceleration import DTYPE_CHOICES

    group = parser.add_argument_group("speed (see README, GPU)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="UNet, ControlNet and text encoder dtype (default: auto = fp16 on CUDA, fp32 on the"
                            " CPU; fp16 is refused on the CPU). The VAE always runs in fp32.")
    group.add_argument("--channels-last", action="store_true",
                       help="NHWC memory layout for the UNet and ControlNet (faster convolutions on tensor cores).")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet and ControlNet: slow first requests, faster after.")
    group.add_argument("--cpu-offload", action="store_true",
                       help="Keep models on the CPU between their calls, for GPUs too small to hold them all.")


def speed_options(args: argparse.Namespace):
    """The `SpeedOptions` the speed flags ask for."""
    from clarity.engine.acceleration import SpeedOptions

    return SpeedOptions(dtype=args.dtype, channels_last=args.channels_last, compile=args.compile,
                        cpu_offload=args.cpu_offload)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clarity", description="Creative image upscaler (SD1.5 + ControlNet-tile).")
    commands = parser.add_subparsers(dest="command", required=True)

    upscale = commands.add_parser("upscale", help="Upscale an image file, or many files and folders.")
    upscale.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                         help="Image(s) to upscale (PNG, JPEG, WebP, ...), or folders of them.")
    upscale.add_argument("-o", "--output", type=Path, required=True,
                         help="The result's file name (one input), or a folder where each result is named"
                              " after its input (several inputs, or a folder).")
    upscale.add_argument("--format", dest="folder_format", choices=OUTPUT_FORMATS, default="png",
                         help="Format of results written into an output folder (default: png).")
    upscale.add_argument("--overwrite", action="store_true",
                         help="Redo results already in the output folder (default: skip them, so that an"
                              " interrupted batch resumes where it stopped).")
    upscale.add_argument("--server", default=None, metavar="URL",
                         help="Have a Clarity server do the work (e.g. http://gpu-box:8000) instead of this"
                              " machine; --weights, --device and the speed flags are then the server's.")
    upscale.add_argument("--api-key", default=None,
                         help="The server's API key (default: $CLARITY_API_KEY).")
    upscale.add_argument("--concurrency", type=int, default=2,
                         help="With --server, images in flight at once (default: 2, so the server's queue"
                              " never runs dry between images).")
    upscale.add_argument("--weights", type=Path, default=Path(DEFAULT_WEIGHTS), help=WEIGHTS_HELP)
    upscale.add_argument("--model", default=None,
                         help="Model id in the weights root (default: clarity-upscaler if present, else the first).")
    upscale.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available).")
    upscale.add_argument("--quality", type=int, default=None, help="Quality 0-100 for JPEG/WebP/AVIF outputs.")
    upscale.add_argument("--mask", type=Path, default=None,
                         help="Image marking what to keep unchanged: white (or opaque, if it has alpha) = keep.")
    add_speed_arguments(upscale)
    _add_param_options(upscale)

    weights = commands.add_parser("weights", help="Manage model weights.")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    listing = weights_commands.add_parser(
        "list", help="List installed models and extras with their size and whether they are usable."
    )
    listing.add_argument("--weights", type=Path, default=Path(DEFAULT_WEIGHTS), help=WEIGHTS_HELP)
    listing.add_argument("--check", action="store_true",
                         help="Really load every model on the CPU (slow) instead of checking files and headers.")
    fetch = weights_commands.add_parser(
        "download", help="Download the recommended weights from the Hugging Face hub (checksummed, resumable)."
    )
    fetch.add_argument("--weights", type=Path, default=Path(DEFAULT_WEIGHTS), help="Weights root to fill"
                       f" (default: {DEFAULT_WEIGHTS}, or $CLARITY_WEIGHTS).")
    fetch.add_argument("--extras", action="store_true",
                       help="Also the 4x-UltraSharp ESRGAN pre-upscaler and the more_details LoRA.")
    fetch.add_argument("--safety-checker", action="store_true", help="Also the SD safety checker.")
    tiny = weights_commands.add_parser(
        "tiny", help="Write the tiny random SD1.5-shaped test model (no meaningful output; for tests and demos)."
    )
    tiny.add_argument("folder", type=Path, help="Where to write it, e.g. weights/tiny.")
    tiny.add_argument("--format", choices=("diffusers", "single-file", "extras", "all"), default="diffusers",
                      help="diffusers: the diffusers folder layout (default); single-file: original-format"
                           " SD checkpoint, ControlNet and VAE files (.safetensors, .ckpt, .pth); extras: a"
                           " LoRA, an embedding, an ESRGAN pre-upscaler and a safety checker; all: everything.")

    from clarity.serving.app import add_serve_arguments

    add_serve_arguments(commands.add_parser("serve", help="Serve the OpenAI-compatible API (POST /v1/images/edits)."))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "upscale":
            return _upscale(args)
        if args.command == "serve":
            from clarity.serving.app import serve

            return serve(args)
        if args.command == "weights" and args.weights_command == "tiny":
            from clarity.testing.tiny import FORMATS, save_tiny_weights

            save_tiny_weights(args.folder, formats=FORMATS if args.format == "all" else (args.format,))
            print(f"wrote the tiny test model ({args.format}) to {args.folder}")
            return 0
        if args.command == "weights" and args.weights_command == "list":
            return _weights_list(args)
        if args.command == "weights" and args.weights_command == "download":
            return _weights_download(args)
    except ParamError as error:
        print(f"clarity: error: {error}", file=sys.stderr)
        return 2
    except (ClarityError, RemoteError, FileNotFoundError) as error:
        print(f"clarity: error: {error}", file=sys.stderr)
        return 1
    return 2


def _upscale(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from clarity.batch import Job, plan_jobs, write_atomically

    # Everything that can be checked without the model is, before minutes of loading and work.
    params = UpscaleParams.from_strings({f.name: getattr(args, f.name) for f in param_fields()})
    if args.concurrency < 1:
        raise ParamError("concurrency", f"must be at least 1, got {args.concurrency}")
    jobs = plan_jobs(args.inputs, args.output, args.folder_format)
    single = len(jobs) == 1 and jobs[0].target == args.output
    todo = [job for job in jobs if single or args.overwrite or not job.target.exists()]
    if not single and len(todo) < len(jobs):
        print(f"skipping {len(jobs) - len(todo)} image(s) whose result exists in {args.output}"
              " (--overwrite redoes them)")
    if not todo:
        return 0

    # Bars on a terminal; silence in logs and pipes, where carriage returns are noise.
    interactive = sys.stderr.isatty()
    produce = _remote_producer(args, params) if args.server else _local_producer(args, params)

    def run(job: Job, show_steps: bool = False) -> None:
        data, description = produce(job, show_steps)
        write_atomically(job.target, data)
        print(f"wrote {job.target} {description}")

    if single:
        run(todo[0], show_steps=interactive)
        return 0
    failed = []

    def run_or_report(job: Job) -> None:
        try:
            run(job)
        except Exception as error:  # one bad image must not cost the rest of the batch
            failed.append(job.source)
            known = isinstance(error, ClarityError | RemoteError)
            print(f"clarity: error: {job.source}: {error if known else f'{type(error).__name__}: {error}'}",
                  file=sys.stderr)

    if args.server:
        # A few requests in flight keep the server's queue fed; on Ctrl-C those finish and are
        # written, and the rest never start.
        pool = ThreadPoolExecutor(args.concurrency)
        try:
            list(tqdm(pool.map(run_or_report, todo), total=len(todo), unit="image", disable=not interactive))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    else:
        for job in tqdm(todo, unit="image", disable=not interactive):  # the model is the bottleneck
            run_or_report(job)
    print(f"done: {len(todo) - len(failed)} written, {len(jobs) - len(todo)} skipped, {len(failed)} failed")
    for source in failed:
        print(f"failed: {source}", file=sys.stderr)
    return 1 if failed else 0


def _local_producer(args: argparse.Namespace, params: UpscaleParams):
    """Load the model once; return `produce(job, show_steps) -> (encoded result, description)`."""
    from tqdm import tqdm

    from clarity import ProgressEvent, Upscaler
    from clarity.imageio import encode_image
    from clarity.models.catalogue import Catalogue, upscaler_kwargs

    catalogue = Catalogue.discover(args.weights)
    model_id = catalogue.model_id(args.model)
    upscaler = Upscaler.from_pretrained(**upscaler_kwargs(catalogue, model_id), device=args.device,
                                        speed=speed_options(args))
    if upscaler.tiny_model:
        print("note: using the tiny test model; its output has no meaningful detail", file=sys.stderr)

    def produce(job, show_steps: bool) -> tuple[bytes, str]:
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


def _remote_producer(args: argparse.Namespace, params: UpscaleParams):
    """A client for `args.server`; return `produce(job, show_steps) -> (encoded result, description)`."""
    import time

    from clarity.remote import RemoteUpscaler

    # Only what the user set travels (the rest are the server's defaults, which are the same),
    # but always a prompt: OpenAI's `prompt` is required, and an empty one would mean "none".
    fields = {f.name: getattr(args, f.name) for f in param_fields() if getattr(args, f.name) is not None}
    fields.setdefault("prompt", params.prompt)
    remote = RemoteUpscaler(args.server, args.api_key or os.environ.get("CLARITY_API_KEY"), args.model)
    remote.check()  # a wrong URL, key or model fails once, not once per image

    def produce(job, show_steps: bool) -> tuple[bytes, str]:
        started = time.perf_counter()
        data, description = remote.upscale(job, fields, args.quality, args.mask)
        return data, f"({description}) in {time.perf_counter() - started:.1f} s"

    return produce


def _weights_list(args: argparse.Namespace) -> int:
    from clarity.models.catalogue import Catalogue
    from clarity.models.inspection import inspect_weights

    catalogue = Catalogue.discover(args.weights)
    entries = inspect_weights(catalogue, load=args.check)
    rows = [("KIND", "NAME", "SIZE", "STATUS")]
    for entry in entries:
        status = "ok" if entry.ok else "BROKEN"
        notes = ", ".join(entry.notes)
        rows.append((entry.kind, entry.name, _human_size(entry.size_bytes), f"{status} ({notes})" if notes else status))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    layout = "single model folder" if catalogue.single_model else "weights root"
    print(f"{catalogue.root} ({layout}; {'loaded' if args.check else 'files and headers checked'})")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    broken = [entry for entry in entries if not entry.ok]
    for entry in broken:
        print(f"clarity: error: {entry.kind} {entry.name}: {entry.problem}", file=sys.stderr)
    return 1 if broken else 0


def _weights_download(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from clarity.models.download import ChecksumError, HubUnreachable, components, download

    try:
        download(args.weights, components(extras=args.extras, safety_checker=args.safety_checker))
    except (HubUnreachable, ChecksumError, HfHubHTTPError) as error:
        print(f"clarity: error: {error}", file=sys.stderr)
        return 1
    print(f"done; check with `clarity weights list --weights {args.weights}`")
    return 0


def _human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


if __name__ == "__main__":
    sys.exit(main())
