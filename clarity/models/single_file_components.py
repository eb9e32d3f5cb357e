"""Diffusers components from a single-file checkpoint: their configs, then the models themselves.

A single file holds weights only (see `single_file.py`). The configs come from the SD1.5 configs
shipped in `configs/`, with every field that tensor shapes determine (widths, depths, channels,
vocabulary) read from the checkpoint itself, so one loader serves real checkpoints and the tiny
test model alike. Keys are converted with diffusers' own converters
(`diffusers.loaders.single_file_utils`), called directly on the state dict: unlike
`from_single_file`, nothing here can reach a hub.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from clarity.errors import WeightsError
from clarity.models.clip_tokenizers import tokenizer_for_vocabulary
from clarity.models.single_file import (
    CONTROLNET_PREFIX,
    SCALING_FACTOR_KEY,
    UNET_PREFIX,
    VAE_PREFIX,
    Checkpoint,
    check_controlnet_keys,
    check_vae_keys,
    has_prefix,
)

CONFIGS = Path(__file__).with_name("configs")
SD15_SCALING_FACTOR = 0.18215


# --- Configs: shipped SD1.5 values, shape-determined fields from the checkpoint ----------


def shipped_config(name: str) -> dict:
    """One of the shipped SD1.5 configs (`unet`, `vae`, `text_encoder`, `scheduler`, `controlnet`)."""
    return json.loads((CONFIGS / f"{name}.json").read_text())


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """The sorted distinct integers that directly follow `prefix` in `keys`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(match.group(1)) for key in keys if (match := pattern.match(key))})


