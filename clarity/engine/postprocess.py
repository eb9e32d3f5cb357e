"""What happens to a pass's output after diffusion: colour fix and sharpening.

Colour fix keeps the diffusion from drifting the image's colours (a common complaint: washed
out or grey results): the output's low frequencies are replaced by, or matched to, those of
the pre-upscaled input, while the detail diffusion added stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from clarity.engine.seamless import pad_periodic
from clarity.params import COLOR_FIX_METHODS

#: Levels of the wavelet decomposition: blurs of radius 1, 2, 4, 8, 16 px. What is coarser than
#: that (colour, shading) comes from the input; what is finer (texture, detail) from diffusion.
WAVELET_LEVELS = 5
#: How far the wavelet blurs reach, in pixels: 1 + 2 + 4 + 8 + 16.
WAVELET_REACH = 2**WAVELET_LEVELS - 1
#: Rows of the wavelet colour fix computed at once (plus their context).
COLOR_FIX_STRIPE = 256


def color_fix(output: torch.Tensor, reference: torch.Tensor, method: str, wrap: bool = False) -> torch.Tensor:
    """Match `output`'s colours to `reference` (both (1, 3, H, W) in [0, 1]) by `method`.

    With `wrap` the images are periods of a repeating pattern and the blurs wrap around.

    - "wavelet": output's fine detail plus reference's coarse layers (StableSR's wavelet fix).
    - "adain": per-channel mean and standard deviation of output set to reference's.
    - "none": output unchanged.
    """
    if method == "none":
        return output
    if method == "adain":
        out_mean, out_std = output.mean((-2, -1), keepdim=True), output.std((-2, -1), keepdim=True)
        ref_mean, ref_std = reference.mean((-2, -1), keepdim=True), reference.std((-2, -1), keepdim=True)
        return ((output - out_mean) / (out_std + 1e-6) * ref_std + ref_mean).clamp(0, 1)
    if method == "wavelet":
        return _wavelet_fix(output, reference, wrap)
    raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIX_METHODS)}")


def _wavelet_fix(output: torch.Tensor, reference: torch.Tensor, wrap: bool) -> torch.Tensor:
    """output's detail + reference's coarse layers, computed in stripes of rows.

    That sum is output + coarse(reference - output), since the blur is linear: one blur instead
    of two. Each stripe is blurred with `WAVELET_REACH` rows of context on both sides (wrapping
    around with `wrap`, clipped at the image's edges without), which is exactly as far as any
    error from the stripe's own padding can travel, so the stripes join exactly. The blur's
    temporaries then follow `COLOR_FIX_STRIPE`, not the image: at 100 MP each would be 1.2 GB.
    """
    height = output.shape[-2]
    result = torch.empty_like(output)
    for top in range(0, height, COLOR_FIX_STRIPE):
        bottom = min(top + COLOR_FIX_STRIPE, height)
        if wrap:
            rows = torch.arange(top - WAVELET_REACH, bottom + WAVELET_REACH, device=output.device) % height
            difference = reference[..., rows, :] - output[..., rows, :]
            first = WAVELET_REACH
        else:
            start, end = max(0, top - WAVELET_REACH), min(height, bottom + WAVELET_REACH)
            difference = reference[..., start:end, :] - output[..., start:end, :]
            first = top - start
        coarse = _coarse(difference, wrap)[..., first:first + bottom - top, :]
        result[..., top:bottom, :] = coarse.add_(output[..., top:bottom, :]).clamp_(0, 1)
    return result


def _coarse(image: torch.Tensor, wrap: bool = False) -> torch.Tensor:
    """What is left of `image` after the wavelet levels' blurs (the fine detail is image - this).

    Each level blurs with the 3x3 kernel [1 2 1]^T [1 2 1] / 16 dilated by its radius, edges
    replicated (or wrapped around, with `wrap`). It is applied as two 1-D passes of
    shifted-slice sums: a dilated depthwise `conv2d` on the CPU unfolds the image into 9
    copies, which at 16 MP is GBs and seconds.
    """
    coarse = image
    for level in range(WAVELET_LEVELS):
        radius = 2**level
        padded = pad_periodic(coarse, radius) if wrap else F.pad(coarse, (radius,) * 4, mode="replicate")
        rows = padded[..., : -2 * radius, :] + padded[..., 2 * radius:, :]
        rows.add_(padded[..., radius:-radius, :], alpha=2)
        del padded
        coarse = rows[..., : -2 * radius] + rows[..., 2 * radius:]
        coarse.add_(rows[..., radius:-radius], alpha=2).div_(16)
    return coarse


def sharpen(image: Image.Image, amount: float) -> Image.Image:
    """The original Clarity's sharpening: a 3x3 kernel with off-centre weights a = -amount/10.

    The centre is 1 - 8a, so the kernel sums to 1 and flat areas keep their value.
    """
    if amount == 0:
        return image
    a = -amount / 10
    kernel = ImageFilter.Kernel((3, 3), [a, a, a, a, 1 - 8 * a, a, a, a, a], scale=1)
    return image.filter(kernel)
