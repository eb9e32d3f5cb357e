"""Tile batching: denoising throughput at tile batch sizes 1, 2, 4 and 8, side by side.

One job (a 512x512 output in 3x3 tiles of 32 latent px) repeated per batch size, sizes
interleaved round by round so that machine noise hits them alike; the ratio to batch size 1
is what to read (absolute CPU timings here are noisy).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from benchmarks.common import Bench

BATCH_SIZES = (1, 2, 4, 8)


def run(bench: Bench) -> dict[str, Any]:
    upscaler = bench.upscaler
    source = Image.new("RGB", (256, 256), (120, 130, 140))
    job = {"num_inference_steps": 4, "creativity": 0.5, "tiling_width": 32, "tiling_height": 32, "seed": 1}
    seconds: dict[int, list[float]] = {size: [] for size in BATCH_SIZES}
    tiles = 0
    for _ in range(1 if bench.quick else 3):
        for size in BATCH_SIZES:
            stats = upscaler.upscale(source, tile_batch_size=size, **job).stats.passes[0]
            seconds[size].append(stats.seconds["denoise"])
            tiles = stats.tiles * stats.denoising_steps
    best = {size: min(values) for size, values in seconds.items()}
    rows = [
        {"tile_batch_size": size, "denoise_seconds": best[size], "tiles_per_second": tiles / best[size],
         "speedup_vs_batch_1": best[1] / best[size]}
        for size in BATCH_SIZES
    ]
    return {"rows": rows, "tiles_per_run": tiles, "device": str(upscaler.device)}


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.bar([str(r["tile_batch_size"]) for r in rows], [r["speedup_vs_batch_1"] for r in rows])
    axis.set_xlabel("tile batch size")
    axis.set_ylabel("throughput vs batch size 1")
    axis.set_title(f"Tile batching ({result['device']}, {result['meta']['model']} model)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
