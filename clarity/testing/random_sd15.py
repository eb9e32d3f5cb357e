"""A full-size, randomly initialised SD1.5 + ControlNet-tile: real sizes and speed, meaningless output.

The benchmarks' model. The tiny model (`clarity.testing.tiny`) keeps the test suite fast, but its
timings say nothing about real weights: its UNet is a few hundred kilobytes. This one is SD1.5's
exact topology, built from the configs shipped in `clarity/models/configs/` (UNet ~860M
parameters, ControlNet ~361M, VAE ~84M, the CLIP ViT-L/14 text encoder ~123M with the real CLIP
tokenizer), so every figure measured on it costs what it costs with real weights, on a machine
with no model hub. Its weights are random under a fixed seed: its images have no meaningful
detail, and its folder carries `RANDOM_MARKER` so that everything that loads it says so.

Written in the diffusers folder layout (safetensors), about 5.5 GB in float32. Each component is
built, saved and freed before the next: the float32 UNet alone is ~3.4 GB.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from clarity.models.clip_tokenizers import clip_tokenizer
from clarity.models.markers import RANDOM_MARKER
from clarity.models.single_file_components import shipped_config

#: Written into the folder as `RANDOM_MARKER`: what this model is, for whoever finds it on disk.
MARKER_TEXT = (
    "Full-size randomly initialised SD1.5 + ControlNet-tile made by `clarity weights random-sd15`.\n"
    "It has the real model's sizes and speed but produces no meaningful detail; use it for benchmarks only.\n"
)
#: Relative scale of the ControlNet's residuals, see `_unzero_controlnet`.
_CONTROLNET_RESIDUAL_SCALE = 0.1


def _config(name: str) -> dict:
    """A shipped SD1.5 config without its bookkeeping keys (`_class_name`, `architectures`)."""
    return {key: value for key, value in shipped_config(name).items() if key not in ("_class_name", "architectures")}


def build_random_unet(seed: int = 0):
    """SD1.5's `UNet2DConditionModel` (block widths 320/640/1280/1280), randomly initialised."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + 1)
    return UNet2DConditionModel.from_config(_config("unet"))


def build_random_controlnet(seed: int = 0):
    """ControlNet-tile's `ControlNetModel` (SD1.5's encoder half), its zero convolutions made small, not zero."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 2)
    controlnet = ControlNetModel.from_config(_config("controlnet"))
    _unzero_controlnet(controlnet)
    return controlnet


def _unzero_controlnet(controlnet) -> None:
    """Give the ControlNet's zero convolutions small random weights.

    A trained ControlNet starts from zero convolutions and learns away from them; left at zero,
    this one would add nothing to the UNet and cost nothing in the UNet's arithmetic that the
    benchmarks measure (as in the tiny model). Each is scaled by its fan-in, so that a residual
    is about `_CONTROLNET_RESIDUAL_SCALE` of its input's size rather than swamping the UNet.
    """
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    with torch.no_grad():
        for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
            fan_in = conv.weight[0].numel()
            torch.nn.init.normal_(conv.weight, std=_CONTROLNET_RESIDUAL_SCALE / math.sqrt(fan_in))
            torch.nn.init.zeros_(conv.bias)


def build_random_vae(seed: int = 0):
    """SD1.5's `AutoencoderKL` (widths 128/256/512/512, 4 latent channels, 8x), randomly initialised."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    return AutoencoderKL.from_config(_config("vae"))


def build_random_text_encoder(seed: int = 0):
    """CLIP ViT-L/14's `CLIPTextModel` (12 layers, width 768, 49408 tokens), randomly initialised."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))


#: The weighted components by diffusers subfolder: each one's builder and its (library, class) in model_index.json.
COMPONENTS: dict[str, tuple[Callable[[int], torch.nn.Module], tuple[str, str]]] = {
    "unet": (build_random_unet, ("diffusers", "UNet2DConditionModel")),
    "controlnet": (build_random_controlnet, ("diffusers", "ControlNetModel")),
    "vae": (build_random_vae, ("diffusers", "AutoencoderKL")),
    "text_encoder": (build_random_text_encoder, ("transformers", "CLIPTextModel")),
}


def save_random_sd15(folder: str | Path, seed: int = 0) -> Path:
    """Write the full-size random model to `folder` in the diffusers layout; return `folder`.

    The marker is written first, so that even a folder left half-written by an interruption is
    never taken for real weights. Deterministic for a given seed (each builder seeds torch with
    its own offset of `seed`). Peak memory is about one float32 UNet (~3.4 GB) plus its saving.
    """
    import diffusers
    from diffusers import PNDMScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RANDOM_MARKER).write_text(MARKER_TEXT)
    for name, (build, _) in COMPONENTS.items():
        component = build(seed)
        component.save_pretrained(folder / name, safe_serialization=True)
        del component
        gc.collect()
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    PNDMScheduler.from_config(_config("scheduler")).save_pretrained(folder / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionControlNetImg2ImgPipeline",
        "_diffusers_version": diffusers.__version__,
        **{name: list(library_and_class) for name, (_, library_and_class) in COMPONENTS.items()},
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return folder
