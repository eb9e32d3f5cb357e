"""A tiny, randomly initialised model with the real SD1.5 + ControlNet-tile topology.

It exists so that tests, demos and CI exercise exactly the code paths of real weights on a
machine with no GPU and no model hub: the same diffusers/transformers classes, the same
folder layout and file formats, the same 8x VAE with 4 latent channels, the same UNet block
structure (cross-attention at the first three levels, 13 ControlNet residuals), a CLIP text
encoder and tokenizer. Only the widths are tiny. Its output is meaningless noise-shaped
detail: it proves plumbing and numerics, never image quality.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clarity.models.clip_tokenizers import byte_level_tokenizer
from clarity.models.markers import TINY_MARKER
from clarity.models.single_file import SCALING_FACTOR_KEY, VAE_PREFIX
from clarity.testing.adapters import save_tiny_embedding, save_tiny_lora
from clarity.testing.fixtures import save_tiny_esrgan, save_tiny_safety_checker
from clarity.testing.ldm_writer import controlnet_to_ldm, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

#: Widths of the four UNet/ControlNet levels; SD1.5 uses (320, 640, 1280, 1280).
_UNET_WIDTHS = (16, 16, 32, 32)
#: Widths of the four VAE levels; SD1.5 uses (128, 256, 512, 512).
_VAE_WIDTHS = (8, 8, 16, 16)
_TEXT_WIDTH = 32
#: SD1.5's training noise schedule, kept so schedulers behave exactly as with real weights.
_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


#: The tiny VAE after a few minutes of training (see train_tiny_vae.py), shipped with the package.
TRAINED_VAE_FILE = Path(__file__).with_name("tiny_vae.safetensors")


def build_tiny_vae(seed: int = 0, trained: bool = True):
    """The tiny SD-shaped `AutoencoderKL`: 4 levels (8x), 4 latent channels, narrow widths.

    With `trained`, its weights are the shipped trained ones: a random VAE is no autoencoder,
    and VAE behaviour (tiling, colour, seams) can only be tested on one that is.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=_VAE_WIDTHS,
        layers_per_block=2,
        latent_channels=4,
        # Half the narrowest width: the rule single-file loading assumes (GroupNorm groups are not in the
        # weights; single_file_components._norm_groups gives 32 for SD1.5 and this for the tiny model).
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    if trained:
        from safetensors import safe_open

        with safe_open(str(TRAINED_VAE_FILE), framework="pt") as weights:
            vae.load_state_dict({name: weights.get_tensor(name) for name in weights.keys()})  # noqa: SIM118
            vae.register_to_config(scaling_factor=float(weights.metadata()["scaling_factor"]))
    return vae


