"""Loading model components from a weights folder: the only code that knows its layout.

A model is described by a `ModelSource`: a base checkpoint, plus the ControlNet and an optional
VAE override. The base is a folder in the diffusers pipeline layout, which may hold the
ControlNet beside the other parts:

    <folder>/unet/  vae/  text_encoder/  tokenizer/  scheduler/  [controlnet/]

Everything loads from local files (`local_files_only=True`): no hub lookup, ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clarity.models.tiny import TINY_MARKER

#: Subfolders a model folder must have, and what goes in each.
REQUIRED_PARTS: dict[str, str] = {
    "unet": "the SD1.5-family UNet",
    "vae": "the VAE (sd-vae-ft-mse recommended)",
    "text_encoder": "the CLIP text encoder",
    "tokenizer": "the CLIP tokenizer",
    "scheduler": "the scheduler config (its noise schedule)",
    "controlnet": "ControlNet tile (control_v11f1e_sd15_tile)",
}


class WeightsError(FileNotFoundError):
    """A weights folder is missing, incomplete or unreadable; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where the parts of one model come from."""

    #: The base checkpoint: a diffusers pipeline folder (unet/, vae/, text_encoder/, ...).
    base: Path
    #: The ControlNet tile model (a diffusers model folder); None means `<base>/controlnet`.
    controlnet: Path | None = None
    #: A VAE to use instead of the base's own (a diffusers model folder); None keeps the base's.
    vae: Path | None = None

    @classmethod
    def of(cls, source: ModelSource | str | Path) -> ModelSource:
        """`source` itself, or a source whose base (holding its ControlNet) is the folder `source`."""
        return source if isinstance(source, ModelSource) else cls(base=Path(source))

    @property
    def controlnet_path(self) -> Path:
        return self.controlnet if self.controlnet is not None else self.base / "controlnet"

    @property
    def vae_path(self) -> Path:
        return self.vae if self.vae is not None else self.base / "vae"


@dataclass
class ModelComponents:
    """The loaded parts of one model, ready for `TiledUpscalePipeline`."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    controlnet: torch.nn.Module
    scheduler_config: dict
    source: Path
    is_tiny: bool


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the speed path), fp32 on the CPU (where fp16 is slow and poorly supported)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def check_model_folder(source: ModelSource | str | Path) -> ModelSource:
    """Raise `WeightsError` naming what is missing from `source`, and how to fix it."""
    source = ModelSource.of(source)
    folder = source.base
    if not folder.is_dir():
        raise WeightsError(
            f"no model folder at {folder}. Put weights there (see weights/README.md), or create the tiny"
            f" test model with `clarity weights tiny {folder}` to try things out."
        )
    paths = {name: folder / name for name in REQUIRED_PARTS}
    paths.update(controlnet=source.controlnet_path, vae=source.vae_path)
    missing = [f"{path}/ ({REQUIRED_PARTS[name]})" for name, path in paths.items() if not path.is_dir()]
    if missing:
        raise WeightsError(f"model {folder} is incomplete; missing: {', '.join(missing)}. See weights/README.md.")
    return source


def load_components(
    source: ModelSource | str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> ModelComponents:
    """Load every part of the model `source` (or model folder) onto `device` (default: CUDA if present, else CPU).

    The VAE stays in float32 whatever `dtype` is: SD1.5's VAE overflows to NaN in float16.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    source = check_model_folder(source)
    folder = source.base
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)

    paths = {part: folder / part for part in REQUIRED_PARTS}
    paths.update(controlnet=source.controlnet_path, vae=source.vae_path)

    def load(part: str, loader):
        try:
            return loader(paths[part])
        except Exception as error:  # noqa: BLE001 - any failure here means the files are bad
            raise WeightsError(f"could not load {part} from {paths[part]}: {error}") from error

    common = {"local_files_only": True}
    # transformers draws a progress bar per loaded model: noise in server logs and CLI output.
    transformers_logging.disable_progress_bar()
    unet = load("unet", lambda p: UNet2DConditionModel.from_pretrained(p, torch_dtype=dtype, **common))
    controlnet = load("controlnet", lambda p: ControlNetModel.from_pretrained(p, torch_dtype=dtype, **common))
    vae = load("vae", lambda p: AutoencoderKL.from_pretrained(p, torch_dtype=torch.float32, **common))
    text_encoder = load("text_encoder", lambda p: CLIPTextModel.from_pretrained(p, dtype=dtype, **common))
    tokenizer = load("tokenizer", lambda p: CLIPTokenizer.from_pretrained(p, **common))
    # Only the config is kept: each run builds a fresh scheduler of the requested kind from it.
    scheduler_config = load("scheduler", lambda p: dict(DDIMScheduler.load_config(p, **common)))

    for module in (unet, controlnet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return ModelComponents(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler_config=scheduler_config,
        source=folder,
        is_tiny=(folder / TINY_MARKER).exists(),
    )
