"""Tiny stand-ins for the optional models beside the SD model: an ESRGAN pre-upscaler and a safety checker.

Both are random and small enough to write in a moment on the CPU, in the formats real ones come
in, so that pre-upscaling and the output check run through their real loaders in tests and demos.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from clarity.engine.esrgan import RRDBNet, RRDBNetShape


def save_tiny_esrgan(path: str | Path, scale: int = 4, seed: int = 0, layout: str = "old") -> Path:
    """Write a tiny random RRDBNet (8 features, 1 block) as a `.pth` or `.safetensors` file.

    `layout` "old" writes original-ESRGAN keys (like 4x-UltraSharp.pth), "new" Real-ESRGAN's
    wrapped in `params_ema`. Its output is a blurry, tinted upscale: it tests loading and
    tiling, never quality. Returns `path`.
    """
    if scale not in (2, 4):
        raise ValueError(f"scale must be 2 or 4, got {scale}")
    if layout not in ("old", "new"):
        raise ValueError(f"layout must be 'old' or 'new', got {layout!r}")
    path = Path(path)
    torch.manual_seed(seed)
    upsamplings = int(math.log2(scale))
    model = RRDBNet(RRDBNetShape(3, 3, features=8, grow_channels=4, blocks=1, upsamplings=upsamplings))
    with torch.no_grad():
        # Random convs would output noise; scaling the residual trunk down and making the last
        # conv average the features keeps the output an image of the input.
        for parameter in model.parameters():
            parameter.mul_(0.1)
        spread = torch.eye(3).repeat(3, 1)[:8]  # feature f carries colour channel f % 3
        model.conv_first.weight[:, :, 1, 1] += spread
        for index in range(1, upsamplings + 1):
            getattr(model, f"conv_up{index}").weight[:, :, 1, 1] += torch.eye(8)
        model.conv_hr.weight[:, :, 1, 1] += torch.eye(8)
        model.conv_last.weight[:, :, 1, 1] += spread.T / spread.T.sum(1, keepdim=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    if layout == "old":
        state = _new_to_old_keys(state, upsamplings)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"params_ema": state} if layout == "new" else state, path)
    return path


def _new_to_old_keys(state: dict[str, torch.Tensor], upsamplings: int) -> dict[str, torch.Tensor]:
    blocks = len({key.split(".")[1] for key in state if key.startswith("body.")})
    names = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}",
             "conv_hr": f"model.{3 * upsamplings + 2}", "conv_last": f"model.{3 * upsamplings + 4}"}
    names.update({f"conv_up{k + 1}": f"model.{3 * (k + 1)}" for k in range(upsamplings)})
    renamed = {}
    for key, tensor in state.items():
        if m := re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)", key):
            block, rdb, conv, kind = m.groups()
            renamed[f"model.1.sub.{block}.RDB{rdb}.conv{conv}.0.{kind}"] = tensor
        else:
            module, kind = key.rsplit(".", 1)
            renamed[f"{names[module]}.{kind}"] = tensor
    return renamed


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
