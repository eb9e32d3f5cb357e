"""`clarity weights list | download | tiny | random-sd15`: what is installed, fetching the recommended
set, and writing the tiny test model or the full-size random benchmark model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clarity.api.config import ServerConfig
from clarity.cli.options import add_option_flags

#: What `clarity weights tiny --format` accepts: the test model's formats, or all of them.
TINY_FORMATS = ("diffusers", "single-file", "extras", "all")


def add_parser(commands: argparse._SubParsersAction) -> None:
    weights = commands.add_parser("weights", help="Manage model weights.")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    listing = weights_commands.add_parser(
        "list", help="List installed models and extras with their size and whether they are usable."
    )
    add_option_flags(listing, ServerConfig, only=("weights",))
    listing.add_argument("--check", action="store_true",
                         help="Really load every model on the CPU (slow) instead of checking files and headers.")
    listing.set_defaults(run=run_list)
    fetch = weights_commands.add_parser(
        "download", help="Download the recommended weights from the Hugging Face hub (checksummed, resumable)."
    )
    add_option_flags(fetch, ServerConfig, only=("weights",))
    fetch.add_argument("--extras", action="store_true",
                       help="Also the 4x-UltraSharp ESRGAN pre-upscaler and the more_details LoRA.")
    fetch.add_argument("--safety-checker", action="store_true", help="Also the SD safety checker.")
    fetch.set_defaults(run=run_download)
    tiny = weights_commands.add_parser(
        "tiny", help="Write the tiny random SD1.5-shaped test model (no meaningful output; for tests and demos)."
    )
    tiny.add_argument("folder", type=Path, help="Where to write it, e.g. weights/tiny.")
    tiny.add_argument("--format", choices=TINY_FORMATS, default="diffusers",
                      help="diffusers: the diffusers folder layout (default); single-file: original-format"
                           " SD checkpoint, ControlNet and VAE files (.safetensors, .ckpt, .pth); extras: a"
                           " LoRA, an embedding, an ESRGAN pre-upscaler and a safety checker; all: everything.")
    tiny.set_defaults(run=run_tiny)
    random_sd15 = weights_commands.add_parser(
        "random-sd15",
        help="Write a full-size SD1.5 + ControlNet-tile with random weights (~5.5 GB; real speed, no meaningful"
             " output; for benchmarks).",
    )
    random_sd15.add_argument("folder", type=Path, help="Where to write it, e.g. weights/random-sd15.")
    random_sd15.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default 0).")
    random_sd15.set_defaults(run=run_random_sd15)


def run_list(args: argparse.Namespace) -> int:
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


def run_download(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from clarity.models.download import ChecksumError, HubUnreachable, components, download

    try:
        download(args.weights, components(extras=args.extras, safety_checker=args.safety_checker))
    except (HubUnreachable, ChecksumError, HfHubHTTPError) as error:
        print(f"clarity: error: {error}", file=sys.stderr)
        return 1
    print(f"done; check with `clarity weights list --weights {args.weights}`")
    return 0


def run_tiny(args: argparse.Namespace) -> int:
    from clarity.testing.tiny import FORMATS, save_tiny_weights

    save_tiny_weights(args.folder, formats=FORMATS if args.format == "all" else (args.format,))
    print(f"wrote the tiny test model ({args.format}) to {args.folder}")
    return 0


def run_random_sd15(args: argparse.Namespace) -> int:
    from clarity.testing.random_sd15 import save_random_sd15

    save_random_sd15(args.folder, seed=args.seed)
    print(f"wrote the full-size random model to {args.folder} (for benchmarks: its outputs have no meaningful detail)")
    return 0


def _human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
