"""`python -m benchmarks [--quick] [--only NAME ...] [--weights DIR]`.

Each benchmark writes benchmarks/results/<name>.json and <name>.png (no chart when it was
skipped). Without --weights the tiny test model is created in a temporary folder: its timings
say nothing about real weights, only about the engine's own overheads and ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import (
    gpu,
    large_output,
    scaling,
    seams,
    server_overhead,
    tile_batching,
    tile_overhead,
    time_shares,
)
from benchmarks.common import Bench, machine

BENCHMARKS = {
    "tile_overhead": tile_overhead,
    "tile_batching": tile_batching,
    "scaling": scaling,
    "time_shares": time_shares,
    "server_overhead": server_overhead,
    "large_output": large_output,
    "seams": seams,
    "gpu": gpu,
}
RESULTS = Path(__file__).with_name("results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer sizes and repeats (a few minutes).")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="Run only these.")
    parser.add_argument("--weights", type=Path, default=None, help="Model folder (default: a fresh tiny model).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"Output folder (default: {RESULTS}).")
    args = parser.parse_args(argv)

    from clarity import Upscaler
    from clarity.testing.tiny import save_tiny_weights

    with tempfile.TemporaryDirectory() as scratch:
        weights = args.weights or save_tiny_weights(Path(scratch) / "tiny")
        upscaler = Upscaler.from_pretrained(weights, device=args.device)
        bench = Bench(upscaler=upscaler, weights=weights, quick=args.quick)
        args.results.mkdir(parents=True, exist_ok=True)
        for name in args.only or BENCHMARKS:
            module = BENCHMARKS[name]
            started = time.perf_counter()
            load_before = machine()
            result = module.run(bench)
            result["meta"] = {
                "weights": "tiny test model" if upscaler.tiny_model else str(weights),
                "device": str(upscaler.device), "quick": args.quick, "python": platform.python_version(),
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
