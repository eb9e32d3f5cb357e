"""The GPU check: `python -m benchmarks.gpu` on a CUDA machine, no downloaded weights, within ~8 minutes.

It writes the full-size random SD1.5 + ControlNet-tile (benchmarks/.cache/random-sd15, once;
real sizes and FLOPs, meaningless images) unless --weights names a model, then runs the job of
the original's defaults (`UpscaleParams()`: scale 2, 18 steps at creativity 0.35 = 6 denoising
steps, guidance 6, 112x144 latent tiles) from 1024 to 2048 px and from 2048 to 4096 px, in fp16:

- Clarity with `--channels-last` off and on, and `--compile` off and on (a compiled arm runs
  each size twice: its first run compiles, its second is the one compared);
- diffusers' naive `StableDiffusionControlNetImg2ImgPipeline` on the whole image, with and
  without `vae.enable_tiling()`, given the same components (fp16 UNet and ControlNet, the VAE as
  Clarity's `--vae-dtype auto` runs it: bf16 on compute capability 8.0+).

Per job: seconds (CUDA synchronised), denoising steps per second over the denoise stage, the
VAE's share of the job, and peak VRAM (`torch.cuda.max_memory_allocated`). Arms run in order
(Clarity eager first) until `--budget-seconds` is spent; an arm it cannot start is listed as not
run. Results go to benchmarks/results/latest/gpu.json (--output elsewhere); without CUDA the
JSON says why it was skipped. `python -m benchmarks --only gpu` runs the same check.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: Output sides (the inputs are half): 4.2 and 16.8 MP.
SIDES, QUICK_SIDES = (2048, 4096), (2048,)
#: Clarity arm -> (--channels-last, --compile).
CLARITY_ARMS = {"clarity": (False, False), "clarity_channels_last": (True, False),
                "clarity_compile": (False, True), "clarity_channels_last_compile": (True, True)}
NAIVE_ARMS = ("naive", "naive_vae_tiling")
#: The order arms run in, most telling first: the budget may stop the last ones.
ORDER = ("clarity", "naive_vae_tiling", "naive", "clarity_channels_last", "clarity_compile",
         "clarity_channels_last_compile")
#: The issue's bound for the whole check, model writing included.
BUDGET_SECONDS = 480


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device here (a CPU-only machine or torch build); run it on a GPU machine"
    return None


def load(weights: Path, arm: str):
    """The engine for `arm` on CUDA: fp16 models, the VAE at Clarity's default for Clarity's arms, in fp16
    for the naive ones (what a diffusers user loading with `torch_dtype=torch.float16` gets)."""
    from clarity import SpeedOptions, Upscaler

    channels_last, compile_ = CLARITY_ARMS.get(arm, (False, False))
    vae_dtype = "fp16" if arm in NAIVE_ARMS else "auto"
    speed = SpeedOptions(dtype="fp16", vae_dtype=vae_dtype, channels_last=channels_last, compile=compile_)
    return Upscaler.from_pretrained(weights, device="cuda", speed=speed, max_output_pixels=max(SIDES) ** 2)


def timed_job(upscaler, arm: str, side: int) -> dict[str, Any]:
    """One job of the defaults to side x side on `arm`: seconds, denoising steps per second, VAE share, peak VRAM."""
    from benchmarks.common import sample_image
    from benchmarks.job import naive_pipeline, run_naive
    from clarity import UpscaleParams

    params = UpscaleParams(seed=1)
    source = sample_image(side // 2, side // 2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    row: dict[str, Any] = {"arm": arm, "side": side}
    try:
        if arm in NAIVE_ARMS:
            run_naive(naive_pipeline(upscaler, params, arm), source, side, params)
        else:
            stats = upscaler.upscale(source, params).stats
            stages = stats.seconds_by_stage
            row["denoising_steps_per_second"] = round(sum(p.denoising_steps for p in stats.passes)
                                                      / stages["denoise"], 3)
            row["vae_share"] = round((stages.get("vae_encode", 0) + stages.get("vae_decode", 0)) / stats.seconds, 3)
            row["tiles"] = sum(p.tiles for p in stats.passes)
        torch.cuda.synchronize()
        row["seconds"] = round(time.perf_counter() - started, 2)
    except torch.cuda.OutOfMemoryError as error:
        row["failed"] = f"out of GPU memory: {str(error).splitlines()[0]}"
    row["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(row), flush=True)
    return row


def run_arm(weights: Path, arm: str, sides: tuple[int, ...]) -> list[dict[str, Any]]:
    """`arm`'s jobs: a small warm-up (CUDA context, kernel choice), then each side (twice when compiled)."""
    from benchmarks.common import sample_image
    from clarity import UpscaleParams

    upscaler = load(weights, arm)
    rows = []
    try:
        upscaler.upscale(sample_image(256, 256), UpscaleParams(seed=1))  # warm-up, not reported
        for side in sides:
            if CLARITY_ARMS.get(arm, (False, False))[1]:
                first = timed_job(upscaler, arm, side)
                rows.append({**first, "compiling": True})
            rows.append(timed_job(upscaler, arm, side))
    finally:
        del upscaler
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def check(weights: Path, sides: tuple[int, ...], budget_seconds: float) -> dict[str, Any]:
    """Every arm in ORDER while the budget lasts (an arm starts only with a fifth of the budget left)."""
    deadline = time.monotonic() + budget_seconds
    rows, not_run = [], []
    for arm in ORDER:
        if time.monotonic() > deadline - budget_seconds / 5:
            not_run.append(arm)
            continue
        rows.extend(run_arm(weights, arm, sides))
    baseline = {row["side"]: row["seconds"] for row in rows if row["arm"] == "clarity" and "seconds" in row}
    for row in rows:
        if "seconds" in row and row["side"] in baseline and not row.get("compiling"):
            row["seconds_over_clarity"] = round(row["seconds"] / baseline[row["side"]], 3)
    return {"gpu": torch.cuda.get_device_name(), "rows": rows, "not_run": not_run,
            "torch": torch.__version__}


def run(bench) -> dict[str, Any]:
    """`python -m benchmarks --only gpu`: the same check, on the run's model folder."""
    reason = skip_reason()
    if reason:
        return {"skipped": reason, "rows": []}
    return check(bench.weights, QUICK_SIDES if bench.quick else SIDES, BUDGET_SECONDS)


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["rows"] if "seconds" in row and not row.get("compiling")]
    figure, axis = plt.subplots(figsize=(9, 3.5))
    axis.bar([f"{row['arm']}\n{row['side']} px" for row in rows], [row["seconds"] for row in rows])
    axis.set_ylabel("seconds per job")
    axis.tick_params(axis="x", labelsize=6)
    axis.set_title(f"{result['gpu']}, defaults, fp16")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import LATEST_RESULTS, cached_random_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="Model folder (default: full-size random).")
    parser.add_argument("--budget-seconds", type=float, default=BUDGET_SECONDS)
    parser.add_argument("--output", type=Path, default=LATEST_RESULTS / "gpu.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    reason = skip_reason()
    if reason:
        result: dict[str, Any] = {"skipped": reason, "rows": []}
    else:
        weights = args.weights or cached_random_model()
        left = args.budget_seconds - (time.monotonic() - started)
        result = check(weights, SIDES, left)
    result["seconds"] = round(time.monotonic() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
