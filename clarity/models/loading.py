"""Loading model components from weights on disk: the only code that knows their layout.

A model is described by a `ModelSource`: a base checkpoint, plus the ControlNet and an optional
VAE override. Each may be a folder in the diffusers layout or a single file in the original
Stable Diffusion format (`.safetensors`, or a `.ckpt`/`.pth`/`.pt` pickle read with
`weights_only=True`; see single_file.py and single_file_components.py). A diffusers base
folder may hold the ControlNet beside the other parts:

    <folder>/unet/  vae/  text_encoder/  tokenizer/  scheduler/  [controlnet/]

A single-file base holds the UNet, VAE and text encoder; its configs, tokenizer and noise
schedule are SD1.5's, shipped in the package. Everything loads from local files only: no hub
lookup, ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clarity.errors import WeightsError
from clarity.models.tiny_marker import TINY_MARKER

#: Subfolders a diffusers model folder must have, and what goes in each.
REQUIRED_PARTS: dict[str, str] = {
    "unet": "the SD1.5-family UNet",
    "vae": "the VAE (sd-vae-ft-mse recommended)",
    "text_encoder": "the CLIP text encoder",
    "tokenizer": "the CLIP tokenizer",
    "scheduler": "the scheduler config (its noise schedule)",
    "controlnet": "ControlNet tile (control_v11f1e_sd15_tile)",
}



@dataclass(frozen=True)
class ModelSource:
    """Where the parts of one model come from: each a diffusers folder or a single file."""

    #: The base checkpoint: a diffusers pipeline folder (unet/, vae/, text_encoder/, ...), or a
    #: single-file SD1.5 checkpoint (e.g. juggernaut_reborn.safetensors).
    base: Path
    #: The ControlNet tile model (a diffusers model folder, or e.g. control_v11f1e_sd15_tile.pth);
    #: None means `<base>/controlnet`, which a single-file base does not have.
    controlnet: Path | None = None
    #: A VAE to use instead of the base's own (a diffusers model folder, or e.g.
    #: vae-ft-mse-840000-ema-pruned.safetensors); None keeps the base's.
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
        """The VAE's folder or file: the override, else the base's (a single-file base holds its own)."""
        if self.vae is not None:
            return self.vae
        return self.base if _is_file_source(self.base) else self.base / "vae"


def _is_file_source(path: Path) -> bool:
    from clarity.models.single_file import is_single_file

    return path.is_file() or is_single_file(path)


@dataclass
class ModelComponents:
    """The loaded parts of one model, ready for `TiledUpscalePipeline`."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: torch.nn.Module
    controlnet: torch.nn.Module
    scheduler_config: dict
    #: The base checkpoint (folder or file).
    source: Path
    is_tiny: bool


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the speed path), fp32 on the CPU (where fp16 is slow and poorly supported)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def check_source(source: ModelSource | str | Path) -> ModelSource:
    """Raise `WeightsError` naming what is missing from `source` or wrong with it, and how to fix it.

    Cheap: single-file safetensors are checked from their header (key names) only.
    """
    from clarity.models import single_file

    source = ModelSource.of(source)
    base = source.base
    if _is_file_source(base):
        if source.controlnet is None:
            raise WeightsError(
                f"{base} is a single-file checkpoint, which holds no ControlNet: name the ControlNet tile"
                f" (e.g. control_v11f1e_sd15_tile.pth) as the model's `controlnet` (see weights/README.md)."
            )
        keys = single_file.read_keys(base, "SD1.5 checkpoint")
        if keys is not None:
            single_file.check_base_keys(base, keys, vae_override=source.vae is not None)
    elif not base.is_dir():
        raise WeightsError(
            f"no model folder at {base}. Put weights there (see weights/README.md), or create the tiny"
            f" test model with `clarity weights tiny {base}` to try things out."
        )
    else:
        overridden = {"controlnet": source.controlnet, "vae": source.vae}
        parts = {name: base / name for name in REQUIRED_PARTS if overridden.get(name) is None}
        missing = [f"{path}/ ({REQUIRED_PARTS[name]})" for name, path in parts.items() if not path.is_dir()]
        if missing:
            raise WeightsError(f"model {base} is incomplete; missing: {', '.join(missing)}. See weights/README.md.")

    overrides = (
        ("controlnet", source.controlnet, "ControlNet tile", single_file.check_controlnet_keys),
        ("vae", source.vae, "VAE", single_file.check_vae_keys),
    )
    for name, path, what, check_keys in overrides:
        if path is None or path.is_dir():
            continue
        if not _is_file_source(path):
            raise WeightsError(
                f"no {what} at {path}: expected a diffusers folder or a {'/'.join(single_file.SINGLE_FILE_SUFFIXES)}"
                f" file ({REQUIRED_PARTS[name]})."
            )
        keys = single_file.read_keys(path, what)
        if keys is not None:
            check_keys(path, keys)
    return source



