"""`python -m benchmarks [--quick] [--only NAME ...] [--weights DIR]`.

Each benchmark writes benchmarks/results/<name>.json and <name>.png. Without --weights the
tiny test model is created in a temporary folder: its timings say nothing about real
weights, only about the engine's own overheads and ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import tile_batching, tile_overhead

BENCHMARKS = {"tile_overhead": tile_overhead, "tile_batching": tile_batching}
RESULTS = Path(__file__).with_name("results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer sizes and repeats (a few minutes).")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="Run only these.")
    parser.add_argument("--weights", type=Path, default=None, help="Model folder (default: a fresh tiny model).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available).")
    args = parser.parse_args(argv)

    from clarity import Upscaler
    from clarity.models.tiny import save_tiny_weights

    with tempfile.TemporaryDirectory() as scratch:
        weights = args.weights or save_tiny_weights(Path(scratch) / "tiny")
        upscaler = Upscaler.from_pretrained(weights, device=args.device)
        RESULTS.mkdir(exist_ok=True)
        for name in args.only or BENCHMARKS:
            module = BENCHMARKS[name]
            started = time.perf_counter()
            result = module.run(upscaler, quick=args.quick)
            result["meta"] = {
                "weights": "tiny test model" if upscaler.tiny_model else str(weights),
                "device": str(upscaler.device), "quick": args.quick, "python": platform.python_version(),
                "seconds": round(time.perf_counter() - started, 1),
            }
            (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            module.chart(result, RESULTS / f"{name}.png")
            print(f"{name}: {json.dumps(result['rows'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
