"""Tile planning and blend weights for MultiDiffusion over a latent: pure functions, no models.

The planner picks, per axis, the fewest tiles that fit the size limit with at least the
minimum overlap, then shrinks them to the smallest size that still covers the axis and
spreads them evenly. The processed area therefore exceeds the image only by the overlap the
limits force, unlike a fixed-size grid (REFERENCE §7: the original's 112x144 grid processes
1.75x the latent area of a 1024 px output, this plan 1.06x).

A plan can also *wrap* (for seamless patterns): the latent is then a torus, tiles that run
past the right or bottom edge continue at the left or top, and every tile cross-fades with a
neighbour on both sides, so the opposite borders are denoised as neighbours like any others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """A rectangle of the latent, in latent pixels: rows [top, top+height), columns [left, left+width)."""

    top: int
    left: int
    height: int
    width: int

    def latent_slice(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def pixel_slice(self, factor: int) -> tuple[slice, slice]:
        """The same rectangle in an image `factor` times larger (8 for SD's VAE)."""
        return (
            slice(self.top * factor, (self.top + self.height) * factor),
            slice(self.left * factor, (self.left + self.width) * factor),
        )


@dataclass(frozen=True)
class TilePlan:
    """Tiles covering a latent of `height` x `width`; all tiles share one size so they batch.

    With `wrap`, tiles may run past the bottom and right edges and continue at the top and left.
    """

    height: int
    width: int
    tiles: tuple[Tile, ...]
    wrap: bool = False

    @property
    def tile_height(self) -> int:
        return self.tiles[0].height

    @property
    def tile_width(self) -> int:
        return self.tiles[0].width

    @property
    def area_ratio(self) -> float:
        """Latent area processed per denoising step divided by the latent area of the image."""
        return sum(t.height * t.width for t in self.tiles) / (self.height * self.width)

    def crop(self, x: torch.Tensor, tile: Tile, factor: int = 1) -> torch.Tensor:
        """The region of `x` (the latent, or an image `factor` times larger) under `tile`."""
        if not self.wrap:
            return x[(..., *tile.pixel_slice(factor))]
        rows, cols = self._wrapped_indices(tile, factor, x.device)
        return x[..., rows[:, None], cols[None, :]]

    def add(self, into: torch.Tensor, tile: Tile, values: torch.Tensor, factor: int = 1) -> None:
        """`into[region of tile] += values`, in place (the inverse of `crop`)."""
        if not self.wrap:
            into[(..., *tile.pixel_slice(factor))] += values
            return
        rows, cols = self._wrapped_indices(tile, factor, into.device)
        # A tile is never longer than its axis, so the indices are unique and += is exact.
        into[..., rows[:, None], cols[None, :]] += values

    def _wrapped_indices(self, tile: Tile, factor: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(tile.top * factor, (tile.top + tile.height) * factor, device=device)
        cols = torch.arange(tile.left * factor, (tile.left + tile.width) * factor, device=device)
        return rows % (self.height * factor), cols % (self.width * factor)


def plan_axis(length: int, max_tile: int, min_overlap: int, wrap: bool = False) -> tuple[int, list[int]]:
    """Tile size and start offsets covering `length` with tiles <= `max_tile`, overlapping >= `min_overlap`.

    Uses the fewest tiles n = ceil((length - overlap) / (max_tile - overlap)), the smallest
    size s with n*s - (n-1)*overlap >= length, and starts spread evenly from 0 to length - s,
    so every gap between starts is at most s - overlap.

    With `wrap` the axis is a circle: n >= 2 tiles (so that the wrap-around is a cross-fade
    like any other seam) of size s with n*(s - overlap) >= length, starting every length/n;
    the last tile runs past the end into the first.
    """
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if not 0 <= min_overlap < max_tile:
        raise ValueError(f"min_overlap must be in [0, max_tile), got {min_overlap} with max_tile {max_tile}")
    if wrap:
        count = max(2, math.ceil(length / (max_tile - min_overlap)))
        size = min(length, max_tile, math.ceil(length / count) + min_overlap)
        return size, sorted({round(i * length / count) for i in range(count)})
    if length <= max_tile:
        return length, [0]
    count = math.ceil((length - min_overlap) / (max_tile - min_overlap))
    size = math.ceil((length + (count - 1) * min_overlap) / count)
    starts = [round(i * (length - size) / (count - 1)) for i in range(count)]
    return size, starts


def plan_tiles(
    height: int, width: int, max_tile_height: int, max_tile_width: int, min_overlap: int, wrap: bool = False
) -> TilePlan:
    """Plan a grid of equal tiles over a `height` x `width` latent (row-major order); see `plan_axis`."""
    tile_h, tops = plan_axis(height, max_tile_height, min_overlap, wrap)
    tile_w, lefts = plan_axis(width, max_tile_width, min_overlap, wrap)
    tiles = tuple(Tile(top, left, tile_h, tile_w) for top in tops for left in lefts)
    return TilePlan(height=height, width=width, tiles=tiles, wrap=wrap)


def tile_weight(tile: Tile, plan: TilePlan) -> torch.Tensor:
    """Blend weight of a tile, shape (height, width), > 0 everywhere.

    Each weight ramps linearly from near 0 to 1 across the part of the tile that a neighbour
    also covers, and stays 1 along the image border (unless the plan wraps), so overlapping
    predictions cross-fade smoothly instead of meeting at a hard seam. Weights are normalised
    by their sum when blending, so they need not add up to one.
    """
    rows = _axis_ramp(tile.top, tile.height, plan.height, [t.top for t in plan.tiles], plan.wrap)
    cols = _axis_ramp(tile.left, tile.width, plan.width, [t.left for t in plan.tiles], plan.wrap)
    return rows[:, None] * cols[None, :]


def _axis_ramp(start: int, size: int, length: int, all_starts: list[int], wrap: bool) -> torch.Tensor:
    starts = sorted(set(all_starts))
    if wrap:
        # Around a circle the first tile's previous neighbour is the last, one turn earlier.
        starts = [starts[-1] - length, *starts, starts[0] + length]
    index = starts.index(start)
    ramp = torch.ones(size, dtype=torch.float64)
    # Overlap with the previous tile on this axis: rise over the shared pixels.
    if index > 0:
        shared = starts[index - 1] + size - start
        ramp[:shared] = torch.minimum(ramp[:shared], torch.arange(1, shared + 1, dtype=torch.float64) / (shared + 1))
    if index + 1 < len(starts):
        shared = start + size - starts[index + 1]
        fall = torch.arange(shared, 0, -1, dtype=torch.float64) / (shared + 1)
        ramp[size - shared:] = torch.minimum(ramp[size - shared:], fall)
    return ramp.float()
