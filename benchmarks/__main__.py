"""`python -m benchmarks [--quick] [--only NAME ...] [--model random-sd15|tiny] [--weights DIR] [--replace-committed]`.

Each benchmark writes <name>.json and <name>.png (no chart when it was skipped) into
benchmarks/results/latest/ (ignored by git), or over the committed benchmarks/results/ with
--replace-committed. By default it runs on the full-size random SD1.5 (`clarity.testing.random_sd15`),
written once into benchmarks/.cache/: real sizes, so real timings, but meaningless images.
`--model tiny` runs on a fresh tiny test model instead, whose timings say nothing about real
weights, only about the engine's own overheads and ratios. Every JSON records its model in `meta.model`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import (
    gpu,
    large_output,
    preview,
    scaling,
    seams,
    server_overhead,
    tile_batching,
    tile_overhead,
    time_shares,
    vae,
)
from benchmarks.common import Bench, machine

BENCHMARKS = {
    "tile_overhead": tile_overhead,
    "tile_batching": tile_batching,
    "scaling": scaling,
    "time_shares": time_shares,
    "vae": vae,
    "server_overhead": server_overhead,
    "large_output": large_output,
    "seams": seams,
    "preview": preview,
    "gpu": gpu,
}
#: The committed results the README shows; a run replaces them only with --replace-committed.
RESULTS = Path(__file__).with_name("results")
#: Where a run writes by default (ignored by git): committed figures change only on purpose.
LATEST_RESULTS = RESULTS / "latest"
#: The full-size random model, written once on first use (ignored by git; ~5.4 GB).
RANDOM_MODEL_CACHE = Path(__file__).with_name(".cache") / "random-sd15"
#: What --model accepts: the default full-size random SD1.5, or the tiny test model (the test suite's).
MODELS = ("random-sd15", "tiny")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer sizes and repeats (a few minutes).")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="Run only these.")
    parser.add_argument("--model", choices=MODELS, default="random-sd15",
                        help=f"random-sd15: SD1.5's real sizes, random weights, written once into {RANDOM_MODEL_CACHE}"
                             " (default); tiny: a fresh tiny test model (fast; its timings say little).")
    parser.add_argument("--weights", type=Path, default=None, help="Model folder to run on instead of --model.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"Output folder (default: {LATEST_RESULTS}, or {RESULTS} with --replace-committed).")
    parser.add_argument("--replace-committed", action="store_true",
                        help=f"Write into {RESULTS}, replacing the committed results the README shows.")
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = RESULTS if args.replace_committed else LATEST_RESULTS
    return args


def cached_random_model(folder: Path = RANDOM_MODEL_CACHE) -> Path:
    """The full-size random model in `folder`, written there first if absent.

    Written beside it and renamed into place, so an interrupted write is never taken for a
    complete model by the next run.
    """
    from clarity.testing.random_sd15 import save_random_sd15

    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        print(f"writing the full-size random model into {folder} (once; ~5.4 GB)")
        save_random_sd15(partial)
        partial.rename(folder)
    return folder


def model_weights(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """The folder to load and the model name every result records: "random-sd15", "tiny" or the --weights path."""
    from clarity.testing.tiny import save_tiny_weights

    if args.weights is not None:
        return args.weights, str(args.weights)
    if args.model == "tiny":
        return save_tiny_weights(scratch / "tiny"), "tiny"
    return cached_random_model(), "random-sd15"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from clarity import Upscaler

    with tempfile.TemporaryDirectory() as scratch:
        weights, model = model_weights(args, Path(scratch))
        upscaler = Upscaler.from_pretrained(weights, device=args.device)
        bench = Bench(upscaler=upscaler, weights=weights, quick=args.quick)
        args.results.mkdir(parents=True, exist_ok=True)
        for name in args.only or BENCHMARKS:
            run_one(name, bench, model, args)
    return 0


def run_one(name: str, bench: Bench, model: str, args: argparse.Namespace) -> None:
    """Run benchmark `name`; write its JSON (with the model and the machine's load) and chart into args.results."""
    module = BENCHMARKS[name]
    started = time.perf_counter()
    load_before = machine()
    result = module.run(bench)
    result["meta"] = {
        "model": model, "device": str(bench.upscaler.device), "quick": args.quick, "python": platform.python_version(),
        "seconds": round(time.perf_counter() - started, 1),
        "machine_before": load_before, "machine_after": machine(),
    }
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    chart = args.results / f"{name}.png"
    if "skipped" in result:
        chart.unlink(missing_ok=True)  # a chart from an earlier run would no longer match its JSON
        print(f"{name}: skipped: {result['skipped']}")
    else:
        module.chart(result, chart)
        print(f"{name}: {json.dumps(result['rows'])}")


if __name__ == "__main__":
    sys.exit(main())
