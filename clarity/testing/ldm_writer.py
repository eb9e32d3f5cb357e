"""Diffusers → original Stable Diffusion (LDM) parameter names, for writing the tiny model as single files.

The reverse of what `clarity.models.single_file` reads: diffusers ships this direction only as a
script (`scripts/convert_diffusers_to_original_stable_diffusion.py`), whose tables the `*_to_ldm`
functions follow, generalised from SD1.5's fixed depths so that they serve the tiny model's too.
"""

from __future__ import annotations

import re

import torch

from clarity.models.single_file import CONTROLNET_PREFIX, TEXT_PREFIX, UNET_PREFIX

_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_FIXED_TO_LDM = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _resnet_to_ldm(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return dict(_RESNET_TO_LDM).get(name, name) + "." + tail


def _unet_key_to_ldm(key: str, layers_per_block: int, up_attention: list[bool]) -> str:
    """One UNet or ControlNet parameter name, diffusers → LDM (the shared down and middle parts)."""
    step = layers_per_block + 1
    for ours, theirs in _UNET_FIXED_TO_LDM.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(match[1]), match[2], int(match[3]), match[4]
        inner = f"0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"1.{rest}"
        return f"input_blocks.{step * level + j + 1}.{inner}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{step * (int(match[1]) + 1)}.0.op.{match[2]}"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(match[1]), match[2], int(match[3]), match[4]
        inner = f"0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"1.{rest}"
        return f"output_blocks.{step * level + j}.{inner}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        level = int(match[1])
        return f"output_blocks.{step * level + layers_per_block}.{2 if up_attention[level] else 1}.{match[2]}"
    if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(match[1])}.{_resnet_to_ldm(match[2])}"
    if key.startswith("mid_block.attentions.0."):
        return "middle_block.1." + key.removeprefix("mid_block.attentions.0.")
    raise ValueError(f"no LDM name for UNet parameter {key!r}")


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under the original SD names (`model.diffusion_model.*`)."""
    config = unet.config
    up_attention = [kind.startswith("CrossAttn") for kind in config.up_block_types]
    return {
        UNET_PREFIX + _unet_key_to_ldm(key, config.layers_per_block, up_attention): value
        for key, value in unet.state_dict().items()
    }


def controlnet_to_ldm(controlnet) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet's weights under the original ControlNet names (`control_model.*`)."""
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    renamed = {}
    for key, value in controlnet.state_dict().items():
        if match := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
            name = f"zero_convs.{match[1]}.0.{match[2]}"
        elif key.startswith("controlnet_mid_block."):
            name = "middle_block_out.0." + key.removeprefix("controlnet_mid_block.")
        elif key.startswith("controlnet_cond_embedding.conv_in."):
            name = "input_hint_block.0." + key.removeprefix("controlnet_cond_embedding.conv_in.")
        elif match := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
            name = f"input_hint_block.{2 * (int(match[1]) + 1)}.{match[2]}"
        elif key.startswith("controlnet_cond_embedding.conv_out."):
            name = f"input_hint_block.{2 * (blocks + 1)}." + key.removeprefix("controlnet_cond_embedding.conv_out.")
        else:
            name = _unet_key_to_ldm(key, controlnet.config.layers_per_block, [])
        renamed[CONTROLNET_PREFIX + name] = value
    return renamed


_VAE_ATTENTION_TO_LDM = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def vae_to_ldm(vae, prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers VAE's weights under the original LDM names (after `prefix`)."""
    levels = len(vae.config.block_out_channels)
    renamed = {}
    for key, value in vae.state_dict().items():
        name = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        # The decoder's levels are numbered from the bottom in LDM, from the top in diffusers.
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                      lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                      lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name)
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        if ".mid_block.attentions.0." in name:
            head, _, tail = name.partition("mid_block.attentions.0.")
            for ours, theirs in _VAE_ATTENTION_TO_LDM.items():
                if tail.startswith(ours):
                    tail = theirs + tail[len(ours) :]
            name = head + "mid.attn_1." + tail
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        renamed[prefix + name] = value
    return renamed


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights under SD's names (`cond_stage_model.transformer.text_model.*`)."""
    return {
        TEXT_PREFIX + "text_model." + key.removeprefix("text_model."): value
        for key, value in text_encoder.state_dict().items()
    }
