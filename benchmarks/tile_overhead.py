"""Tile overhead: latent area processed per denoising step / latent area of the image.

Three planners at the original's tile limits: this project's (fewest tiles, shrunk to fit,
overlap >= 8, spread evenly), the original Clarity's fixed grid (112x144 tiles, overlap 4,
A1111 Tiled Diffusion) and refiners' MultiUpscaler formula (full-size tiles, n = ceil((L - t) /
(t - 8)) + 1). All three are computed; ours is also measured by counting the UNet's input
area during a real run on the tiny model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.common import Bench
from clarity.engine.tiling import plan_tiles

TILE_WIDTH, TILE_HEIGHT = 112, 144  # latent pixels, the original's defaults


def _fixed_grid_axis(length: int, tile: int, overlap: int) -> int:
    """Processed length along one axis for full-size tiles (clamped to the image) at a fixed stride."""
    tile = min(tile, length)
    count = 1 if length <= tile else math.ceil((length - overlap) / (tile - overlap))
    return count * tile


def _refiners_axis(length: int, tile: int, min_overlap: int = 8) -> int:
    tile = min(tile, length)
    count = math.ceil((length - tile) / (tile - min_overlap)) + 1
    return count * tile


def computed_ratios(side_px: int) -> dict[str, float]:
    latent = side_px // 8
    area = latent * latent
    ours = plan_tiles(latent, latent, TILE_HEIGHT, TILE_WIDTH, 8).area_ratio
    original = _fixed_grid_axis(latent, TILE_WIDTH, 4) * _fixed_grid_axis(latent, TILE_HEIGHT, 4) / area
    refiners = _refiners_axis(latent, TILE_WIDTH) * _refiners_axis(latent, TILE_HEIGHT) / area
    fewest_w = 1 if latent <= TILE_WIDTH else math.ceil((latent - 8) / (TILE_WIDTH - 8))
    fewest_h = 1 if latent <= TILE_HEIGHT else math.ceil((latent - 8) / (TILE_HEIGHT - 8))
    least = (latent + (fewest_w - 1) * 8) * (latent + (fewest_h - 1) * 8) / area
    return {"ours": ours, "original_clarity": original, "refiners": refiners, "least_possible": least}


def measured_ratio(upscaler, side_px: int) -> float:
    """Run one denoising step to a `side_px` square output and count the UNet's input area."""
    from PIL import Image

    seen = {"area": 0}

    def count(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        seen["area"] += sample.shape[0] * sample.shape[-2] * sample.shape[-1]

    handle = upscaler.pipeline.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        source = Image.new("RGB", (side_px // 2, side_px // 2), (120, 130, 140))
        result = upscaler.upscale(source, num_inference_steps=2, creativity=0.5, dynamic=1.0)
    finally:
        handle.remove()
    latent = side_px // 8
    steps = result.stats.passes[0].denoising_steps
    return seen["area"] / steps / (latent * latent)


def run(bench: Bench) -> dict[str, Any]:
    sides = [1024, 2048, 4096, 8192]
    measured_sides = [1024] if bench.quick else [1024, 2048]
    rows = []
    for side in sides:
        row = {"output": f"{side}x{side}", "megapixels": round(side * side / 1e6, 1), **computed_ratios(side)}
        if side in measured_sides:
            with torch.no_grad():
                row["ours_measured"] = measured_ratio(bench.upscaler, side)
        rows.append(row)
    return {"rows": rows, "tile_limits_latent": [TILE_WIDTH, TILE_HEIGHT], "min_overlap": 8}


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["output"] for r in rows]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.2
    for offset, (key, name) in enumerate(
        [("original_clarity", "original Clarity grid"), ("refiners", "refiners"), ("ours", "Clarity (this)"),
         ("least_possible", "least possible")]
    ):
        axis.bar([i + (offset - 1.5) * width for i in range(len(rows))], [r[key] for r in rows], width, label=name)
    axis.set_xticks(range(len(rows)), labels)
    axis.set_ylabel("latent area processed per step / image latent area")
    axis.set_ylim(1.0, max(r["original_clarity"] for r in rows) * 1.05)
    axis.legend()
    axis.set_title("Tile overhead (112x144 latent tiles)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
