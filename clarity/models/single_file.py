"""Single-file checkpoints in the original Stable Diffusion (LDM) format: reading them, recognising what they hold.

Studios keep SD1.5 models as one file (`juggernaut_reborn.safetensors`, sometimes a `.ckpt`
pickle) with the original key names: `model.diffusion_model.*` (UNet), `first_stage_model.*`
(VAE), `cond_stage_model.transformer.*` (CLIP text encoder); the ControlNet as
`control_v11f1e_sd15_tile.pth` (`control_model.*`); VAE overrides as
`vae-ft-mse-840000-ema-pruned.safetensors` (LDM VAE keys, with or without `first_stage_model.`).

Such files hold weights only, under these prefixes. Reading a header or a whole file, and telling
from the key names whether a file is the part it should be (and if not, what it is instead),
are here; building the diffusers models from the tensors is in `single_file_components.py`.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clarity.errors import WeightsError

#: File suffixes read as single-file checkpoints; the pickled ones load with `weights_only=True`.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
CONTROLNET_PREFIX = "control_model."
#: Metadata key (safetensors metadata, or a top-level string entry of a pickle) giving the VAE's
#: latent scaling factor. It is not in the weights; SD1.5 VAEs all use the default 0.18215, the
#: tiny test model's trained VAE does not, so its writer records it here.
SCALING_FACTOR_KEY = "scaling_factor"


def is_single_file(path: Path) -> bool:
    """Whether `path` names a single-file checkpoint (by suffix; it need not exist)."""
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES


@dataclass
class Checkpoint:
    """The tensors of one single-file checkpoint, with its metadata (strings)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix`, with it removed."""
        return {key[len(prefix) :]: value for key, value in self.tensors.items() if key.startswith(prefix)}


def _missing_file_error(path: Path, what: str) -> WeightsError:
    return WeightsError(f"no {what} file at {path}. Check the path (see weights/README.md).")


def read_keys(path: Path, what: str) -> list[str] | None:
    """The tensor names in `path` without reading the tensors: safetensors only (None for pickles).

    Cheap (the header alone), so a server can refuse a bad file before starting its workers.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise _missing_file_error(path, what)
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as weights:
            return list(weights.keys())  # noqa: SIM118 - safe_open objects are not iterable
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error


def read_checkpoint(path: Path, what: str) -> Checkpoint:
    """Read every tensor of `path` (`what` names its role in errors).

    Pickled checkpoints load with `torch.load(weights_only=True)`: tensors and plain containers
    only, never arbitrary objects, because unpickling runs code a downloaded file could carry.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise _missing_file_error(path, what)
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as weights:
                tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
                return Checkpoint(path, tensors, dict(weights.metadata() or {}))
        except (SafetensorError, OSError, ValueError) as error:
            raise WeightsError(
                f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
            ) from error
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise WeightsError(f"{path} is not a readable PyTorch checkpoint (corrupt?): {error}") from error
        raise WeightsError(
            f"{path} needs full unpickling, which can run arbitrary code, so it is refused. Convert it to"
            f" .safetensors on a trusted machine (load it with torch.load, save it with safetensors.torch.save_file)."
            f" Detail: {str(error).splitlines()[0]}"
        ) from error
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a truncated or foreign file
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from error
    if not isinstance(content, dict):
        raise WeightsError(f"{path} holds a {type(content).__name__}, not a dictionary of tensors.")
    metadata = {key: value for key, value in content.items() if isinstance(value, str)}
    # Lightning checkpoints nest the weights under "state_dict", sometimes twice.
    while isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    tensors = {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}
    return Checkpoint(path, tensors, metadata)


# --- What a checkpoint holds ---------------------------------------------------------------


def has_prefix(keys: Iterable[str], prefix: str) -> bool:
    """Whether any of `keys` starts with `prefix`."""
    return any(key.startswith(prefix) for key in keys)


def check_base_keys(path: Path, keys: list[str], vae_override: bool) -> None:
    """Raise `WeightsError` unless `keys` are those of a complete SD1.5 single-file checkpoint."""
    if has_prefix(keys, "conditioner.embedders.") or has_prefix(keys, UNET_PREFIX + "label_emb."):
        raise WeightsError(f"{path} is an SDXL checkpoint; Clarity needs an SD1.5-family checkpoint.")
    if has_prefix(keys, "cond_stage_model.model."):
        raise WeightsError(
            f"{path} is an SD2.x checkpoint (OpenCLIP text encoder); Clarity needs an SD1.5-family checkpoint."
        )
    if not has_prefix(keys, UNET_PREFIX):
        raise WeightsError(
            f"{path} is not an SD1.5 checkpoint: it has no UNet weights ({UNET_PREFIX}*)."
            f" Expected a single-file Stable Diffusion 1.5 model such as a Civitai .safetensors."
        )
    if not has_prefix(keys, TEXT_PREFIX):
        raise WeightsError(
            f"{path} has no CLIP text encoder ({TEXT_PREFIX}*): it is UNet-only. Use a full SD1.5 checkpoint"
            f" (UNet, VAE and text encoder) or a diffusers folder."
        )
    if not vae_override and not has_prefix(keys, VAE_PREFIX):
        raise WeightsError(
            f"{path} has no VAE ({VAE_PREFIX}*). Add a VAE override (the `vae` of the model source), e.g."
            f" vae-ft-mse-840000-ema-pruned.safetensors."
        )


def check_controlnet_keys(path: Path, keys: list[str]) -> None:
    """Raise `WeightsError` unless `keys` are those of an original-format ControlNet."""
    if not any(key.removeprefix(CONTROLNET_PREFIX).startswith("input_hint_block.") for key in keys):
        raise WeightsError(
            f"{path} is not an SD1.5 ControlNet: expected the original ControlNet keys"
            f" ({CONTROLNET_PREFIX}input_hint_block.*, ...), as in control_v11f1e_sd15_tile.pth."
        )


def check_vae_keys(path: Path, keys: list[str]) -> None:
    """Raise `WeightsError` unless `keys` hold an LDM-format VAE (bare, or under `first_stage_model.`)."""
    stripped = [key.removeprefix(VAE_PREFIX) for key in keys]
    if not (has_prefix(stripped, "encoder.down.") and has_prefix(stripped, "decoder.up.")):
        raise WeightsError(
            f"{path} is not an SD1.5 VAE: expected the original VAE keys (encoder.down.*, decoder.up.*,"
            f" optionally under {VAE_PREFIX}), as in vae-ft-mse-840000-ema-pruned.safetensors."
        )
