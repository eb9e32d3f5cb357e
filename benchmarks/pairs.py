"""Engines side by side, repeated: `python -m benchmarks.pairs [--sides 512 1024] [--engines ...] [--rounds 2]`.

Runs benchmarks/job.py (a fresh process per job, model loading excluded from its seconds) for
each output side, round by round, the engines in turn (in reverse order every other round, so
that neither always follows the other), and writes every job with the machine's load before
it, and per round the ratio of each engine's seconds to the first engine's, into
benchmarks/results/latest/pairs.json (ignored by git; --output elsewhere). By default on the
full-size random model (benchmarks/.cache/random-sd15, written once if absent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.common import machine, run_capped
from benchmarks.job import ENGINES, add_params_option

#: Per job; the naive pipelines at 1 MP take minutes on 2 cores, more on a loaded machine.
MAX_SECONDS = 1800
MAX_RSS_BYTES = 20 * 10**9


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import LATEST_RESULTS, cached_random_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024], help="Output sides (px, square).")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["clarity", "naive", "naive_fast_vae"],
                        help="The first is the yardstick of the ratios.")
    parser.add_argument("--rounds", type=int, default=2)
    add_params_option(parser)
    parser.add_argument("--weights", type=Path, default=None, help="Model folder (default: full-size random).")
    parser.add_argument("--output", type=Path, default=LATEST_RESULTS / "pairs.json")
    args = parser.parse_args(argv)
    weights = args.weights or cached_random_model()
    rows = []
    for side in args.sides:
        for round_index in range(args.rounds):
            order = args.engines if round_index % 2 == 0 else args.engines[::-1]
            for engine in order:
                load = machine()["load_average_1_5_15"]
                result = run_capped(["benchmarks.job", engine, "--weights", str(weights), "--side", str(side),
                                     "--params", args.params], MAX_SECONDS, MAX_RSS_BYTES)
                rows.append({"side": side, "round": round_index, "engine": engine, "load_before": load, **result})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    yardstick = args.engines[0]
    for side in args.sides:
        for engine in args.engines[1:]:
            ratios = [other["seconds"] / base["seconds"] for base in rows for other in rows
                      if base["side"] == other["side"] == side and base["round"] == other["round"]
                      and base["engine"] == yardstick and other["engine"] == engine
                      and "seconds" in base and "seconds" in other]
            if ratios:
                summary[f"{side}: {engine} / {yardstick}"] = {
                    "per_round": [round(r, 3) for r in ratios], "median": round(statistics.median(ratios), 3)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": str(args.weights or "random-sd15"), "params": args.params,
                                       "machine": machine(), "rows": rows, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
