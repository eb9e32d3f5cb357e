"""The optional output check: diffusers' `StableDiffusionSafetyChecker` (CLIP ViT-L/14 + concepts).

Installed as a folder (default `weights/safety_checker/`) holding the checker's `config.json`
and weights plus the CLIP image processor's `preprocessor_config.json`, as in the
`safety_checker/` and `feature_extractor/` folders of an SD1.5 repository. A flagged output
fails the request with `ContentPolicyError`; nothing is blacked out silently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from clarity.errors import ParamError, WeightsError

logger = logging.getLogger(__name__)

#: Files the checker folder must hold (besides the weights file).
REQUIRED_FILES = ("config.json", "preprocessor_config.json")



def not_installed(folder: Path | None) -> ParamError:
    where = str(folder) if folder is not None else "weights/safety_checker"
    return ParamError(
        "enable_safety_checker",
        f"the safety checker is not installed on this server; install it into {where} (config.json, weights and"
        " preprocessor_config.json: see weights/README.md), or send enable_safety_checker=false",
    )


def is_installed(folder: Path | None) -> bool:
    return folder is not None and all((Path(folder) / name).is_file() for name in REQUIRED_FILES)


class SafetyChecker:
    """Flags images with SD's safety checker. `load` it from an installed folder."""

    def __init__(self, model: torch.nn.Module, processor: object) -> None:
        self.model = model
        self.processor = processor

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> SafetyChecker:
        """Load the checker in `folder` onto `device` (float32); `WeightsError` naming the folder on failure."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        # The PIL processor by name: the default `CLIPImageProcessor` wants torchvision, which
        # cannot be installed next to the CPU torch build, and would warn before falling back.
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.utils import logging as transformers_logging

        folder = Path(folder)
        if not is_installed(folder):
            raise not_installed(folder)
        transformers_logging.disable_progress_bar()  # as in models/loading.py: noise in logs
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True)
            processor = CLIPImageProcessorPil(**_processor_settings(folder / "preprocessor_config.json"))
        except Exception as error:  # noqa: BLE001 - any failure means the files are bad
            raise WeightsError(f"could not load the safety checker from {folder}: {error}") from error
        return cls(model.to(device).eval().requires_grad_(False), processor)

    @torch.no_grad()
    def flagged(self, images: list[Image.Image]) -> list[bool]:
        """For each image, whether the checker flags it."""
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        clip_input = inputs["pixel_values"].to(device=self.model.device, dtype=self.model.dtype)
        # `forward_onnx` is `forward`'s rule without its per-image Python loop and its log line
        # promising a black image (here the request fails instead). It also blacks out flagged
        # images in the tensor it is given: a throwaway one.
        placeholder = torch.zeros(len(images), 1)
        _, flags = self.model.forward_onnx(clip_input, placeholder)
        return [bool(flag) for flag in flags.tolist()]


def _processor_settings(path: Path) -> dict:
    """The processor's settings from its config, less the keys that name its class."""
    settings = json.loads(path.read_text())
    for key in ("image_processor_type", "feature_extractor_type", "processor_class"):
        settings.pop(key, None)
    return settings
