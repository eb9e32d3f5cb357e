"""The VAE's dtype and memory layout: seconds per MP of encode + decode, and what they change in a whole upscale.

Timing: `clarity.engine.vae.encode` then `decode` of a square image at the default VAE tile
size (so 4 MP is tiled, with its statistics pass), for each VAE variant in turn, round by round
(so machine noise hits them alike), after one small warm-up each. Variants are copies of one
float32 VAE prepared as the engine prepares its own (`prepare_vae`): fp32 (NCHW, what the
engine ran before), fp32 channels-last, bf16 (NCHW), and the default (`--vae-dtype auto
--vae-channels-last auto`, resolved on this machine; the JSON says to what): all four at
0.26 MP (two rounds), fp32 and the default at 1 MP (three rounds) and 4 MP (one: fp32 takes
minutes there on 2 cores); --quick: 0.26 MP, fp32 and the default, one round.

Pixels: the benchmark job (benchmarks/job.py's steps, strength, guidance and seed; scale 2) run
twice on one engine whose VAE is swapped between the fp32 one and the default one: the
difference per channel of the two outputs, in 0-255 levels, and each run's seconds. On the
full-size random model this says how far the arithmetic moves the pixels, not how a real
photograph looks: random weights make no real image.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import Bench, machine, sample_image
from benchmarks.job import GUIDANCE, SEED, STEPS, STRENGTH
from clarity.engine import vae as vae_ops
from clarity.engine.acceleration import SpeedOptions, prepare_vae
from clarity.engine.images import pil_to_tensor
from clarity.params import UpscaleParams

#: name: (--vae-dtype, --vae-channels-last)
VARIANTS = {"fp32": ("fp32", "off"), "fp32_channels_last": ("fp32", "on"), "bf16": ("bf16", "off"),
            "default": ("auto", "auto")}
#: Output side -> (variants timed there, rounds). The layout comparison runs at 0.26 MP, where
#: all four variants fit in a minute a round on 2 cores; 4 MP fp32 takes minutes a round.
SIDES = {512: (tuple(VARIANTS), 2), 1024: (("fp32", "default"), 3), 2048: (("fp32", "default"), 1)}
#: --quick keeps within a couple of minutes (the whole --quick run should fit 15 minutes on 2 cores).
QUICK_SIDES = {512: (("fp32", "default"), 1)}
#: Output side of the whole-upscale pixel comparison.
PIXEL_SIDE, QUICK_PIXEL_SIDE = 1024, 512


def variant_vae(fp32_vae: torch.nn.Module, name: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of `fp32_vae` prepared as variant `name`, and what it resolved to."""
    vae_dtype, channels_last = VARIANTS[name]
    vae = copy.deepcopy(fp32_vae)
    is_channels_last = prepare_vae(vae, SpeedOptions(vae_dtype=vae_dtype, vae_channels_last=channels_last), device)
    return vae, {"dtype": str(vae.dtype).removeprefix("torch."), "channels_last": is_channels_last}


@torch.inference_mode()
def time_round_trip(vae: torch.nn.Module, side: int, tile_size: int) -> tuple[float, float]:
    """Seconds to encode a side x side image and decode its latents, at `tile_size`."""
    image = pil_to_tensor(sample_image(side, side))
    started = time.perf_counter()
    latents = vae_ops.encode(vae, image, torch.Generator().manual_seed(0), tile_size)
    encoded = time.perf_counter()
    vae_ops.decode(vae, latents, tile_size)
    return encoded - started, time.perf_counter() - encoded


