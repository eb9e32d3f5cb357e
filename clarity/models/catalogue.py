"""The weights catalogue: which models, ControlNet, VAE and extras a weights folder holds.

`--weights` names either one model folder (the original layout) or a weights root:

    weights/
      models/<model-id>/               diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
      models/<model-id>.safetensors    single-file SD1.5 checkpoint (or .ckpt)
      controlnet/                      ControlNet tile: a diffusers folder, or one checkpoint file inside
      vae/                             optional VAE override for every model (folder or one file inside)
      loras/  embeddings/  upscalers/  safety_checker/     optional

A folder with `unet/` in it is one model, served as `clarity-upscaler` (`DEFAULT_MODEL_ID`),
with its ControlNet and VAE inside; any other folder is a root. In a root, a model folder's
own `controlnet/` wins over the shared one (a ControlNet is not part of a checkpoint), while
the shared `vae/` replaces every model's own VAE (it is there to override them). The default
model is `clarity-upscaler` when present, else the first id in alphabetical order (the first
of those selected, when only some are), unless chosen explicitly.

What is installed is checked, for `clarity weights list`, by `inspection.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clarity.errors import ParamError, WeightsError
from clarity.models.markers import RANDOM_MARKER, TINY_MARKER

# clarity.models.loading imports torch, which takes seconds: it is imported where used, so that
# `clarity weights download` can fail offline at once and `--help` stays fast.
if TYPE_CHECKING:
    from clarity.models.loading import ModelSource

#: The id of a model folder given directly, and the preferred default in a root.
DEFAULT_MODEL_ID = "clarity-upscaler"
#: What a model id may look like: lower case, digits, `.`, `_`, `-`; no path separators, no leading dot.
MODEL_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
#: Single-file checkpoints (a model in models/, or the one file in controlnet/ or vae/). Pickles
#: (all but .safetensors) are for the loader to read safely (tensors only), never unpickled here.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt")
#: The optional folders of a root, by the `Catalogue` field that holds them.
EXTRA_FOLDERS = {"loras": "loras", "embeddings": "embeddings", "upscalers": "upscalers",
                 "safety_checker": "safety_checker"}


@dataclass(frozen=True)
class Catalogue:
    """The models and extras found in a weights folder; picklable, so workers can receive it."""

    #: The folder it was discovered from (`--weights`).
    root: Path
    #: Every usable model id and where its parts come from, in listing order.
    models: dict[str, ModelSource]
    #: The model used when a request or command names none.
    default_model: str
    #: LoRA files (`<root>/loras`), None when absent; likewise for the other extras.
    loras: Path | None = None
    #: Textual-inversion embeddings.
    embeddings: Path | None = None
    #: Pre-upscaler (ESRGAN) checkpoints.
    upscalers: Path | None = None
    #: The safety checker's diffusers/transformers folder.
    safety_checker: Path | None = None
    #: True when `root` is a single model folder rather than a root.
    single_model: bool = False

    @classmethod
    def discover(
        cls, path: str | Path, *, models: Sequence[str] | None = None, default_model: str | None = None
    ) -> Catalogue:
        """The catalogue of `path`, keeping only `models` when given, with `default_model` as the default.

        Raises `WeightsError` when `path` holds no model or a file is misnamed, and `ParamError`
        naming `models` / `default_model` when those ask for ids that are not there.
        """
        from clarity.models.loading import ModelSource

        root = Path(path)
        if not root.exists():
            raise WeightsError(
                f"no weights at {root}. Put weights there (see weights/README.md, or run `clarity weights download"
                f" --weights {root}`), or create the tiny test model with `clarity weights tiny {root}` to try"
                " things out."
            )
        if not root.is_dir():
            raise WeightsError(f"{root} is a file; --weights takes a folder. Put checkpoints in <root>/models/"
                               " (see weights/README.md).")
        # Either layout may hold the optional folders beside its model(s).
        extras = {name: (root / folder if (root / folder).is_dir() else None) for name, folder in EXTRA_FOLDERS.items()}
        if (root / "unet").is_dir():
            found = {DEFAULT_MODEL_ID: ModelSource(base=root)}
            catalogue = cls(root=root, models=found, default_model=DEFAULT_MODEL_ID, single_model=True, **extras)
        else:
            found = _discover_models(root)
            first = DEFAULT_MODEL_ID if DEFAULT_MODEL_ID in found else next(iter(found))
            catalogue = cls(root=root, models=found, default_model=first, **extras)
        return catalogue._select(models, default_model)

    def _select(self, models: Sequence[str] | None, default_model: str | None) -> Catalogue:
        chosen = self.models
        if models:
            for model_id in models:
                self.model_id(model_id, param="models")
            chosen = {model_id: self.models[model_id] for model_id in models}
        if default_model is not None:
            default = replace(self, models=chosen).model_id(default_model, param="default_model")
        elif self.default_model in chosen:
            default = self.default_model
        else:
            default = next(iter(chosen))  # the first of `models`
        return replace(self, models=chosen, default_model=default)

    def model_id(self, requested: str | None, param: str = "model") -> str:
        """`requested`, or the default model when None; `ParamError(param)` naming the ids there are if unknown."""
        if requested is None:
            return self.default_model
        if requested not in self.models:
            raise ParamError(param, f"no model {requested!r} in {self.root}; available: {', '.join(self.models)}")
        return requested

    def source(self, model_id: str | None = None) -> ModelSource:
        """Where the parts of `model_id` (default: the default model) come from; `KeyError` if unknown."""
        return self.models[model_id or self.default_model]

    def is_tiny(self, model_id: str) -> bool:
        """Whether `model_id` is the tiny test model (whose output has no meaningful detail)."""
        return (self.models[model_id].base / TINY_MARKER).exists()

    def is_random(self, model_id: str) -> bool:
        """Whether `model_id` is the full-size random model (real sizes and speed, no meaningful output)."""
        return (self.models[model_id].base / RANDOM_MARKER).exists()


def upscaler_kwargs(catalogue: Catalogue, model_id: str) -> dict[str, Any]:
    """The `Upscaler.from_pretrained` keyword arguments that load `model_id` from `catalogue`.

    The one place the catalogue meets the engine: the model's parts and the shared folders of
    LoRAs, embeddings, pre-upscalers and the safety checker.
    """
    return {
        "path": catalogue.source(model_id),
        "name": model_id,
        "lora_dir": catalogue.loras,
        "embeddings_dir": catalogue.embeddings,
        "upscalers_dir": catalogue.upscalers,
        "safety_checker_dir": catalogue.safety_checker,
    }


def suggested_id(name: str) -> str:
    """A valid model id close to `name` (a file or folder stem), for error messages."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return cleaned or "my-model"


