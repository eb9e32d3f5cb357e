"""What an upscale will cost, known before any work: its denoising work in megapixel-steps.

The UNet and ControlNet dominate the time of an upscale on the real model, and their cost is the
number of latent pixels they see: tile areas (overlaps counted each time), times the denoising
steps each pass runs, times two with guidance, times the variants. Counted in image pixels (64 a
latent pixel) and in millions, a default 2x upscale to 16.8 MP comes to about 220 megapixel-steps.
Servers refuse requests over a budget before they start (a tiny input at scale 16 with 100 steps
and 16-pixel tiles would otherwise hold a worker for hours).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clarity.engine.seamless import snap_to_latent_grid
from clarity.engine.tiling import plan_tiles
from clarity.engine.upscaler import plan_passes
from clarity.engine.vae import VAE_SCALE
from clarity.imageio import output_size
from clarity.params import UpscaleParams


@dataclass(frozen=True)
class DenoisingWork:
    """The denoising an upscale will do, summed over its passes and variants."""

    #: Image pixels (64 per latent pixel) the UNet and ControlNet see, times steps, in millions.
    megapixel_steps: float
    #: Tile evaluations: one tile through ControlNet and the UNet at one step (twice with guidance).
    tile_evaluations: int


def denoising_work(image_size: tuple[int, int], params: UpscaleParams, num_images: int = 1) -> DenoisingWork:
    """The work of upscaling an image of `image_size` with `params`, `num_images` variants."""
    size = _prepared_size(image_size, params)
    factors = plan_passes(params.scale_factor)
    guidance = 2 if params.dynamic > 1 else 1
    pixels = evaluations = 0
    cumulative = 1.0
    for index, factor in enumerate(factors):
        cumulative *= factor
        scale = params.scale_factor if index == len(factors) - 1 else cumulative
        target = output_size(size, scale)
        if params.pattern:
            target = snap_to_latent_grid(target)
        plan = plan_tiles(math.ceil(target[1] / VAE_SCALE), math.ceil(target[0] / VAE_SCALE),
                          params.tiling_height, params.tiling_width, params.tile_overlap, params.pattern)
        strength = min(1.0, params.creativity * params.multistep_factor**index)
        steps = min(int(params.num_inference_steps * strength), params.num_inference_steps) * guidance
        pixels += sum(tile.height * tile.width for tile in plan.tiles) * VAE_SCALE**2 * steps
        evaluations += len(plan.tiles) * steps
    return DenoisingWork(megapixel_steps=pixels * num_images / 1e6, tile_evaluations=evaluations * num_images)


def _prepared_size(size: tuple[int, int], params: UpscaleParams) -> tuple[int, int]:
    """The size the passes start from: the input, or its shrunk copy with `downscaling`."""
    if params.downscaling and max(size) > params.downscaling_resolution:
        return output_size(size, params.downscaling_resolution / max(size))
    return size
