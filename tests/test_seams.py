"""Seams on a real photograph (benchmarks/seams.py): the measure, its harness, and the claim on real weights.

The tiny test model cannot show seams (it invents no coherent detail, so tiles have nothing to
disagree about): here the measure is checked on the photograph with synthetic added detail, and
the claim itself, "gradient energy on tile borders within 10 % of inside the tiles", runs on real
weights when CLARITY_REAL_WEIGHTS names a model folder or weights root.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from benchmarks.seams import OVERLAP, TILE, measure, photograph, seam_ratio, tile_borders

REAL_WEIGHTS = os.environ.get("CLARITY_REAL_WEIGHTS")


def _detail(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Invented detail as a diffusion model adds it: small, spatially correlated strokes (std ~7 levels)."""
    noise = np.random.default_rng(seed).normal(128, 40, shape)
    blurred = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    return (np.asarray(blurred, dtype=np.float64) - 128)[..., None]


@pytest.fixture(scope="module")
def reference():
    """The photograph resized 2x, as the engine's pre-upscale gives it, with its tile borders."""
    image = np.asarray(photograph().resize((902, 600), Image.Resampling.LANCZOS), dtype=np.float64)
    return image, tile_borders(902 // 8, TILE, OVERLAP)


def test_detail_added_evenly_reads_as_no_seam_even_on_busy_content(reference):
    image, borders = reference
    output = image + _detail(image.shape[:2], seed=0)
    # This plan's borders lie on the cat's fur: the output's own gradient energy is much higher
    # there than elsewhere (what the measure would see against a black reference)...
    assert seam_ratio(output, np.zeros_like(image), borders, axis=1) > 1.5  # measured 1.8
    # ...but only the energy added to the photograph counts.
    assert abs(seam_ratio(output, image, borders, axis=1) - 1) < 0.05


def test_detail_that_changes_at_a_cut_reads_as_a_seam(reference):
    # Two tiles that invent different detail and meet at a hard cut (mid-overlap, every third
    # border): the seam MultiDiffusion's cross-fades exist to avoid.
    image, borders = reference
    left, right = _detail(image.shape[:2], seed=0), _detail(image.shape[:2], seed=1)
    detail = left.copy()
    for index, cut in enumerate(borders[2::3]):
        detail[:, int(cut):] = (right if index % 2 == 0 else left)[:, int(cut):]
    assert seam_ratio(image + detail, image, borders, axis=1) > 1.2  # measured 1.38


def test_benchmark_compares_tilers_side_by_side(upscaler):
    rows = {row["tiler"]: row for row in measure(upscaler, steps=4)}
    assert (rows["untiled"]["tiles"], rows["clarity"]["tiles"], rows["hard_cut"]["tiles"]) == (1, 6, 6)
    assert rows["untiled"]["vs_untiled_x"] == rows["untiled"]["vs_untiled_y"] == 1.0
    for row in rows.values():
        assert row["ratio_x"] > 0 and row["ratio_y"] > 0


@pytest.mark.skipif(not REAL_WEIGHTS, reason="needs real SD1.5 + ControlNet-tile weights: set CLARITY_REAL_WEIGHTS")
def test_real_weights_leave_no_seam_on_a_photograph():
    from clarity import Upscaler
    from clarity.models.catalogue import Catalogue, upscaler_kwargs

    catalogue = Catalogue.discover(REAL_WEIGHTS)
    upscaler = Upscaler.from_pretrained(**upscaler_kwargs(catalogue, catalogue.default_model))
    rows = {row["tiler"]: row for row in measure(upscaler, steps=20)}
    clarity = rows["clarity"]
    # Relative to the untiled upscale at the same borders, so the content under them cancels.
    assert 0.9 <= clarity["vs_untiled_x"] <= 1.1, rows
    assert 0.9 <= clarity["vs_untiled_y"] <= 1.1, rows
