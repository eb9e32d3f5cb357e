"""Pre-upscaling: bringing the image to the output size before diffusion adds detail.

A pluggable step: anything with the `PreUpscaler` signature can replace Lanczos, such as an
ESRGAN-family model.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class PreUpscaler(Protocol):
    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Return `image` resized to exactly `size` (width, height)."""
        ...


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos resampling: sharp, no model, no extra memory."""
    return image.resize(size, Image.Resampling.LANCZOS)
