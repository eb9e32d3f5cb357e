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

`inspect_weights` checks what is installed for `clarity weights list`: cheaply by default
(files present, safetensors headers readable, the tensors each part must have), or by really
loading every model.
"""

from __future__ import annotations

import gc
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clarity.errors import ParamError, WeightsError
from clarity.models.tiny_marker import TINY_MARKER

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
    controlnet = _part_location(root / "controlnet")
    vae = _part_location(root / "vae") if (root / "vae").exists() else None
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


def _part_location(folder: Path) -> Path:
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


# --- checking what is installed ------------------------------------------------------------------

#: Tensors every checkpoint of a part has (any one of them, by name suffix), in the diffusers and
#: the original single-file layouts. Finding one is a cheap sign the file is what it claims to be.
EXPECTED_TENSORS: dict[str, tuple[str, ...]] = {
    "unet": ("conv_in.weight",),
    "text_encoder": ("embeddings.token_embedding.weight",),
    "controlnet": ("controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight"),
    "vae": ("encoder.conv_in.weight",),
    "safety_checker": ("concept_embeds",),
}
#: Weight files of a diffusers/transformers part folder, in the order the loaders prefer them.
PART_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                     "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                     "diffusion_pytorch_model.bin", "pytorch_model.bin")


@dataclass(frozen=True)
class WeightsEntry:
    """One row of `clarity weights list`: a model or extra, its size, and what is wrong with it."""

    kind: str
    #: The model id, or the path relative to the root.
    name: str
    path: Path
    size_bytes: int
    #: None when usable; else what is wrong and, where possible, what to do.
    problem: str | None = None
    #: Extra facts: "default", "tiny test model", "not inspected (pickle file)".
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


def inspect_weights(catalogue: Catalogue, load: bool = False) -> list[WeightsEntry]:
    """Every model and extra in `catalogue` with its status: cheap checks, or real loading (on the CPU) when `load`."""
    entries = [_inspect_model(catalogue, model_id, load) for model_id in catalogue.models]
    if not catalogue.single_model:
        for kind in ("controlnet", "vae"):
            path = _part_location(catalogue.root / kind)
            if path.exists():
                entries.append(_entry(catalogue.root, kind, path, _part_problem(kind, path), notes=("shared",)))
    checks: dict[str, Callable[[Path, bool], tuple[str | None, tuple[str, ...]]]] = {
        "lora": _lora_problem, "embedding": _tensor_file_problem, "upscaler": _tensor_file_problem,
    }
    for kind, folder in (("lora", catalogue.loras), ("embedding", catalogue.embeddings),
                         ("upscaler", catalogue.upscalers)):
        for path in sorted(folder.iterdir()) if folder else []:
            if path.is_file() and not path.name.startswith("."):
                problem, notes = checks[kind](path, load)
                entries.append(_entry(catalogue.root, kind, path, problem, notes))
    if catalogue.safety_checker:
        entries.append(_entry(catalogue.root, "safety checker", catalogue.safety_checker,
                              _part_problem("safety_checker", catalogue.safety_checker)))
    return entries


def _entry(root: Path, kind: str, path: Path, problem: str | None, notes: tuple[str, ...] = ()) -> WeightsEntry:
    name = str(path.relative_to(root)) if path != root and path.is_relative_to(root) else str(path)
    return WeightsEntry(kind, name, path, _size(path), problem, notes)


def _inspect_model(catalogue: Catalogue, model_id: str, load: bool) -> WeightsEntry:
    from clarity.models.loading import load_components

    source = catalogue.models[model_id]
    notes = ("default",) if model_id == catalogue.default_model else ()
    if catalogue.is_tiny(model_id):
        notes += ("tiny test model",)
    problem = _model_problem(source)
    if problem is None and load:
        try:
            components = load_components(source, device="cpu")
            del components
            gc.collect()  # one model at a time: a large catalogue must not pile up in memory
        except WeightsError as error:
            problem = str(error)
    size = _size(source.base) + sum(_size(p) for p in (source.controlnet, source.vae)
                                    if p is not None and not p.is_relative_to(source.base))
    return WeightsEntry("model", model_id, source.base, size, problem, notes)


def _model_problem(source: ModelSource) -> str | None:
    from clarity.models.loading import check_source

    try:
        # The loader's own cheap check: parts present, and single files' headers (their key names).
        check_source(source)
    except WeightsError as error:
        return str(error)
    parts = {"unet": source.base / "unet", "text_encoder": source.base / "text_encoder",
             "controlnet": source.controlnet_path, "vae": source.vae_path}
    if source.base.is_file():
        # A single file carries its own UNet, text encoder and VAE; only overrides are separate parts.
        parts = {"controlnet": source.controlnet_path, **({"vae": source.vae} if source.vae is not None else {})}
    # Folder parts: their configs and weight headers (check_source only sees that they exist).
    problems = [_part_problem(kind, path) for kind, path in parts.items() if path.is_dir()]
    if source.base.is_dir():
        problems += [_tokenizer_problem(source.base / "tokenizer"), _json_problem(source.base / "scheduler"
                                                                                  / "scheduler_config.json")]
    return "; ".join(p for p in problems if p) or None


def _part_problem(kind: str, path: Path) -> str | None:
    """What is wrong with a part (a diffusers folder or one checkpoint file), from its config and header."""
    expected = EXPECTED_TENSORS[kind]
    if path.is_file():
        if path.suffix != ".safetensors":
            return None  # a pickle checkpoint: only loading it can tell (not inspected)
        return _safetensors_problem(path, expected, f"a {kind}")
    if not path.is_dir():
        return f"{path} is missing"
    problem = _json_problem(path / "config.json")
    if problem:
        return problem
    weights = next((path / name for name in PART_WEIGHT_FILES if (path / name).exists()), None)
    if weights is None:
        return f"{path}/ has no weights file (expected one of {', '.join(PART_WEIGHT_FILES[:2])})"
    if weights.name.endswith(".index.json"):
        try:
            keys = list(json.loads(weights.read_text())["weight_map"])
        except (OSError, ValueError, KeyError) as error:
            return f"{weights} is not a readable shard index: {error}"
        return _missing_tensor_problem(weights, keys, expected, f"a {kind}")
    if weights.suffix == ".safetensors":
        return _safetensors_problem(weights, expected, f"a {kind}")
    return None


def _tokenizer_problem(folder: Path) -> str | None:
    if (folder / "tokenizer.json").exists() or all((folder / n).exists() for n in ("vocab.json", "merges.txt")):
        return None
    return f"{folder}/ needs tokenizer.json, or vocab.json and merges.txt"


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except OSError:
        return f"{path} is missing"
    except ValueError as error:
        return f"{path} is not valid JSON: {error}"
    return None


def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a safetensors header, without reading any tensor."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return list(handle.keys())


def _safetensors_problem(path: Path, expected: tuple[str, ...], what: str) -> str | None:
    try:
        keys = _safetensors_keys(path)
    except Exception as error:  # noqa: BLE001 - any failure to parse the header means a bad file
        return f"{path} is not a readable safetensors file: {error}"
    return _missing_tensor_problem(path, keys, expected, what)


def _missing_tensor_problem(path: Path, keys: list[str], expected: tuple[str, ...], what: str) -> str | None:
    if any(key.endswith(suffix) for key in keys for suffix in expected):
        return None
    return f"{path} does not look like {what} (no tensor named like {' or '.join(expected)})"


def _lora_problem(path: Path, load: bool) -> tuple[str | None, tuple[str, ...]]:
    problem, notes = _tensor_file_problem(path, load)
    if problem is None and path.suffix == ".safetensors" and not any("lora" in k.lower()
                                                                     for k in _safetensors_keys(path)):
        problem = f"{path} has no LoRA tensors (no tensor name contains 'lora')"
    return problem, notes


def _tensor_file_problem(path: Path, load: bool) -> tuple[str | None, tuple[str, ...]]:
    """A file of tensors: a readable safetensors header with at least one tensor; pickles only when loading."""
    if path.suffix == ".safetensors":
        try:
            keys = _safetensors_keys(path)
            if load:
                from safetensors.torch import load_file

                load_file(path)
        except Exception as error:  # noqa: BLE001 - any failure to read it means a bad file
            return f"{path} is not a readable safetensors file: {error}", ()
        return (None if keys else f"{path} holds no tensors"), ()
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        if not load:
            return None, ("not inspected (pickle file; use --check)",)
        import torch

        try:
            # weights_only: tensors and plain containers only, so a hostile pickle cannot run code.
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure to load it means a bad or unsafe file
            return f"{path} could not be loaded as plain tensors: {error}", ()
        return None, ()
    return f"{path}: unknown file type {path.suffix or '(none)'}", ()


def _size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    # followlinks: a root may link model folders in (as the tests do) rather than copy them.
    return sum((Path(folder) / name).stat().st_size
               for folder, _, names in os.walk(path, followlinks=True) for name in names)
