"""Checking what a weights folder holds, for `clarity weights list`.

`inspect_weights` gives every model and extra of a `Catalogue` with what is wrong with it:
cheaply by default (files present, safetensors headers readable, the tensors each part must
have), or by really loading every model.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clarity.errors import WeightsError
from clarity.models.catalogue import Catalogue, part_location

# clarity.models.loading imports torch, which takes seconds: it is imported where used, so that
# the cheap checks of `clarity weights list` stay fast.
if TYPE_CHECKING:
    from clarity.models.loading import ModelSource


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
    #: Extra facts: "default", "tiny test model", "full-size random model", "not inspected (pickle file)".
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


def inspect_weights(catalogue: Catalogue, load: bool = False) -> list[WeightsEntry]:
    """Every model and extra in `catalogue` with its status: cheap checks, or real loading (on the CPU) when `load`."""
    entries = [_inspect_model(catalogue, model_id, load) for model_id in catalogue.models]
    if not catalogue.single_model:
        for kind in ("controlnet", "vae"):
            path = part_location(catalogue.root / kind)
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
    if catalogue.is_random(model_id):
        notes += ("full-size random model",)
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
