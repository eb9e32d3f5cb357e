"""Where the time goes: the share of an upscale's wall time spent inside model forwards.

Forward pre/post hooks time every call of the UNet, ControlNet, VAE (encoder, decoder and their
quant convs) and text encoder during one in-process upscale at 4 MP (1 MP with --quick), the
same job as the scaling benchmark. The rest of the wall time is then split by the engine's
own stage timings (PassStats) into what each stage spent outside the models.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from benchmarks.common import Bench, sample_image
from benchmarks.job import GUIDANCE, SEED, STEPS, STRENGTH

SIDE, QUICK_SIDE = 2048, 1024
#: Model-forward stages of a pass, and the components whose forwards run in them.
STAGE_MODELS = {"encode_prompt": ("text_encoder",), "vae_encode": ("vae_encoder",),
                "denoise": ("unet", "controlnet"), "vae_decode": ("vae_decoder",)}


def _components(pipeline) -> dict[str, list[torch.nn.Module]]:
    vae = pipeline.vae
    return {
        "unet": [pipeline.unet],
        "controlnet": [pipeline.controlnet],
        "vae_encoder": [m for m in (vae.encoder, vae.quant_conv) if m is not None],
        "vae_decoder": [m for m in (vae.post_quant_conv, vae.decoder) if m is not None],
        "text_encoder": [pipeline.text_encoder],
    }


@contextmanager
def forward_timer(pipeline) -> Iterator[dict[str, float]]:
    """Seconds spent inside each component's forwards while the block runs (none of them nest)."""
    seconds: dict[str, float] = defaultdict(float)
    started: dict[torch.nn.Module, float] = {}

    def before(module, args):
        started[module] = time.perf_counter()

    handles = []
    for name, modules in _components(pipeline).items():
        def after(module, args, output, name=name):
            seconds[name] += time.perf_counter() - started.pop(module)

        for module in modules:
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def measure(upscaler, side: int) -> dict[str, Any]:
    """Upscale a side/2 square image to `side` once and split its wall time."""
    source = sample_image(side // 2, side // 2)
    job = {"num_inference_steps": STEPS, "creativity": STRENGTH, "dynamic": GUIDANCE, "seed": SEED}
    upscaler.upscale(sample_image(64, 64), **job)  # warm-up: first-call allocations and kernel choices
    with torch.no_grad(), forward_timer(upscaler.pipeline) as model_seconds:
        started = time.perf_counter()
        stats = upscaler.upscale(source, **job).stats
        wall = time.perf_counter() - started
    inside = sum(model_seconds.values())
    stages = stats.seconds_by_stage
    outside = {
        stage: seconds - sum(model_seconds.get(name, 0.0) for name in STAGE_MODELS.get(stage, ()))
        for stage, seconds in stages.items()
    }
    outside["outside_passes"] = wall - sum(stages.values())
    return {
        "side": side,
        "wall_seconds": wall,
        "model_seconds": dict(model_seconds),
        "model_share": inside / wall,
        "shares": {name: value / wall for name, value in model_seconds.items()},
        "outside_models_seconds_by_stage": outside,
        "stage_seconds": stages,
    }


def run(bench: Bench) -> dict[str, Any]:
    result = measure(bench.upscaler, QUICK_SIDE if bench.quick else SIDE)
    return {"rows": [result], "target_model_share": 0.9}


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = result["rows"][0]
    labels = list(row["model_seconds"]) + ["everything else"]
    values = list(row["model_seconds"].values()) + [row["wall_seconds"] - sum(row["model_seconds"].values())]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.barh(labels, [v / row["wall_seconds"] * 100 for v in values])
    axis.set_xlabel("% of wall time")
    axis.set_title(f"Where the time goes ({row['side']}x{row['side']} output, {result['meta']['model']} model)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