def _load_folder_part(part: str, path: Path, loader):
    try:
        return loader(path)
    except Exception as error:  # noqa: BLE001 - any failure here means the files are bad
        raise WeightsError(f"could not load {part} from {path}: {error}") from error


def load_components(
    source: ModelSource | str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> ModelComponents:
    """Load every part of the model `source` (or model folder) onto `device` (default: CUDA if present, else CPU).

    The VAE stays in float32 whatever `dtype` is: SD1.5's VAE overflows to NaN in float16.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    from clarity.models import single_file, single_file_components

    source = check_source(source)
    base = source.base
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    common = {"local_files_only": True}
    # transformers draws a progress bar per loaded model: noise in server logs and CLI output.
    transformers_logging.disable_progress_bar()

    if _is_file_source(base):
        checkpoint = single_file.read_checkpoint(base, "SD1.5 checkpoint")
        single_file.check_base_keys(base, list(checkpoint.tensors), vae_override=source.vae is not None)
        unet = single_file_components.load_unet(checkpoint, dtype)
        text_encoder, tokenizer = single_file_components.load_text_encoder_and_tokenizer(checkpoint, dtype)
        scheduler_config = single_file_components.scheduler_config()
        is_tiny = TINY_MARKER in checkpoint.metadata
        vae = single_file_components.load_vae(checkpoint) if source.vae is None else None
        del checkpoint  # the tensors now live in the models; a real checkpoint is gigabytes
    else:
        unet = _load_folder_part(
            "unet", base / "unet", lambda p: UNet2DConditionModel.from_pretrained(p, torch_dtype=dtype, **common)
        )
        text_encoder = _load_folder_part(
            "text_encoder", base / "text_encoder", lambda p: CLIPTextModel.from_pretrained(p, dtype=dtype, **common)
        )
        tokenizer = _load_folder_part(
            "tokenizer", base / "tokenizer", lambda p: CLIPTokenizer.from_pretrained(p, **common)
        )
        # Only the config is kept: each run builds a fresh scheduler of the requested kind from it.
        scheduler_config = _load_folder_part(
            "scheduler", base / "scheduler", lambda p: dict(DDIMScheduler.load_config(p, **common))
        )
        is_tiny = (base / TINY_MARKER).exists()
        vae = None

    controlnet_path = source.controlnet_path
    if controlnet_path.is_dir():
        controlnet = _load_folder_part(
            "controlnet", controlnet_path, lambda p: ControlNetModel.from_pretrained(p, torch_dtype=dtype, **common)
        )
    else:
        controlnet = single_file_components.load_controlnet(
            single_file.read_checkpoint(controlnet_path, "ControlNet tile"), dtype
        )
    if vae is None:
        vae_path = source.vae_path
        if vae_path.is_dir():
            vae = _load_folder_part(
                "vae", vae_path, lambda p: AutoencoderKL.from_pretrained(p, torch_dtype=torch.float32, **common)
            )
        else:
            vae = single_file_components.load_vae(single_file.read_checkpoint(vae_path, "VAE"))

    for module in (unet, controlnet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    return ModelComponents(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet,
        scheduler_config=scheduler_config,
        source=base,
        is_tiny=is_tiny,
    )
