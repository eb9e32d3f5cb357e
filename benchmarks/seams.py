"""Seams on a real photograph: gradient energy on tile borders against inside the tiles.

A seam is a line the eye follows: across it the image changes more from one pixel to the
next than elsewhere. The measure (issue #3: "gradient energy on tile borders vs inside tiles
within 10 %") is, per axis, the gradient energy the upscale *added* (output minus the input
resized to the output's size) in the columns (or rows) near a tile border, divided by the
same in the columns far from every border. Two refinements make it fair on one photograph:

- The added energy, not the output's: the photograph's own edges fall wherever they fall,
  and a border on the cat's fur must not count as a seam.
- Each border column is compared with far columns at the same position modulo 8, since VAE
  decoders leave a faint 8-pixel periodic pattern (one latent pixel).

Where the model adds more detail to busy content than to calm content, borders that happen to
lie on busy content still read above 1; so the benchmark also reports each tiled result
*relative to the same photograph upscaled in one tile*, measured at the same borders, which
cancels the content exactly and leaves what tiling itself adds there.

Borders are every place a seam can appear in a tiled upscale: where a tile starts, where its
neighbour ends, and the middle of their overlap (where a tiler without cross-fades cuts).

The benchmark (`python -m benchmarks --only seams [--weights DIR]`) upscales the photograph
2x in one tile, with Clarity's cross-fades, and with a hard-cut control (each latent pixel
from the tile whose blend weight is largest), side by side. The tiny test model invents no
coherent detail (its output is a blurry VAE round trip plus noise it does not remove), so on
it all three agree and the figures say nothing about seams: run it with real weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import Bench

#: Chelsea the cat, 451x300, CC0 by Stefan van der Walt, from scikit-image's sample data.
PHOTOGRAPH = Path(__file__).with_name("data") / "chelsea.png"
#: Columns within this many pixels of a border are border columns; columns farther than twice
#: this from every border are inside columns; the rest are neither.
BAND = 4
#: The VAE's latent pixel: the period of its decoder's faint grid pattern.
PERIOD = 8


def photograph() -> Image.Image:
    return Image.open(PHOTOGRAPH).convert("RGB")


def tile_borders(length: int, max_tile: int, min_overlap: int, scale: int = PERIOD) -> list[float]:
    """Pixel positions of the tile borders along one axis of a latent `length` long (see module doc)."""
    from clarity.engine.tiling import plan_axis

    size, starts = plan_axis(length, max_tile, min_overlap)
    borders = []
    for previous, start in itertools.pairwise(starts):
        end = previous + size
        borders += [start * scale, end * scale, (start + end) / 2 * scale]
    return borders


def seam_ratio(
    image: Image.Image | np.ndarray, reference: Image.Image | np.ndarray, borders: Sequence[float], axis: int
) -> float:
    """Added gradient energy near `borders` over that far from them, along `axis` (1: columns, 0: rows).

    Added means in `image - reference`, the reference being the input resized to the output's
    size (what the upscale starts from), so that a border lying on busy content (fur) or on
    calm content (sky) counts the same. 1.0: the borders cannot be told from the rest; a seam
    makes it larger.
    """
    residual = np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    gain = _gradient_energy(residual, axis)
    index = np.arange(len(gain))
    distance = np.min([np.abs(index + 0.5 - border) for border in borders], axis=0)
    margin = (index >= PERIOD) & (index < len(gain) - PERIOD)  # image borders are not tile borders
    near, far = margin & (distance <= BAND), margin & (distance > 2 * BAND)
    phase = index % PERIOD
    if not near.any() or any(not (far & (phase == p)).any() for p in range(PERIOD)):
        raise ValueError("the image is too small for its borders: too few columns near or far from them")
    if not (gain[far] > 0).all():
        raise ValueError("the output equals the reference in places: there is no added detail to measure")
    far_by_phase = np.array([gain[far & (phase == p)].mean() for p in range(PERIOD)])
    return float(np.mean(gain[near] / far_by_phase[phase[near]]))


def _gradient_energy(image: Image.Image | np.ndarray, axis: int) -> np.ndarray:
    """energy[i]: mean squared step between pixel i and i+1 along `axis` (at position i + 0.5)."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[..., None]
    return (np.diff(array, axis=axis) ** 2).mean(axis=(1 - axis, 2))


#: The job: 2x of the 451x300 photograph (902x600, a 113x75 latent), in 48-latent-pixel tiles
#: (3x2 tiles, 384 px) or in one tile of at most 128 (the untiled baseline).
SCALE, TILE, OVERLAP, ONE_TILE, SEED = 2, 48, 8, 128, 1


@contextmanager
def hard_cuts() -> Iterator[None]:
    """Blend tiles without cross-fades: each latent pixel from the tile whose weight is largest.

    The control for the measure: what a tiler without cross-fades does (patched into the
    pipeline for the benchmark only).
    """
    from clarity.engine import pipeline, tiling

    def hard_weight(tile, plan):
        return (tiling.tile_weight(tile, plan) >= 0.5).float() + 1e-6  # the 0.5 line is mid-overlap

    pipeline.tile_weight = hard_weight
    try:
        yield
    finally:
        pipeline.tile_weight = tiling.tile_weight


def measure(upscaler: Any, steps: int) -> list[dict[str, Any]]:
    """Upscale the photograph untiled, tiled with cross-fades and tiled with hard cuts; one row each."""
    from contextlib import nullcontext

    from clarity import UpscaleParams

    photo = photograph()
    runs = [("untiled", ONE_TILE, nullcontext()), ("clarity", TILE, nullcontext()), ("hard_cut", TILE, hard_cuts())]
    rows, untiled = [], {}
    for name, tile, patch in runs:
        params = UpscaleParams(scale_factor=SCALE, tiling_width=tile, tiling_height=tile, tile_overlap=OVERLAP,
                               num_inference_steps=steps, seed=SEED)
        with patch:
            result = upscaler.upscale(photo, params)
        reference = photo.resize(result.image.size, Image.Resampling.LANCZOS)
        row: dict[str, Any] = {"tiler": name, "tiles": result.stats.passes[0].tiles}
        for axis, label, length in ((1, "x", result.image.width), (0, "y", result.image.height)):
            borders = tile_borders(length // PERIOD, TILE, OVERLAP)
            ratio = seam_ratio(result.image, reference, borders, axis)
            untiled.setdefault(label, ratio)  # the first run is the untiled one
            row[f"ratio_{label}"] = round(ratio, 3)
            row[f"vs_untiled_{label}"] = round(ratio / untiled[label], 3)
        rows.append(row)
    return rows


def run(bench: Bench) -> dict[str, Any]:
    steps = 4 if bench.quick else 12  # 1 and 4 denoising steps at the default creativity, 0.35
    return {"rows": measure(bench.upscaler, steps), "job": {"photograph": PHOTOGRAPH.name, "scale_factor": SCALE,
            "tile": TILE, "overlap": OVERLAP, "num_inference_steps": steps, "seed": SEED}}


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    positions = np.arange(len(rows))
    for offset, label in ((-0.2, "x"), (0.2, "y")):
        axis.bar(positions + offset, [row[f"vs_untiled_{label}"] for row in rows], width=0.4, label=f"{label} borders")
    axis.axhline(1.1, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(positions, [row["tiler"] for row in rows])
    axis.set_ylabel("border / inside, vs untiled")
    model = result.get("meta", {}).get("model", "")
    axis.set_title(f"Seams on a photograph, {model} model (1.0 = none; dashed: +10 %)", fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
