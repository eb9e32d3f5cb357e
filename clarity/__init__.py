"""Clarity: a self-hosted creative image upscaler (SD1.5 + ControlNet-tile, tiled img2img).

    from clarity import Upscaler, UpscaleParams
    upscaler = Upscaler.from_pretrained("weights/tiny")
    result = upscaler.upscale("photo.jpg", UpscaleParams(scale_factor=2, creativity=0.35))
    result.image.save("photo_2x.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clarity.errors import ClarityError, ContentPolicyError, ParamError, WeightsError
from clarity.params import UpscaleParams

if TYPE_CHECKING:
    from clarity.engine.acceleration import SpeedOptions
    from clarity.engine.cost import DenoisingWork, denoising_work
    from clarity.engine.results import ProgressEvent, UpscaleResult, UpscaleStats
    from clarity.engine.upscaler import Upscaler

__all__ = [
    "ClarityError", "ContentPolicyError", "DenoisingWork", "ParamError", "ProgressEvent", "SpeedOptions",
    "UpscaleParams", "UpscaleResult", "UpscaleStats", "Upscaler", "WeightsError", "denoising_work",
]
__version__ = "0.1.0"

#: Public names and the engine module each lives in.
_ENGINE_NAMES = {
    "Upscaler": "upscaler", "ProgressEvent": "results", "UpscaleResult": "results", "UpscaleStats": "results",
    "SpeedOptions": "acceleration", "DenoisingWork": "cost", "denoising_work": "cost",
}


def __getattr__(name: str) -> Any:
    # The engine pulls in torch and diffusers (~8 s); `clarity --help`, the parameter
    # definitions and the HTTP front end should not pay for that until a model is needed.
    if name in _ENGINE_NAMES:
        import importlib

        return getattr(importlib.import_module(f"clarity.engine.{_ENGINE_NAMES[name]}"), name)
    raise AttributeError(f"module 'clarity' has no attribute {name!r}")
