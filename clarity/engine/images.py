"""Whole images around the passes: the input's downscale, the keep mask, and tensors.

The pipeline works on (1, 3, H, W) float32 tensors in [0, 1]; `pil_to_tensor` and
`tensor_to_pil` convert RGB PIL images to and from them with diffusers' scaling and rounding.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

from clarity.errors import ParamError
from clarity.imageio import output_size, same_aspect_ratio

#: Blur radius (output pixels) of the mask's edge, as in the original Clarity.
MASK_BLUR_RADIUS = 5


def keep_mask(mask: Image.Image, input_size: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    """The "keep the original" mask at output `size`, 0-255, its edge softened.

    Alpha is the mask when there is one (OpenAI's convention: transparent = edit); otherwise
    brightness is (the original Clarity's: white = keep).
    """
    if not same_aspect_ratio(mask.size, input_size):
        raise ParamError(
            "mask", f"mask is {mask.width}x{mask.height} but the image is {input_size[0]}x{input_size[1]};"
            " they must have the same aspect ratio",
        )
    has_alpha = mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info)
    gray = mask.convert("RGBA").getchannel("A") if has_alpha else mask.convert("L")
    return gray.resize(size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(MASK_BLUR_RADIUS))


def shrunk_size(size: tuple[int, int], longest_side: int) -> tuple[int, int]:
    """`size` shrunk so its longest side is `longest_side` (the aspect ratio kept); smaller sizes as they are."""
    scale = longest_side / max(size)
    return size if scale >= 1 else output_size(size, scale)


def shrink_to(image: Image.Image, longest_side: int) -> Image.Image:
    """`image` shrunk (Lanczos) so its longest side is `longest_side`; smaller images are kept as they are."""
    size = shrunk_size(image.size, longest_side)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [0, 1] (the scaling diffusers' image processor uses)."""
    # One float32 copy of the image, not three (float array, division, channel-first copy).
    channels_last = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).unsqueeze(0)
    return channels_last.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> RGB PIL image, rounding like diffusers' `numpy_to_pil`."""
    scaled = image[0].float().cpu().mul(255).round_().to(torch.uint8)
    return Image.fromarray(scaled.permute(1, 2, 0).contiguous().numpy())
