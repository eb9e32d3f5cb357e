"""Tile planning and blend weights for MultiDiffusion over a latent: pure functions, no models.

The planner picks, per axis, the fewest tiles that fit the size limit with at least the
minimum overlap, then shrinks them to the smallest size that still covers the axis and
spreads them evenly. The processed area therefore exceeds the image only by the overlap the
limits force, unlike a fixed-size grid (REFERENCE §7: the original's 112x144 grid processes
1.75x the latent area of a 1024 px output, this plan 1.06x).
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
    """Tiles covering a latent of `height` x `width`; all tiles share one size so they batch."""

    height: int
    width: int
    tiles: tuple[Tile, ...]

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


def plan_axis(length: int, max_tile: int, min_overlap: int) -> tuple[int, list[int]]:
    """Tile size and start offsets covering `length` with tiles <= `max_tile`, overlapping >= `min_overlap`.

    Uses the fewest tiles n = ceil((length - overlap) / (max_tile - overlap)), the smallest
    size s with n*s - (n-1)*overlap >= length, and starts spread evenly from 0 to length - s,
    so every gap between starts is at most s - overlap.
    """
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if not 0 <= min_overlap < max_tile:
        raise ValueError(f"min_overlap must be in [0, max_tile), got {min_overlap} with max_tile {max_tile}")
    if length <= max_tile:
        return length, [0]
    count = math.ceil((length - min_overlap) / (max_tile - min_overlap))
    size = math.ceil((length + (count - 1) * min_overlap) / count)
    starts = [round(i * (length - size) / (count - 1)) for i in range(count)]
    return size, starts


def plan_tiles(height: int, width: int, max_tile_height: int, max_tile_width: int, min_overlap: int) -> TilePlan:
    """Plan a grid of equal tiles over a `height` x `width` latent (row-major order)."""
    tile_h, tops = plan_axis(height, max_tile_height, min_overlap)
    tile_w, lefts = plan_axis(width, max_tile_width, min_overlap)
    tiles = tuple(Tile(top, left, tile_h, tile_w) for top in tops for left in lefts)
    return TilePlan(height=height, width=width, tiles=tiles)


def tile_weight(tile: Tile, plan: TilePlan) -> torch.Tensor:
    """Blend weight of a tile, shape (height, width), > 0 everywhere.

    Each weight ramps linearly from near 0 to 1 across the part of the tile that a neighbour
    also covers, and stays 1 along the image border, so overlapping predictions cross-fade
    smoothly instead of meeting at a hard seam. Weights are normalised by their sum when
    blending, so they need not add up to one.
    """
    rows = _axis_ramp(tile.top, tile.height, plan.height, [t.top for t in plan.tiles])
    cols = _axis_ramp(tile.left, tile.width, plan.width, [t.left for t in plan.tiles])
    return rows[:, None] * cols[None, :]


def _axis_ramp(start: int, size: int, length: int, all_starts: list[int]) -> torch.Tensor:
    starts = sorted(set(all_starts))
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
