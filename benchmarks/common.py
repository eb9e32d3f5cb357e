"""What the benchmarks share: the run's context, a test image, machine load and capped child runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Bench:
    """One `python -m benchmarks` run: the loaded engine, the folder it came from, and the mode."""

    upscaler: Any  # clarity.Upscaler (imported lazily: `python -m benchmarks --help` stays fast)
    weights: Path
    quick: bool


def sample_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic image with gradients, a disc and noise: structure for the models to react to."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 3) ** 2
    array = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), np.where(disc, 220.0, 40.0)], axis=-1
    )
    array += rng.normal(0, 12, array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def machine() -> dict[str, Any]:
    """The machine and its load now: timings from a shared or busy machine must be read with the load,
    and timings from different CPUs (with or without native bf16 matrix units) are not comparable."""
    return {"load_average_1_5_15": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count(), **cpu_model()}


def cpu_model() -> dict[str, Any]:
    """The CPU's model name and which of its bf16 features torch's CPU kernels use (Linux; empty elsewhere)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return {"cpu_model": names[0] if names else None,
            "cpu_bf16_features": sorted(set(flags) & {"avx512_bf16", "amx_bf16", "amx_tile"})}


def run_capped(args: list[str], max_seconds: float, max_rss_bytes: int) -> dict[str, Any]:
    """Run `python -m <args>` in a fresh process; its last stdout line is its JSON result.

    The child is killed when it runs longer than `max_seconds` or its resident memory
    (polled every 0.1 s) exceeds `max_rss_bytes`; the result then says which cap stopped it.
    A fresh process per job is what makes each job's peak RSS its own.
    """
    import psutil  # an accelerate dependency, so always installed with the engine

    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    process = psutil.Process(child.pid)
    peak = 0
    stopped = None
    while child.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        elapsed = time.perf_counter() - started
        if elapsed > max_seconds:
            stopped = f"time cap: still running after {max_seconds:.0f} s"
        elif peak > max_rss_bytes:
            stopped = f"memory cap: RSS over {max_rss_bytes / 1e9:.1f} GB"
        if stopped:
            child.kill()
            child.communicate()
            return {"stopped": stopped, "seconds_until_stopped": round(elapsed, 1)}
        time.sleep(0.1)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"benchmark job {args} failed ({child.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])
