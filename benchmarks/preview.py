"""Preview cost: one `ProgressEvent.preview()` against one denoising step, and what an uncalled one costs.

In an upscale to a 1024x1024 output (512 with --quick; 2 denoising steps, guidance off, seed 1),
every preview is timed inside the progress callback, and a step's time is the pass's denoise time
over its steps in a run with the same seed that never calls a preview. Apart from any model, on a
4x128x128 latent (a 1024x1024 pass; median of 50): the preview, its linear map and its resize
separately, and what the denoising loop spends per step on a preview nobody calls (the estimate's
closure and the `StepPreview` around the callback, after a DPM-Solver++ step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from benchmarks.common import Bench, sample_image
from benchmarks.job import GUIDANCE, SEED

SIDE, QUICK_SIDE = 1024, 512
#: 4 scheduler steps at strength 0.5: 2 denoising steps, so 2 previews per upscale.
STEPS, STRENGTH = 4, 0.5
#: The latent of a 1024x1024 pass, and its output size.
LATENT_SHAPE, LATENT_OUTPUT = (1, 4, 128, 128), (1024, 1024)
REPEATS = 50


def median_seconds(work: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of `work()` over `repeats` calls, after one call to warm up."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def in_upscale(upscaler, side: int) -> dict[str, Any]:
    """Seconds per denoising step (no preview called) and per preview call, in an upscale to `side`."""
    source = sample_image(side // 2, side // 2)
    job = {"num_inference_steps": STEPS, "creativity": STRENGTH, "dynamic": GUIDANCE, "seed": SEED}
    upscaler.upscale(sample_image(64, 64), **job)  # warm-up: first-call allocations and kernel choices
    unseen = upscaler.upscale(source, progress=lambda event: None, **job).stats.passes[0]
    previews: list[float] = []

    def look(event) -> None:
        if event.preview is not None:
            started = time.perf_counter()
            event.preview()
            previews.append(time.perf_counter() - started)

    seen = upscaler.upscale(source, progress=look, **job).stats.passes[0]
    step = unseen.seconds["denoise"] / unseen.denoising_steps
    return {
        "side": side, "latent_size": list(unseen.latent_size), "step_seconds": step,
        "preview_seconds": statistics.median(previews), "preview_share_of_step": statistics.median(previews) / step,
        "denoise_seconds_without_previews": unseen.seconds["denoise"],
        "denoise_seconds_with_previews": seen.seconds["denoise"],
    }


def latent_alone(scheduler_config: dict, device: torch.device) -> dict[str, Any]:
    """The preview of a 4x128x128 latent, its parts, and the per-step cost of one nobody calls."""
    from clarity.engine.preview import latents_to_rgb, preview_image, preview_size, step_preview
    from clarity.engine.schedulers import denoised_estimate, make_scheduler
    from clarity.engine.vae import VAE_SCALE

    generator = torch.Generator().manual_seed(SEED)
    sample, noise = (torch.randn(LATENT_SHAPE, generator=generator).to(device) for _ in range(2))
    rgb = latents_to_rgb(sample)
    visible = (0, 0, LATENT_OUTPUT[0] / VAE_SCALE, LATENT_OUTPUT[1] / VAE_SCALE)
    scheduler = make_scheduler("DPM++ 2M Karras", scheduler_config)
    scheduler.set_timesteps(STEPS)
    output = scheduler.step(noise, scheduler.timesteps[0], sample)

    def uncalled() -> None:
        with step_preview(denoised_estimate(scheduler, output, noise, sample), LATENT_OUTPUT):
            pass

    return {
        "latent_shape": list(LATENT_SHAPE), "output_size": list(LATENT_OUTPUT), "device": str(device),
        "preview_seconds": median_seconds(lambda: preview_image(sample, LATENT_OUTPUT)),
        "map_seconds": median_seconds(lambda: latents_to_rgb(sample)),
        "resize_seconds": median_seconds(
            lambda: rgb.resize(preview_size(LATENT_OUTPUT), Image.Resampling.BILINEAR, box=visible)
        ),
        "estimate_seconds": median_seconds(lambda: denoised_estimate(scheduler, output, noise, sample)()),
        "uncalled_preview_seconds": median_seconds(uncalled),
    }


def run(bench: Bench) -> dict[str, Any]:
    upscaler = bench.upscaler
    return {
        "rows": [in_upscale(upscaler, QUICK_SIDE if bench.quick else SIDE)],
        "latent_alone": latent_alone(upscaler.pipeline.scheduler_config, upscaler.device),
    }


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row, alone = result["rows"][0], result["latent_alone"]
    bars = {
        f"denoising step ({row['side']} px)": row["step_seconds"],
        "preview in that upscale": row["preview_seconds"],
        "preview of a 4x128x128 latent": alone["preview_seconds"],
        "uncalled preview, per step": alone["uncalled_preview_seconds"],
    }
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.barh(list(bars), [seconds * 1000 for seconds in bars.values()])
    axis.set_xscale("log")
    axis.set_xlabel("milliseconds (log scale)")
    axis.set_title(f"Preview cost ({result['meta']['model']} model, {result['meta']['device']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
