"""GPU: seconds per output megapixel, denoising it/s and peak VRAM at the original's defaults.

Runs only on CUDA with real weights (`python -m benchmarks --weights DIR`); otherwise the
result is `{"skipped": reason}`. Every size runs with `UpscaleParams()` defaults (scale 2, 18
steps at creativity 0.35, guidance 6, 112x144 latent tiles, tile batch 8), best of the rounds.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.common import Bench, sample_image

#: Output sides: 1, 4 and 16.8 MP (--quick: 1 MP).
SIDES = (1024, 2048, 4096)
QUICK_SIDES = (1024,)


def skip_reason(upscaler) -> str | None:
    if upscaler.device.type != "cuda":
        return f"no CUDA device (the engine runs on {upscaler.device})"
    if upscaler.tiny_model:
        return "the tiny test model says nothing about real weights: pass --weights with SD1.5 + ControlNet-tile"
    return None


def measure(upscaler, side: int, rounds: int) -> dict[str, Any]:
    source = sample_image(side // 2, side // 2)
    best = None
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stats = upscaler.upscale(source, seed=1).stats  # upscale returns CPU images: it has synchronized
        if best is None or stats.seconds < best[0].seconds:
            best = (stats, torch.cuda.max_memory_allocated())
    stats, peak = best
    steps = sum(p.denoising_steps for p in stats.passes)
    denoise = stats.seconds_by_stage["denoise"]
    return {
        "side": side, "megapixels": side * side / 1e6, "seconds": stats.seconds,
        "seconds_per_mp": stats.seconds / (side * side / 1e6),
        "denoising_it_per_s": steps / denoise, "tiles": sum(p.tiles for p in stats.passes),
        "peak_vram_gb": peak / 2**30, "seconds_by_stage": stats.seconds_by_stage,
    }


def run(bench: Bench) -> dict[str, Any]:
    reason = skip_reason(bench.upscaler)
    if reason:
        return {"skipped": reason, "rows": []}
    bench.upscaler.upscale(sample_image(64, 64), seed=1)  # warm-up: CUDA context, kernel selection
    sides = QUICK_SIDES if bench.quick else SIDES
    rows = [measure(bench.upscaler, side, rounds=1 if bench.quick else 2) for side in sides]
    return {"rows": rows, "gpu": torch.cuda.get_device_name(bench.upscaler.device)}


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r['megapixels']:.0f} MP" for r in rows]
    left.bar(labels, [r["seconds_per_mp"] for r in rows])
    left.set_ylabel("seconds per output MP")
    right.bar(labels, [r["peak_vram_gb"] for r in rows])
    right.set_ylabel("peak VRAM (GB)")
    figure.suptitle(f"{result['gpu']}, defaults")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
