"""Moving between pixels and SD latents with the VAE.

Whole-image encode/decode for now: memory grows with the image. Tiled encode/decode with
whole-image GroupNorm statistics is the next step (issue "Faithful output at any size").
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

#: Pixels per latent pixel along each axis for SD-family VAEs.
VAE_SCALE = 8


def encode(vae: AutoencoderKL, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Latents of `image` (N, 3, H, W in [0, 1], H and W multiples of 8), scaled for the UNet.

    Samples the VAE's posterior with `generator`, as diffusers' img2img pipelines do, so that
    a run can be compared with theirs number for number.
    """
    pixels = (image * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    return vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Pixels (N, 3, 8h, 8w in [0, 1], float32) of UNet-scaled `latents`."""
    pixels = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    return (pixels.float() / 2 + 0.5).clamp(0, 1)