def _norm_groups(widths: list[int]) -> int:
    # GroupNorm's group count leaves no trace in the weights. SD1.5 uses 32; the tiny model is
    # built with half its narrowest width (clarity/testing/tiny.py), and this rule gives both.
    return min(32, min(widths) // 2)


def _unet_shape_config(weights: dict[str, torch.Tensor]) -> dict:
    """The UNet config fields that `weights` (LDM names, no prefix) determine."""
    keys = list(weights)
    inputs = _indices(keys, "input_blocks.")
    downsamplers = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in weights]
    levels = len(downsamplers) + 1
    layers_per_block = (len(inputs) - 1 - len(downsamplers)) // levels
    firsts = [1 + level * (layers_per_block + 1) for level in range(levels)]
    cross_attention = [weights[key] for key in keys if key.endswith("attn2.to_k.weight")]
    proj_in = [weights[key] for key in keys if key.endswith(".proj_in.weight")]
    if not cross_attention or not proj_in:
        raise KeyError("no cross-attention layers")
    return {
        "in_channels": weights["input_blocks.0.0.weight"].shape[1],
        "block_out_channels": [weights[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in firsts],
        "layers_per_block": layers_per_block,
        "down_block_types": [
            "CrossAttnDownBlock2D" if f"input_blocks.{i}.1.proj_in.weight" in weights else "DownBlock2D"
            for i in firsts
        ],
        "cross_attention_dim": cross_attention[0].shape[1],
        # SD2 projects with linear layers, SD1.5 with 1x1 convolutions.
        "use_linear_projection": proj_in[0].ndim == 2,
        "transformer_layers_per_block": len(
            _indices(keys, next(f"input_blocks.{i}.1.transformer_blocks." for i in firsts
                                if f"input_blocks.{i}.1.proj_in.weight" in weights))
        ),
    }


def unet_config(weights: dict[str, torch.Tensor]) -> dict:
    """The diffusers UNet config for `weights` (LDM names, no prefix): SD1.5's, overlaid with shapes."""
    config = shipped_config("unet") | _unet_shape_config(weights)
    levels = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    config["up_block_types"] = [
        "CrossAttnUpBlock2D" if f"output_blocks.{level * (lpb + 1)}.1.proj_in.weight" in weights else "UpBlock2D"
        for level in range(levels)
    ]
    config["out_channels"] = weights["out.2.weight"].shape[0]
    config["norm_num_groups"] = _norm_groups(config["block_out_channels"])
    # attention_head_dim (8 heads per layer in SD1.5) is not in the shapes; the tiny model uses 8 too.
    return config


def controlnet_config(weights: dict[str, torch.Tensor]) -> dict:
    """The diffusers ControlNet config for `weights` (original names, no prefix)."""
    config = shipped_config("controlnet") | _unet_shape_config(weights)
    hint = _indices(weights, "input_hint_block.")
    # input_hint_block: conv_in, then pairs (same width, stride-2 widening) of the embedding's blocks, conv_out.
    config["conditioning_channels"] = weights["input_hint_block.0.weight"].shape[1]
    config["conditioning_embedding_out_channels"] = [
        weights[f"input_hint_block.{i}.weight"].shape[0] for i in (hint[0], *hint[2:-1:2])
    ]
    config["norm_num_groups"] = _norm_groups(config["block_out_channels"])
    return config


def vae_config(weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """The diffusers VAE config for `weights` (LDM names, no prefix)."""
    levels = _indices(weights, "encoder.down.")
    widths = [weights[f"encoder.down.{level}.block.0.conv1.weight"].shape[0] for level in levels]
    config = shipped_config("vae") | {
        "in_channels": weights["encoder.conv_in.weight"].shape[1],
        "out_channels": weights["decoder.conv_out.weight"].shape[0],
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "layers_per_block": len(_indices(weights, "encoder.down.0.block.")),
        "latent_channels": weights["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": _norm_groups(widths),
        "scaling_factor": float(metadata.get(SCALING_FACTOR_KEY, SD15_SCALING_FACTOR)),
    }
    return config


def text_encoder_config(weights: dict[str, torch.Tensor], tokenizer) -> dict:
    """The CLIPTextConfig fields for `weights` (`text_model.` names) and its `tokenizer`."""
    tokens = weights["text_model.embeddings.token_embedding.weight"]
    hidden = tokens.shape[1]
    return shipped_config("text_encoder") | {
        "vocab_size": tokens.shape[0],
        "hidden_size": hidden,
        "intermediate_size": weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_indices(weights, "text_model.encoder.layers.")),
        "max_position_embeddings": weights["text_model.embeddings.position_embedding.weight"].shape[0],
        # The head count is not in the shapes. CLIP ViT-L/14 has 64-wide heads (12 at 768); the
        # tiny model has two heads of half its width, and "64 wide, or half the width" gives both.
        "num_attention_heads": hidden // min(64, hidden // 2),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# --- Loading ----------------------------------------------------------------------------------


def _build(
    path: Path, what: str, make: Callable[[], torch.nn.Module], weights: dict[str, torch.Tensor], dtype: torch.dtype
):
    """Make a model without initialising its weights, then load `weights` as `dtype` into it, every key required."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            model = make()
    except (ValueError, RuntimeError) as error:  # e.g. widths that no GroupNorm or head count divides
        raise WeightsError(f"{path}: its {what} is not shaped like SD1.5's: {error}") from error
    weights = {key: value.to(dtype) for key, value in weights.items() if value is not None}
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{path}: its {what} does not have SD1.5's structure (missing {len(result.missing_keys)} weights,"
            f" e.g. {result.missing_keys[:3]}; unexpected {len(result.unexpected_keys)},"
            f" e.g. {result.unexpected_keys[:3]})."
        )
    return model


def _shape_error(path: Path, what: str, error: Exception) -> WeightsError:
    return WeightsError(f"{path}: its {what} weights are not shaped like SD1.5's (no {error}).")


def load_unet(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):
    """The `UNet2DConditionModel` of an SD checkpoint, its weights as `dtype`."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    try:
        config = unet_config(checkpoint.part(UNET_PREFIX))
    except (KeyError, StopIteration, IndexError) as error:
        raise _shape_error(checkpoint.path, "UNet", error) from error
    if config["in_channels"] != 4 or config["use_linear_projection"]:
        kind = "an inpainting" if config["in_channels"] != 4 else "an SD2-style"
        raise WeightsError(f"{checkpoint.path} holds {kind} UNet; Clarity needs a regular SD1.5-family checkpoint.")
    weights = convert_ldm_unet_checkpoint(checkpoint.tensors, config)
    return _build(checkpoint.path, "UNet", lambda: UNet2DConditionModel.from_config(config), weights, dtype)


def load_controlnet(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):
    """The `ControlNetModel` of an original-format ControlNet file (keys with or without `control_model.`)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    check_controlnet_keys(checkpoint.path, list(checkpoint.tensors))
    prefix = CONTROLNET_PREFIX if has_prefix(checkpoint.tensors, CONTROLNET_PREFIX) else ""
    try:
        config = controlnet_config(checkpoint.part(prefix))
    except (KeyError, StopIteration, IndexError) as error:
        raise _shape_error(checkpoint.path, "ControlNet", error) from error
    weights = convert_controlnet_checkpoint(checkpoint.tensors, config)
    return _build(checkpoint.path, "ControlNet", lambda: ControlNetModel.from_config(config), weights, dtype)


def load_vae(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):
    """The `AutoencoderKL` of an SD checkpoint or a standalone LDM VAE file."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    keys = list(checkpoint.tensors)
    check_vae_keys(checkpoint.path, keys)
    prefix = VAE_PREFIX if has_prefix(keys, VAE_PREFIX) else ""
    try:
        config = vae_config(checkpoint.part(prefix), checkpoint.metadata)
    except (KeyError, IndexError) as error:
        raise _shape_error(checkpoint.path, "VAE", error) from error
    # The converter finds the prefix itself; given a whole SD checkpoint it must see only the VAE.
    weights = convert_ldm_vae_checkpoint({prefix + k: v for k, v in checkpoint.part(prefix).items()}, config)
    return _build(checkpoint.path, "VAE", lambda: AutoencoderKL.from_config(config), weights, dtype)


def load_text_encoder_and_tokenizer(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):
    """The `CLIPTextModel` of an SD checkpoint and the tokenizer its vocabulary calls for."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    # Some checkpoints name the text encoder's parameters without transformers' "text_model." level.
    weights = {
        "text_model." + key.removeprefix("text_model."): value
        for key, value in convert_ldm_clip_checkpoint(checkpoint.tensors).items()
        if not key.endswith("position_ids")  # a buffer older checkpoints saved; the model makes its own
    }
    try:
        tokens = weights["text_model.embeddings.token_embedding.weight"]
        positions = weights["text_model.embeddings.position_embedding.weight"].shape[0]
        tokenizer = tokenizer_for_vocabulary(checkpoint.path, tokens.shape[0], positions)
        config = CLIPTextConfig(**text_encoder_config(weights, tokenizer))
    except (KeyError, IndexError) as error:
        raise _shape_error(checkpoint.path, "text encoder", error) from error

    def make():
        return CLIPTextModel(config)

    # transformers >= 5.6 flattened CLIPTextModel: its parameters no longer sit under "text_model.".
    with torch.device("meta"):
        flattened = not hasattr(make(), "text_model")
    if flattened:
        weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    return _build(checkpoint.path, "text encoder", make, weights, dtype), tokenizer


def scheduler_config() -> dict:
    """SD1.5's noise schedule: single-file checkpoints of the SD1.5 family all train on it."""
    return shipped_config("scheduler")
