"""Clarity: a self-hosted creative image upscaler (SD1.5 + ControlNet-tile, tiled img2img).

    from clarity import Upscaler, UpscaleParams
    upscaler = Upscaler.from_pretrained("weights/tiny")
    result = upscaler.upscale("photo.jpg", UpscaleParams(scale_factor=2, creativity=0.35))
    result.image.save("photo_2x.png")
"""

from clarity.engine.upscaler import ProgressEvent, Upscaler, UpscaleResult, UpscaleStats
from clarity.params import ParamError, UpscaleParams

__all__ = ["ParamError", "ProgressEvent", "UpscaleParams", "UpscaleResult", "UpscaleStats", "Upscaler"]
__version__ = "0.1.0"