def measure_times(fp32_vae, device, sides: dict[int, tuple[tuple[str, ...], int]]) -> list[dict[str, Any]]:
    tile_size = UpscaleParams().vae_tile_size
    names = sorted({name for names, _ in sides.values() for name in names}, key=list(VARIANTS).index)
    vaes = {name: variant_vae(fp32_vae, name, device) for name in names}
    for vae, _ in vaes.values():
        time_round_trip(vae, 256, tile_size)  # warm-up: first-call allocations and kernel choices
    rows = []
    for side, (side_names, rounds) in sides.items():
        for round_index in range(rounds):
            for name in side_names:
                vae, resolved = vaes[name]
                encode_seconds, decode_seconds = time_round_trip(vae, side, tile_size)
                row = {"side": side, "megapixels": side * side / 1e6, "variant": name, **resolved,
                       "round": round_index, "encode_seconds": encode_seconds, "decode_seconds": decode_seconds,
                       "seconds_per_mp": (encode_seconds + decode_seconds) / (side * side / 1e6),
                       "load_average_1m": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(f"vae: {row}", flush=True)
    return rows


def summarize_times(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median s/MP per side and variant, and per-round ratios fp32 / each variant (medians)."""
    summary: dict[str, Any] = {"load_average_1m_range": [min(r["load_average_1m"] for r in rows),
                                                         max(r["load_average_1m"] for r in rows)]}
    for side in sorted({r["side"] for r in rows}):
        at_side = [r for r in rows if r["side"] == side]
        medians = {name: statistics.median(r["seconds_per_mp"] for r in at_side if r["variant"] == name)
                   for name in dict.fromkeys(r["variant"] for r in at_side)}
        speedups = {}
        for name in medians:
            ratios = [fp32["seconds_per_mp"] / other["seconds_per_mp"]
                      for fp32 in at_side if fp32["variant"] == "fp32"
                      for other in at_side if other["variant"] == name and other["round"] == fp32["round"]]
            if ratios:
                speedups[name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        summary[str(side)] = {"median_seconds_per_mp": medians, "speedup_vs_fp32_same_round": speedups}
    if all("default" in summary.get(side, {}).get("median_seconds_per_mp", {}) for side in ("1024", "2048")):
        summary["default_4mp_vs_1mp_per_mp"] = (summary["2048"]["median_seconds_per_mp"]["default"]
                                                / summary["1024"]["median_seconds_per_mp"]["default"])
    return summary


@torch.inference_mode()
def compare_pixels(upscaler, default_vae, side: int) -> dict[str, Any]:
    """The job upscaled side/2 -> side with the fp32 VAE and with `default_vae`: per-channel differences."""
    fp32_vae = upscaler.pipeline.vae
    source = sample_image(side // 2, side // 2)
    job = {"num_inference_steps": STEPS, "creativity": STRENGTH, "dynamic": GUIDANCE, "seed": SEED}
    outputs, seconds = {}, {}
    for name, vae in (("fp32", fp32_vae), ("default", default_vae)):
        upscaler.pipeline.vae = vae
        started = time.perf_counter()
        outputs[name] = np.asarray(upscaler.upscale(source, **job).image, dtype=np.float64)
        seconds[name] = time.perf_counter() - started
    upscaler.pipeline.vae = fp32_vae
    difference = np.abs(outputs["default"] - outputs["fp32"])
    return {"side": side, "seconds": seconds,
            "mean_abs_difference_per_channel": difference.mean((0, 1)).round(3).tolist(),
            "max_abs_difference_per_channel": difference.max((0, 1)).tolist(),
            "share_of_pixels_differing_by_more_than_2": float((difference.max(-1) > 2).mean()),
            "load_average_after": machine()["load_average_1_5_15"]}


def run(bench: Bench) -> dict[str, Any]:
    from clarity import Upscaler

    device = bench.upscaler.device
    # The bench's own engine runs the default VAE already: a second one, all fp32, is the reference.
    reference = Upscaler.from_pretrained(bench.weights, device=device,
                                         speed=SpeedOptions(vae_dtype="fp32", vae_channels_last="off"))
    fp32_vae = reference.pipeline.vae
    default_vae, default_resolved = variant_vae(fp32_vae, "default", device)
    pixels = compare_pixels(reference, default_vae, QUICK_PIXEL_SIDE if bench.quick else PIXEL_SIDE)
    print(f"vae: {pixels}", flush=True)
    rows = measure_times(fp32_vae, device, QUICK_SIDES if bench.quick else SIDES)
    return {"rows": rows, "summary": summarize_times(rows), "default_resolves_to": default_resolved,
            "pixels": pixels, "vae_tile_size": UpscaleParams().vae_tile_size,
            "torch_threads": torch.get_num_threads()}


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    labels, values = [], []
    for side, summary in result["summary"].items():
        if not side.isdigit():
            continue
        for name, seconds in summary["median_seconds_per_mp"].items():
            labels.append(f"{int(side) ** 2 / 1e6:.0f} MP {name}")
            values.append(seconds)
    axis.barh(labels, values)
    axis.set_xlabel("VAE encode + decode, seconds per MP (median)")
    axis.set_title(f"VAE dtype and layout ({result['meta']['model']} model, {result['torch_threads']} threads)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
