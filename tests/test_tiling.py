"""Tile planning: coverage, overlap, bounds and wasted area, as properties over many sizes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clarity.engine.tiling import plan_axis, plan_tiles, tile_weight

lengths = st.integers(min_value=1, max_value=2048)
limits = st.integers(min_value=16, max_value=256)
overlaps = st.integers(min_value=0, max_value=8)


@given(length=lengths, max_tile=limits, overlap=overlaps)
@settings(max_examples=400, deadline=None)
def test_axis_plan_covers_everything_with_enough_overlap(length, max_tile, overlap):
    size, starts = plan_axis(length, max_tile, overlap)
    assert 1 <= size <= max_tile
    assert starts[0] == 0 and starts[-1] + size == length  # first and last tile touch the edges
    assert all(0 <= s and s + size <= length for s in starts)  # inside the image
    for before, after in itertools.pairwise(starts):
        assert after > before
        assert before + size - after >= overlap  # no gaps; neighbours share >= overlap pixels


@given(length=lengths, max_tile=limits, overlap=overlaps)
@settings(max_examples=400, deadline=None)
def test_axis_plan_wastes_only_rounding_beyond_the_least_possible(length, max_tile, overlap):
    size, starts = plan_axis(length, max_tile, overlap)
    # Fewest tiles that can fit, each as small as allowed: the least processed length.
    fewest = 1 if length <= max_tile else math.ceil((length - overlap) / (max_tile - overlap))
    least = length + (fewest - 1) * overlap
    processed = size * len(starts)
    assert len(starts) == fewest
    assert processed - least <= fewest - 1  # equal integer tile sizes: < 1 px of rounding per tile
    if max_tile >= 64:
        # (fewest - 1) / length <= 1 / (max_tile - overlap) <= 1/56: within 2 % at usable tile sizes.
        assert processed / least <= 1.02


@given(height=st.integers(1, 600), width=st.integers(1, 600), th=limits, tw=limits, overlap=overlaps)
@settings(max_examples=150, deadline=None)
def test_every_latent_pixel_is_covered_and_weighted(height, width, th, tw, overlap):
    plan = plan_tiles(height, width, th, tw, overlap)
    coverage = torch.zeros(height, width)
    for tile in plan.tiles:
        assert (tile.height, tile.width) == (plan.tile_height, plan.tile_width)  # one size: they batch
        weight = tile_weight(tile, plan)
        assert weight.shape == (tile.height, tile.width) and bool((weight > 0).all())
        coverage[tile.latent_slice()] += weight
    assert bool((coverage > 0).all())
    assert plan.area_ratio >= 1.0


@pytest.mark.parametrize(
    ("pixels", "expected"),
    # Output side in pixels -> latent-area ratio with the defaults (112x144 tiles, overlap 8),
    # REFERENCE §7: about 1.06, 1.10, 1.11 and 1.13 at 1, 4, 16 and 64 MP.
    [(1024, 1.06), (2048, 1.10), (4096, 1.11), (8192, 1.13)],
)
def test_default_plan_matches_the_reference_ratios(pixels, expected):
    latent = pixels // 8
    plan = plan_tiles(latent, latent, 144, 112, 8)
    assert plan.area_ratio == pytest.approx(expected, abs=0.01)


def test_original_grid_would_process_more():
    # The original's fixed 112x144 grid with overlap 4 processes 1.75x at 1 MP; ours ~1.06x.
    plan = plan_tiles(128, 128, 144, 112, 8)
    assert plan.area_ratio < 1.75 / 1.5


def test_weights_fade_across_the_overlap_and_stay_one_at_the_border():
    plan = plan_tiles(16, 100, 16, 60, 8)
    left, right = plan.tiles
    w_left, w_right = tile_weight(left, plan)[0], tile_weight(right, plan)[0]
    assert w_left[0] == 1 and w_right[-1] == 1  # image borders are not faded
    shared = left.left + left.width - right.left
    assert bool((w_left[-shared:].diff() < 0).all()) and bool((w_right[:shared].diff() > 0).all())


@given(height=st.integers(20, 200), width=st.integers(20, 200), overlap=st.integers(4, 8))
@settings(max_examples=60, deadline=None)
def test_blending_cross_fades_instead_of_cutting(height, width, overlap):
    # Tiles predict 0 and 10 in a checkerboard: blended, neighbouring latent pixels may differ
    # only by the fraction of that step that the overlap allows, never by all of it (a seam).
    plan = plan_tiles(height, width, 16, 16, overlap)
    rows, cols = sorted({t.top for t in plan.tiles}), sorted({t.left for t in plan.tiles})
    values = torch.tensor([10.0 * ((rows.index(t.top) + cols.index(t.left)) % 2) for t in plan.tiles])
    blended, total = torch.zeros(height, width), torch.zeros(height, width)
    for tile, value in zip(plan.tiles, values, strict=True):
        weight = tile_weight(tile, plan)
        blended[tile.latent_slice()] += weight * value
        total[tile.latent_slice()] += weight
    blended /= total
    largest_jump = max(blended.diff(dim=0).abs().max(), blended.diff(dim=1).abs().max()) if len(plan.tiles) > 1 else 0
    assert largest_jump <= 10 / (overlap + 1) * 1.01 + 1e-4


@given(length=st.integers(1, 600), max_tile=limits, overlap=overlaps)
@settings(max_examples=300, deadline=None)
def test_wrapping_plan_covers_the_circle_and_overlaps_across_the_wrap(length, max_tile, overlap):
    size, starts = plan_axis(length, max_tile, overlap, wrap=True)
    assert 1 <= size <= min(max_tile, length)
    assert starts[0] == 0 and all(0 <= s < length for s in starts)
    # Around the circle, including from the last tile back to the first: no gaps, and each
    # pair of neighbours shares at least `overlap` pixels (or the tiles span the whole circle).
    for before, after in itertools.pairwise([*starts, starts[0] + length]):
        assert before + size - after >= 0
        assert size == length or before + size - after >= overlap


@given(height=st.integers(1, 120), width=st.integers(1, 120), overlap=st.integers(0, 8))
@settings(max_examples=60, deadline=None)
def test_wrapping_blend_is_positive_everywhere_and_keeps_constants(height, width, overlap):
    plan = plan_tiles(height, width, 16, 16, overlap, wrap=True)
    blended, total = torch.zeros(2, height, width), torch.zeros(height, width)
    for tile in plan.tiles:
        weight = tile_weight(tile, plan)
        assert bool((weight > 0).all())
        plan.add(blended, tile, torch.full((2, tile.height, tile.width), 3.0) * weight)
        plan.add(total, tile, weight)
        assert plan.crop(blended, tile).shape == (2, tile.height, tile.width)
    assert bool((total > 0).all())
    assert torch.allclose(blended / total, torch.full_like(blended, 3.0))


def test_wrapping_tiles_fade_at_the_image_border_too():
    plan = plan_tiles(16, 100, 16, 60, 8, wrap=True)
    for tile in plan.tiles:
        ramp = tile_weight(tile, plan)[0]
        assert ramp[0] < 0.5 and ramp[-1] < 0.5  # every tile has a neighbour on both sides
    assert max(t.left + t.width for t in plan.tiles) > 100  # the last one runs past the edge
