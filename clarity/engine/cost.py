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

from clarity.engine.images import shrunk_size
from clarity.engine.tiling import plan_tiles
from clarity.engine.upscaler import pass_strength, pass_targets
from clarity.engine.vae import VAE_SCALE
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
    # The passes start from the input, or its shrunk copy with `downscaling`.
    size = shrunk_size(image_size, params.downscaling_resolution) if params.downscaling else image_size
    guidance = 2 if params.dynamic > 1 else 1
    pixels = evaluations = 0
    for index, target in enumerate(pass_targets(size, params)):
        plan = plan_tiles(math.ceil(target[1] / VAE_SCALE), math.ceil(target[0] / VAE_SCALE),
                          params.tiling_height, params.tiling_width, params.tile_overlap, params.pattern)
        steps = min(int(params.num_inference_steps * pass_strength(params, index)), params.num_inference_steps)
        steps *= guidance
        pixels += sum(tile.height * tile.width for tile in plan.tiles) * VAE_SCALE**2 * steps
        evaluations += len(plan.tiles) * steps
    return DenoisingWork(megapixel_steps=pixels * num_images / 1e6, tile_evaluations=evaluations * num_images)

