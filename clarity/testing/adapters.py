"""Tiny LoRA and textual-inversion files for the tiny test model, in the formats users have.

`save_tiny_lora` writes a kohya/A1111 LoRA (`lora_unet_..._to_q.lora_down.weight`,
`.lora_up.weight`, `.alpha`; `lora_te_...` for the text encoder), the format real SD1.5 LoRAs
come in, so that diffusers' conversion from it is exercised. `save_tiny_embedding` writes a
`.safetensors` embedding (`emb_params`) or an A1111 `.pt` one (`string_to_param`). Like the
tiny model, they are random: they change outputs, they do not improve them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: Module names kohya trains in the UNet's transformer blocks, by suffix.
_UNET_TARGETS = (
    "proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
)
#: ... and in the CLIP text encoder's layers.
_TEXT_ENCODER_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "mlp.fc1", "mlp.fc2")


def _models(components_or_folder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(unet, text_encoder) from an object holding them (a pipeline, `ModelComponents`) or a weights folder."""
    if isinstance(components_or_folder, (str, Path)):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = Path(components_or_folder)
        return (UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True),
                CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True))
    return components_or_folder.unet, components_or_folder.text_encoder


def _lora_pair(module: torch.nn.Module, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) matrices for a Linear or 1x1 Conv2d, large enough to change the output visibly."""
    if isinstance(module, torch.nn.Conv2d):
        fan_in, fan_out, extra = module.in_channels, module.out_channels, (1, 1)
    else:
        fan_in, fan_out, extra = module.in_features, module.out_features, ()
    down = torch.randn(rank, fan_in, *extra, generator=generator) / fan_in**0.5
    up = torch.randn(fan_out, rank, *extra, generator=generator) / rank**0.5
    return down, up


def save_tiny_lora(path: Path, components_or_folder, seed: int = 0, rank: int = 4) -> Path:
    """Write a random kohya-format LoRA for the model in `components_or_folder` to `path` (.safetensors).

    `alpha` is rank / 2, so the loader's alpha / rank scaling is exercised too.
    """
    from safetensors.torch import save_file

    unet, text_encoder = _models(components_or_folder)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    models = (("lora_unet", unet, _UNET_TARGETS), ("lora_te", text_encoder, _TEXT_ENCODER_TARGETS))
    for prefix, model, targets in models:
        for name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(targets):
                continue
            if prefix == "lora_unet" and ".attentions." not in name:
                continue
            key = f"{prefix}_{name.replace('.', '_')}"
            down, up = _lora_pair(module, rank, generator)
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


def save_tiny_embedding(path: Path, text_encoder_hidden_size: int | str | Path, num_vectors: int = 2,
                        seed: int = 0) -> Path:
    """Write a random textual-inversion embedding of `num_vectors` vectors to `path`.

    `text_encoder_hidden_size` is the embedding width, or a weights folder to read it from.
    A `.safetensors` path gets `{"emb_params": (num_vectors, width)}`; a `.pt` path the A1111
    layout `{"string_to_param": {"*": ...}, "name": ..., ...}`.
    """
    if isinstance(text_encoder_hidden_size, (str, Path)):
        config = json.loads((Path(text_encoder_hidden_size) / "text_encoder" / "config.json").read_text())
        width = int(config["hidden_size"])
    else:
        width = int(text_encoder_hidden_size)
    generator = torch.Generator().manual_seed(seed)
    # Token embeddings of a trained CLIP have a norm of about 0.4; these are larger, so they show.
    vectors = torch.randn(num_vectors, width, generator=generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"emb_params": vectors}, str(path))
    elif path.suffix == ".pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem,
                    "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    else:
        raise ValueError(f"embedding files end in .safetensors or .pt, got {path}")
    return path
