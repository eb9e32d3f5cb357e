"""Server overhead: one job in-process vs. through HTTP with the OpenAI SDK, and concurrent clients.

The real server (`server.py`, one worker) runs in a subprocess with the benchmark's torch
thread count. The same job (512 -> 1024 px, the scaling benchmark's settings) runs in-process
with `Upscaler.upscale` and through `client.images.edit` (PNG in, base64 PNG out), the two
alternating round by round; the ratio of the best times is the server's overhead. Then 1, 2
and 4 clients send small jobs at once and the throughput is counted: with one worker the
requests queue, so the throughput should stay flat, not grow.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Bench, sample_image
from benchmarks.job import GUIDANCE, SEED, STEPS, STRENGTH

SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "server.py"
JOB = {"num_inference_steps": STEPS, "creativity": STRENGTH, "dynamic": GUIDANCE, "seed": SEED}
CLIENTS = (1, 2, 4)


@contextmanager
def running_server(weights: Path, threads: int, startup_seconds: float = 300) -> Iterator[str]:
    """`server.py` on a free local port with one CPU worker; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--weights", str(weights), "--host", "127.0.0.1", "--port", str(port),
         "--accelerator", "cpu", "--workers-per-device", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}):\n{server.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {startup_seconds} s")
            time.sleep(0.5)
        yield url
    finally:
        # Its own session: the HTTP process and the inference worker it spawned stop together.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    sample_image(side, side).save(buffer, format="PNG")
    return buffer.getvalue()


def _edit(url: str, png: bytes) -> None:
    from openai import OpenAI

    from clarity import UpscaleParams

    with OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=3600, max_retries=0) as client:
        response = client.images.edit(model="clarity-upscaler", image=("in.png", png, "image/png"),
                                      prompt=UpscaleParams().prompt, response_format="b64_json", extra_body=JOB)
    assert response.data[0].b64_json


def measure(upscaler, weights: Path, side: int, rounds: int, throughput_side: int, jobs: int) -> dict[str, Any]:
    """In-process vs. HTTP at a `side`/2 -> `side` job, then throughput at 1, 2, 4 clients."""
    source = sample_image(side // 2, side // 2)
    png = _png(side // 2)
    small_png = _png(throughput_side // 2)
    seconds: dict[str, list[float]] = {"in_process": [], "http": []}
    throughput = []
    with running_server(weights, torch.get_num_threads()) as url:
        _edit(url, small_png)  # warm-up of both paths
        upscaler.upscale(sample_image(64, 64), **JOB)
        for round_index in range(rounds):
            order = ("in_process", "http") if round_index % 2 == 0 else ("http", "in_process")
            for path in order:
                started = time.perf_counter()
                if path == "http":
                    _edit(url, png)
                else:
                    upscaler.upscale(source, **JOB)
                seconds[path].append(time.perf_counter() - started)
        for clients in CLIENTS:
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda _: _edit(url, small_png), range(jobs)))
            wall = time.perf_counter() - started
            throughput.append({"clients": clients, "jobs": jobs, "seconds": wall,
                               "images_per_minute": jobs * 60 / wall})
    best = {path: min(values) for path, values in seconds.items()}
    for row in throughput:
        row["vs_one_client"] = row["images_per_minute"] / throughput[0]["images_per_minute"]
    return {
        "overhead": {"side": side, "rounds": rounds, "seconds": seconds, "best": best,
                     "http_over_in_process": best["http"] / best["in_process"], "target": 1.05},
        "throughput": {"side": throughput_side, "workers": 1, "rows": throughput},
        "torch_threads": torch.get_num_threads(),
    }


def run(bench: Bench) -> dict[str, Any]:
    result = measure(bench.upscaler, bench.weights, side=1024, rounds=1 if bench.quick else 3,
                     throughput_side=256 if bench.quick else 512, jobs=4 if bench.quick else 8)
    overhead = result.pop("overhead")
    return {"rows": [overhead], **result}


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overhead, rows = result["rows"][0], result["throughput"]["rows"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(["in-process", "HTTP + OpenAI SDK"], [overhead["best"]["in_process"], overhead["best"]["http"]])
    left.set_ylabel("seconds (best)")
    left.set_title(f"{overhead['side'] // 2} -> {overhead['side']} px: ratio {overhead['http_over_in_process']:.3f}")
    right.bar([str(r["clients"]) for r in rows], [r["images_per_minute"] for r in rows])
    right.set_xlabel("concurrent clients (1 worker)")
    right.set_ylabel("images per minute")
    right.set_title(f"Throughput, {result['throughput']['side']} px outputs")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
