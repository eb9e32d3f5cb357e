"""Torch threads on the CPU, side by side: `python -m benchmarks.threads [--side 512] [--rounds 2] [--jobs 2]`.

The benchmark job (benchmarks/job.py's steps, strength, guidance and seed; scale 2 to `--side`)
run by worker processes that load the model once, wait for a go, then run `--jobs` jobs and
report each job's seconds. Three cases, each round by round with the arms alternating:

- `one worker, quiet`: one worker at 1 thread against one at all CPUs (what `--threads` auto
  picks for a lone worker);
- `one worker, loaded`: the same while one busy-looping process per CPU competes for the cores
  (another program's work on a shared machine, which no thread policy can see);
- `two workers`: two workers at once (`--workers-per-device 2` on the CPU), each at CPUs / 2
  threads (what auto picks now) against each at all CPUs (torch's default before: twice as many
  threads as cores); throughput is the jobs of both over the wall time from go to the last end.

Writes every arm with the load average and CPU pressure (PSI) around it, and the ratios per round,
into benchmarks/results/latest/threads.json (ignored by git; --output elsewhere). By default on
the full-size random model (benchmarks/.cache/random-sd15, written once if absent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import machine

#: A worker's line saying its model is loaded and it waits for a line on stdin.
READY = "ready"


def cpu_pressure() -> float | None:
    """Linux PSI: the share of the last 10 s in which some runnable task waited for a CPU (%)."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return float(dict(part.split("=") for part in first.split()[1:])["avg10"])


def load() -> dict[str, Any]:
    return {"load_average_1m": machine()["load_average_1_5_15"][0], "cpu_pressure_avg10": cpu_pressure()}


def worker(weights: Path, threads: int, jobs: int, side: int) -> None:
    """Load the model with `threads`, say READY, wait for a line, run `jobs` jobs, print their seconds."""
    import torch

    from benchmarks.common import sample_image
    from benchmarks.job import GUIDANCE, SEED, STEPS, STRENGTH
    from clarity import SpeedOptions, UpscaleParams, Upscaler

    torch.set_grad_enabled(False)
    upscaler = Upscaler.from_pretrained(weights, device="cpu", speed=SpeedOptions(threads=threads))
    source = sample_image(side // 2, side // 2)
    params = UpscaleParams(num_inference_steps=STEPS, creativity=STRENGTH, dynamic=GUIDANCE, seed=SEED)
    print(READY, flush=True)
    sys.stdin.readline()
    seconds = []
    for _ in range(jobs):
        started = time.perf_counter()
        upscaler.upscale(source, params)
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"seconds": seconds, "torch_threads": torch.get_num_threads()}), flush=True)


def start_worker(weights: Path, threads: int, jobs: int, side: int) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.threads", "--worker", "--weights", str(weights),
                             "--threads", str(threads), "--jobs", str(jobs), "--side", str(side)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def run_arm(weights: Path, threads: list[int], jobs: int, side: int) -> dict[str, Any]:
    """Workers at `threads` (one each) loaded, then started together: their job seconds and the wall time."""
    workers = [start_worker(weights, count, jobs, side) for count in threads]
    for process in workers:
        line = process.stdout.readline().strip()
        if line != READY:
            raise RuntimeError(f"a worker did not load (exit {process.wait()}): {line!r}")
    before = load()
    started = time.perf_counter()
    for process in workers:
        process.stdin.write("go\n")
        process.stdin.flush()
    results = [json.loads(process.stdout.readline()) for process in workers]
    wall = time.perf_counter() - started
    for process in workers:
        process.wait(60)
    return {"threads": threads, "wall_seconds": round(wall, 2),
            "jobs_per_minute": round(60 * jobs * len(threads) / wall, 3),
            "job_seconds": [round(s, 2) for result in results for s in result["seconds"]],
            "torch_threads": [result["torch_threads"] for result in results], "before": before, "after": load()}


@contextlib.contextmanager
def busy_cpus(count: int) -> Iterator[None]:
    """`count` processes spinning on a CPU each, for the duration of the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import LATEST_RESULTS, cached_random_model
    from clarity.engine.threads import usable_cpus

    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=512, help="Output side (px, square; the input is half).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="Jobs per worker per arm.")
    parser.add_argument("--cases", nargs="+", default=["quiet", "loaded", "two_workers"],
                        choices=["quiet", "loaded", "two_workers"])
    parser.add_argument("--weights", type=Path, default=None, help="Model folder (default: full-size random).")
    parser.add_argument("--output", type=Path, default=LATEST_RESULTS / "threads.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.weights, args.threads, args.jobs, args.side)
        return 0
    weights = args.weights or cached_random_model()
    cpus = int(usable_cpus())
    # Arm name -> threads per worker; the first arm of each case is the yardstick of its ratios.
    cases = {"quiet": {"1 thread": [1], f"{cpus} threads": [cpus]},
             "loaded": {"1 thread": [1], f"{cpus} threads": [cpus]},
             "two_workers": {f"{max(cpus // 2, 1)} thread(s) each (auto)": [max(cpus // 2, 1)] * 2,
                             f"{cpus} threads each (torch's default)": [cpus] * 2}}
    rows = []
    for case in args.cases:
        arms = cases[case]
        with busy_cpus(cpus) if case == "loaded" else contextlib.nullcontext():
            for round_index in range(args.rounds):
                for arm in list(arms) if round_index % 2 == 0 else list(arms)[::-1]:
                    row = {"case": case, "arm": arm, "round": round_index,
                           **run_arm(weights, arms[arm], args.jobs, args.side)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary = {}
    for case in args.cases:
        first, *others = cases[case]
        for other in others:
            ratios = [b["jobs_per_minute"] / a["jobs_per_minute"] for a in rows for b in rows
                      if a["case"] == b["case"] == case and a["round"] == b["round"]
                      and a["arm"] == first and b["arm"] == other]
            summary[f"{case}: throughput of {other} / {first}"] = {
                "per_round": [round(r, 3) for r in ratios], "median": round(statistics.median(ratios), 3)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": str(args.weights or "random-sd15"), "side": args.side,
                                       "cpus": cpus, "rows": rows, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