def build_tiny_text_encoder(tokenizer, seed: int = 0):
    """The tiny CLIP `CLIPTextModel`: 2 layers of width 32 over `tokenizer`'s (byte-level) vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_WIDTH,
            intermediate_size=2 * _TEXT_WIDTH,
            num_hidden_layers=2,
            # Two heads of half the width: the rule single-file loading assumes (head counts are not in
            # the weights; single_file_components.text_encoder_config gives 12 for SD1.5 and this here).
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_tiny_unet(seed: int = 0):
    """The tiny SD1.5-shaped `UNet2DConditionModel`: cross-attention at the first three of four levels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + 1)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=_UNET_WIDTHS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_WIDTH,
        # SD1.5's 8 heads per attention layer, and half the narrowest width as GroupNorm groups: neither
        # is in the weights, and single-file loading assumes these (single_file_components.unet_config).
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_tiny_controlnet(seed: int = 0):
    """The tiny ControlNet-tile-shaped `ControlNetModel`, its zero convolutions made non-zero."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 2)
    controlnet = ControlNetModel(
        in_channels=4,
        layers_per_block=2,
        block_out_channels=_UNET_WIDTHS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=_TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
        # Four entries, three stride-2 convolutions: the 8x pixel-to-latent step of SD1.5.
        conditioning_embedding_out_channels=(4, 8, 8, 16),
    )
    # A trained ControlNet starts from zero convolutions and learns away from them; left at
    # zero here, the tiny ControlNet would add nothing and resemblance would be untestable.
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.3)
            torch.nn.init.zeros_(conv.bias)
    return controlnet


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny SD1.5-shaped `StableDiffusionControlNetImg2ImgPipeline` in memory.

    Deterministic for a given seed: each component builder seeds torch with its own offset of
    `seed` right before initialising, so two builds have identical weights.
    """
    from diffusers import PNDMScheduler, StableDiffusionControlNetImg2ImgPipeline

    tokenizer = byte_level_tokenizer()
    return StableDiffusionControlNetImg2ImgPipeline(
        vae=build_tiny_vae(seed),
        text_encoder=build_tiny_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=build_tiny_unet(seed),
        controlnet=build_tiny_controlnet(seed),
        # from_config keeps SD1.5's DDIM-only keys in the saved config, as in real weights.
        scheduler=PNDMScheduler.from_config(_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


#: The formats `save_tiny_weights` can write: the diffusers folder layout, and single files in the
#: original Stable Diffusion format (safetensors, plus the pickled .ckpt/.pth kinds).
FORMATS = ("diffusers", "single-file", "extras")
#: What the "extras" format writes, relative to the folder: the optional parts a weights
#: folder may hold (see weights/README.md), each in the format users have them in.
EXTRA_FILES = {
    "lora": "loras/tiny-detail.safetensors",  # kohya format, as Civitai LoRAs come
    "embedding": "embeddings/tiny-negative.safetensors",  # textual inversion (`emb_params`)
    "upscaler": "upscalers/tiny-esrgan-4x.pth",  # ESRGAN (RRDBNet) in the original key layout
    "safety_checker": "safety_checker",  # a checker that never flags
}
#: The single files written by the "single-file" format, by role.
SINGLE_FILES = {
    "checkpoint": "tiny-sd15.safetensors",
    "checkpoint_pickle": "tiny-sd15.ckpt",
    "controlnet": "tiny-controlnet-tile.safetensors",
    "controlnet_pickle": "tiny-controlnet-tile.pth",
    "vae": "tiny-vae.safetensors",
}


def save_tiny_weights(folder: str | Path, seed: int = 0, formats: tuple[str, ...] = ("diffusers",)) -> Path:
    """Write the tiny model to `folder` in each of `formats` (see `FORMATS`); return `folder`.

    "diffusers" writes the diffusers folder layout (safetensors files), the one real weights use
    (see weights/README.md). "single-file" writes `SINGLE_FILES` into `folder`: a whole SD
    checkpoint, a ControlNet and a VAE with the original key names, as studios keep real models.
    Every format loads through the same `load_components`. "extras" writes `EXTRA_FILES`: a
    LoRA, an embedding, an ESRGAN pre-upscaler and a safety checker for the tiny model.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"formats: unknown {unknown}; choose from {list(FORMATS)}")
    folder = Path(folder)
    pipeline = build_tiny_pipeline(seed)
    if "diffusers" in formats:
        pipeline.save_pretrained(folder, safe_serialization=True)
        (folder / TINY_MARKER).write_text(
            "Tiny randomly initialised SD1.5-shaped test model made by `clarity weights tiny`.\n"
            "It produces no meaningful detail; use it for tests and trying the server only.\n"
        )
    if "single-file" in formats:
        folder.mkdir(parents=True, exist_ok=True)
        _save_single_files(pipeline, folder)
    if "extras" in formats:
        _save_extras(pipeline, folder, seed)
    return folder


def _save_extras(pipeline, folder: Path, seed: int) -> None:
    save_tiny_lora(folder / EXTRA_FILES["lora"], pipeline, seed=seed)
    save_tiny_embedding(folder / EXTRA_FILES["embedding"], pipeline.text_encoder.config.hidden_size, seed=seed)
    save_tiny_esrgan(folder / EXTRA_FILES["upscaler"], seed=seed)
    save_tiny_safety_checker(folder / EXTRA_FILES["safety_checker"], seed=seed)


def _save_single_files(pipeline, folder: Path) -> None:
    from safetensors.torch import save_file

    # The trained tiny VAE's scaling factor is not SD1.5's and not in its weights: record it.
    metadata = {TINY_MARKER: "1", SCALING_FACTOR_KEY: repr(pipeline.vae.config.scaling_factor)}
    checkpoint = {
        **unet_to_ldm(pipeline.unet),
        **vae_to_ldm(pipeline.vae, prefix=VAE_PREFIX),
        **text_encoder_to_ldm(pipeline.text_encoder),
    }
    controlnet = controlnet_to_ldm(pipeline.controlnet)

    def contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.contiguous() for key, value in tensors.items()}

    save_file(contiguous(checkpoint), folder / SINGLE_FILES["checkpoint"], metadata=metadata)
    save_file(contiguous(controlnet), folder / SINGLE_FILES["controlnet"])
    save_file(contiguous(vae_to_ldm(pipeline.vae)), folder / SINGLE_FILES["vae"], metadata=metadata)
    # The pickled kinds as the original tools wrote them: Lightning's {"state_dict": ...} for the
    # checkpoint (metadata as top-level strings), a bare state dict for the ControlNet.
    torch.save({"state_dict": checkpoint, **metadata}, folder / SINGLE_FILES["checkpoint_pickle"])
    torch.save(controlnet, folder / SINGLE_FILES["controlnet_pickle"])
