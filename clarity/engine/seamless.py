"""Seamless patterns (`pattern`): an image treated as one period of an endlessly repeating tiling.

Every step that looks at neighbours must see the opposite edge as the neighbour: resampling,
the VAE, the latent tiles (see `TilePlan.wrap`), the colour fix and sharpening. This module
holds the pixel-space part; the result then repeats without a visible edge.

An input that does not tile to begin with (a photograph) cannot be made seamless by that
alone: its opposite edges differ, and the upscale faithfully keeps them different. Such an
input first has a band along each mismatched border cross-faded with the image shifted by
half a period (the usual "offset and blend" of texture tools; the original Clarity shifts by
half and inpaints the cross-shaped seam instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: Source pixels of wrap-around context given to resampling filters (Lanczos reaches 3).
RESAMPLE_CONTEXT = 4
#: A border is a seam when the step across it exceeds this multiple of the image's mean
#: neighbour-to-neighbour step (noise-like textures that tile sit near 1).
SEAM_THRESHOLD = 2.0
#: Share of the side, from each border, that is cross-faded when an input does not tile.
CROSSFADE_BAND = 0.2


def pad_periodic(x: torch.Tensor, pad: int) -> torch.Tensor:
    """`x` (..., H, W) extended by `pad` on every side with its own repetition (as if tiled edge to edge)."""
    if pad <= min(x.shape[-2:]):
        return F.pad(x, (pad,) * 4, mode="circular")
    # Circular padding cannot reach further than one period; repeat small inputs first.
    rows, cols = math.ceil(pad / x.shape[-2]) * 2 + 1, math.ceil(pad / x.shape[-1]) * 2 + 1
    tiled = x.repeat(*(1,) * (x.ndim - 2), rows, cols)
    top, left = (rows // 2) * x.shape[-2] - pad, (cols // 2) * x.shape[-1] - pad
    return tiled[..., top:top + x.shape[-2] + 2 * pad, left:left + x.shape[-1] + 2 * pad]


def crop_border(x: torch.Tensor, border: int) -> torch.Tensor:
    """`x` (..., H, W) without `border` pixels on every side: the inverse of `pad_periodic`."""
    return x[..., border:x.shape[-2] - border, border:x.shape[-1] - border]


def resize_periodic(
    resize: Callable[[Image.Image, tuple[int, int]], Image.Image], image: Image.Image, size: tuple[int, int]
) -> Image.Image:
    """`resize(image, size)` as if `image` repeated on every side: no edge effects at the borders.

    Works for any resizer (Lanczos, an ESRGAN model): the image is padded with its own opposite
    edges, resized to the matching larger size, and the padding cropped off again.
    """
    pad = RESAMPLE_CONTEXT
    margin = [round(pad * target / side) for target, side in zip(size, image.size, strict=True)]
    padded = Image.fromarray(np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="wrap"))
    enlarged = resize(padded, (size[0] + 2 * margin[0], size[1] + 2 * margin[1]))
    return enlarged.crop((margin[0], margin[1], margin[0] + size[0], margin[1] + size[1]))


def filter_periodic(apply: Callable[[Image.Image], Image.Image], image: Image.Image, reach: int) -> Image.Image:
    """`apply(image)` for a neighbourhood filter reaching `reach` pixels, with the borders wrapped."""
    padded = Image.fromarray(np.pad(np.asarray(image), ((reach, reach), (reach, reach), (0, 0)), mode="wrap"))
    return apply(padded).crop((reach, reach, reach + image.width, reach + image.height))


def seam_axes(image: Image.Image) -> list[str]:
    """The axes ("x": left/right, "y": top/bottom) across whose wrap-around the image visibly jumps."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    axes = []
    for name, axis in (("x", 1), ("y", 0)):
        if pixels.shape[axis] < 2:
            continue
        inside = np.abs(np.diff(pixels, axis=axis)).mean()
        across = np.abs(pixels.take(0, axis=axis) - pixels.take(-1, axis=axis)).mean()
        if across > SEAM_THRESHOLD * inside + 1.0:
            axes.append(name)
    return axes


def crossfade_borders(image: Image.Image, axes: list[str]) -> Image.Image:
    """`image` made to tile along `axes`: bands at the borders blend into the image shifted by half.

    At the very border the blend is all shifted image, whose pixels there were neighbours in
    the middle of the original, so opposite borders now meet seamlessly; the weight falls
    linearly to 0 across the band, where the shifted image's own seam sits unseen.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    for name in axes:
        axis = 1 if name == "x" else 0
        length = pixels.shape[axis]
        band = max(2.0, CROSSFADE_BAND * length)
        position = np.arange(length, dtype=np.float32)
        distance = np.minimum(position, length - 1 - position)
        weight = np.clip(1 - distance / band, 0, 1)
        weight = weight[None, :, None] if axis == 1 else weight[:, None, None]
        shifted = np.roll(pixels, length // 2, axis=axis)
        pixels = (1 - weight) * pixels + weight * shifted
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def snap_to_latent_grid(size: tuple[int, int], multiple: int = 8) -> tuple[int, int]:
    """The nearest size whose sides are multiples of `multiple`: a repeating latent needs whole latent pixels."""
    return tuple(max(multiple, round(side / multiple) * multiple) for side in size)  # type: ignore[return-value]