def _discover_models(root: Path) -> dict[str, ModelSource]:
    from clarity.models.loading import ModelSource

    folder = root / "models"
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    candidates = [p for p in entries if p.is_dir() or p.suffix in SINGLE_FILE_SUFFIXES]
    if not candidates:
        raise WeightsError(f"no models in {folder}/. " + _no_models_hint(root))
    controlnet = part_location(root / "controlnet")
    vae = part_location(root / "vae") if (root / "vae").exists() else None
    found: dict[str, ModelSource] = {}
    for path in candidates:
        model_id = path.stem if path.is_file() else path.name
        if not MODEL_ID_PATTERN.fullmatch(model_id):
            kind = "file" if path.is_file() else "folder"
            target = suggested_id(model_id) + (path.suffix if path.is_file() else "")
            raise WeightsError(f"{path}: model ids are lower case letters, digits, '.', '_' and '-'; rename the"
                               f" {kind} to {target}")
        if model_id in found:
            raise WeightsError(f"{folder}/ holds both a folder and a file named {model_id}; keep one")
        own_controlnet = path / "controlnet" if path.is_dir() else None
        uses_own = own_controlnet is not None and own_controlnet.is_dir()
        found[model_id] = ModelSource(base=path, controlnet=None if uses_own else controlnet, vae=vae)
    return found


def part_location(folder: Path) -> Path:
    """A ControlNet or VAE folder: itself when in diffusers layout, else the one checkpoint file in it."""

    if (folder / "config.json").exists() or not folder.is_dir():
        return folder
    files = sorted(p for p in folder.iterdir() if p.suffix in SINGLE_FILE_SUFFIXES)
    if len(files) > 1:
        raise WeightsError(f"{folder}/ holds {len(files)} checkpoints ({', '.join(p.name for p in files)});"
                           " keep one")
    return files[0] if files else folder


def _no_models_hint(root: Path) -> str:
    # The common mistake after the layout changed: a model folder put directly in the root.
    strays = sorted(p.name for p in root.iterdir() if (p / "unet").is_dir()) if root.is_dir() else []
    if strays:
        return (f"{root}/{strays[0]} is a model folder: pass --weights {root / strays[0]}, or move it to"
                f" {root}/models/{strays[0]}. See weights/README.md.")
    return (f"Run `clarity weights download --weights {root}`, copy weights there as weights/README.md"
            f" describes, or create the tiny test model with `clarity weights tiny {root}/models/tiny`.")
