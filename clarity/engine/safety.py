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


def save_tiny_safety_checker(folder: str | Path, concept_threshold: float = 2.0, seed: int = 0) -> Path:
    """Write a tiny random safety checker (CLIP vision, 1 layer, 32 px) into `folder`.

    Its verdict is forced by `concept_threshold`, which every concept score (a cosine
    similarity, in [-1, 1]) is compared with: above 1 nothing is flagged, below -1 everything
    is. For tests only. Returns `folder`.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    from transformers.utils import logging as transformers_logging

    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    model = StableDiffusionSafetyChecker(config)
    transformers_logging.disable_progress_bar()
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(concept_threshold)
        model.special_care_embeds_weights.fill_(concept_threshold)
    model.save_pretrained(folder)
    processor = {
        "crop_size": {"height": 32, "width": 32},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 32},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return folder
