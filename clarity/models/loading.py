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
from clarity.models import single_file, single_file_components
from clarity.models.markers import RANDOM_MARKER, TINY_MARKER

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
    return path.is_file() or single_file.is_single_file(path)


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
    #: Whether it is the full-size random model (`clarity.testing.random_sd15`): real sizes, meaningless output.
    is_random: bool = False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the speed path), fp32 on the CPU (where fp16 is slow and poorly supported)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def check_source(source: ModelSource | str | Path) -> ModelSource:
    """Raise `WeightsError` naming what is missing from `source` or wrong with it, and how to fix it.

    Cheap: single-file safetensors are checked from their header (key names) only.
    """
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
    from transformers.utils import logging as transformers_logging

    source = check_source(source)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    # transformers draws a progress bar per loaded model: noise in server logs and CLI output.
    transformers_logging.disable_progress_bar()

    if _is_file_source(source.base):
        base = _load_single_file_base(source, dtype)
    else:
        base = _load_folder_base(source.base, dtype)
    controlnet = _load_controlnet(source.controlnet_path, dtype)
    vae = base.vae if base.vae is not None else _load_vae(source.vae_path)

    for module in (base.unet, controlnet, vae, base.text_encoder):
        module.to(device).eval().requires_grad_(False)
    return ModelComponents(
        vae=vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        controlnet=controlnet,
        scheduler_config=base.scheduler_config,
        source=source.base,
        is_tiny=base.is_tiny,
        is_random=base.is_random,
    )


@dataclass
class _BaseParts:
    """What the base checkpoint provides: every part but the ControlNet, and the VAE when it is read with them."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    is_tiny: bool
    is_random: bool
    #: The VAE of a single-file base without a VAE override; None when the VAE comes from its own folder or file.
    vae: torch.nn.Module | None = None


def _load_single_file_base(source: ModelSource, dtype: torch.dtype) -> _BaseParts:
    """The parts of a single-file base: UNet, text encoder and (unless overridden) VAE from one checkpoint.

    Its tokenizer and noise schedule are SD1.5's, shipped in the package. The checkpoint itself is
    dropped on return: a real one is gigabytes, and only the models keep its tensors.
    """
    checkpoint = single_file.read_checkpoint(source.base, "SD1.5 checkpoint")
    single_file.check_base_keys(source.base, list(checkpoint.tensors), vae_override=source.vae is not None)
    unet = single_file_components.load_unet(checkpoint, dtype)
    text_encoder, tokenizer = single_file_components.load_text_encoder_and_tokenizer(checkpoint, dtype)
    return _BaseParts(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=single_file_components.scheduler_config(),
        is_tiny=TINY_MARKER in checkpoint.metadata,
        is_random=RANDOM_MARKER in checkpoint.metadata,
        vae=single_file_components.load_vae(checkpoint) if source.vae is None else None,
    )


def _load_folder_base(base: Path, dtype: torch.dtype) -> _BaseParts:
    """The parts of a diffusers base folder, each from its subfolder; the VAE is loaded apart (it may be overridden)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return _BaseParts(
        unet=_load_folder_part(
            "unet",
            base / "unet",
            lambda p: UNet2DConditionModel.from_pretrained(p, torch_dtype=dtype, local_files_only=True),
        ),
        text_encoder=_load_folder_part(
            "text_encoder",
            base / "text_encoder",
            lambda p: CLIPTextModel.from_pretrained(p, dtype=dtype, local_files_only=True),
        ),
        tokenizer=_load_folder_part(
            "tokenizer", base / "tokenizer", lambda p: CLIPTokenizer.from_pretrained(p, local_files_only=True)
        ),
        # Only the config is kept: each run builds a fresh scheduler of the requested kind from it.
        scheduler_config=_load_folder_part(
            "scheduler", base / "scheduler", lambda p: dict(DDIMScheduler.load_config(p, local_files_only=True))
        ),
        is_tiny=(base / TINY_MARKER).exists(),
        is_random=(base / RANDOM_MARKER).exists(),
    )


def _load_controlnet(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The ControlNet from a diffusers folder or an original-format file."""
    from diffusers import ControlNetModel

    if path.is_dir():
        return _load_folder_part(
            "controlnet", path, lambda p: ControlNetModel.from_pretrained(p, torch_dtype=dtype, local_files_only=True)
        )
    return single_file_components.load_controlnet(single_file.read_checkpoint(path, "ControlNet tile"), dtype)


def _load_vae(path: Path) -> torch.nn.Module:
    """The VAE from a diffusers folder or an original-format file, in float32 (see `load_components`)."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        return _load_folder_part(
            "vae", path, lambda p: AutoencoderKL.from_pretrained(p, torch_dtype=torch.float32, local_files_only=True)
        )
    return single_file_components.load_vae(single_file.read_checkpoint(path, "VAE"))
