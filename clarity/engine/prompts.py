"""Prompts as users write them in AUTOMATIC1111 and the original Clarity Upscaler, turned into CLIP embeddings.

The syntax (weighting, `BREAK`, `<lora:...>` tags) is read by prompt_syntax.py; this module
loads what the prompts name and encodes them:

- **Long prompts**: encoded in 75-token windows (each wrapped in start/end tokens, so 77) whose
  embeddings are concatenated, as A1111 and compel do; the shorter of prompt and negative
  prompt is padded with empty-prompt windows so both have the same length.
- **LoRAs**: a `<lora:name:...>` tag loads `<lora_dir>/<name>.safetensors` (kohya/A1111 or
  diffusers format) through diffusers' LoRA loader, once; each request sets its own weights,
  and a request without tags runs with every LoRA disabled. A LoRA changes the model, which
  both guidance branches share, so a tag takes effect wherever it is written; it is removed
  from the text before encoding.
- **Textual-inversion embeddings**: a word equal to the stem of a `.safetensors` (`emb_params`)
  or A1111 `.pt` (`string_to_param`) file in `embeddings_dir` is that embedding, loaded once
  through diffusers' `load_textual_inversion`; multi-vector embeddings take several tokens.

The weighted, windowed encoding itself is compel's (`EmbeddingsProvider`): weights above 1
move a token's embedding away from the empty prompt's, weights below 1 blend towards the
prompt without that token. That is compel's arithmetic, not A1111's multiply-then-restore-
the-mean, so equal weights are of similar but not identical strength in the two programs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from clarity.engine.prompt_syntax import Fragments, LoraTag, parse_weighting, split_lora_tags
from clarity.errors import ParamError, WeightsError

if TYPE_CHECKING:
    from compel import Compel
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

#: File types read as textual-inversion embeddings, preferred first when a stem has both.
EMBEDDING_SUFFIXES = (".safetensors", ".pt")


class PromptPipeline(Protocol):
    """What `PromptEncoder` uses of a pipeline: the text models, the UNet's dtype and device, diffusers' loaders.

    `TiledUpscalePipeline` is one: the LoRA methods come from diffusers'
    `StableDiffusionLoraLoaderMixin`, `load_textual_inversion` and `maybe_convert_prompt` from
    its `TextualInversionLoaderMixin`. Only the arguments the encoder passes are declared.
    """

    @property
    def tokenizer(self) -> CLIPTokenizer: ...

    @property
    def text_encoder(self) -> CLIPTextModel: ...

    @property
    def unet(self) -> UNet2DConditionModel:
        """The denoiser the embeddings are for: they are cast to its dtype."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the models run (the embeddings are moved there)."""
        ...

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: dict[str, torch.Tensor], adapter_name: str
    ) -> None: ...

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Adapter names each model holds, by model name ("unet", "text_encoder")."""
        ...

    def set_adapters(self, adapter_names: list[str], adapter_weights: list[dict[str, float]]) -> None: ...

    def enable_lora(self) -> None: ...

    def disable_lora(self) -> None: ...

    def load_textual_inversion(self, pretrained_model_name_or_path: str, token: str) -> None: ...

    def maybe_convert_prompt(self, prompt: str, tokenizer: CLIPTokenizer) -> str:
        """`prompt` with each multi-vector embedding token expanded to all its tokens."""
        ...


@functools.cache
def _import_compel():
    """The `compel` module, imported (once) without the log noise it makes.

    Importing compel imports diffusers' SDXL/Flux pipelines, and transformers then warns that
    their image processors would prefer torchvision; none of them is used here.
    """
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        import compel
    finally:
        transformers_logging.set_verbosity(verbosity)
    return compel


def _files_by_stem(folder: Path | None, suffixes: Iterable[str]) -> dict[str, Path]:
    """{stem: file} for the files directly in `folder` with one of `suffixes` (earlier ones win)."""
    if folder is None or not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for suffix in reversed(tuple(suffixes)):
        found.update({path.stem: path for path in folder.glob(f"*{suffix}") if path.is_file()})
    return found


def _available(names: Iterable[str]) -> str:
    names = sorted(names)
    if not names:
        return "none"
    shown = ", ".join(names[:30])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 30 else "")


@dataclass
class EncodedPrompt:
    """CLIP embeddings for one pass and what went into them."""

    #: (1, 77 x windows, width), or (2, ...) as [negative, positive] when guidance is on.
    embeds: torch.Tensor
    #: 77-token windows per prompt (more than 1 when a prompt is longer than 75 tokens).
    windows: int
    #: LoRAs applied: name -> (text encoder weight, UNet weight).
    loras: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Textual-inversion embeddings used, by name.
    embeddings: list[str] = field(default_factory=list)


class PromptEncoder:
    """Turns prompt text into CLIP embeddings, loading the LoRAs and embeddings it names.

    `pipeline` provides the tokenizer, text encoder and UNet and diffusers' LoRA and
    textual-inversion loaders (see `PromptPipeline`). LoRAs and embeddings
    stay loaded once used; a LoRA file is read once per process (restart to pick up a changed
    file).
    """

    def __init__(
        self, pipeline: PromptPipeline, lora_dir: Path | None = None, embeddings_dir: Path | None = None
    ) -> None:
        self.pipeline = pipeline
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
        #: LoRA name -> peft adapter name (peft keys cannot hold the dots file names may have).
        self._adapters: dict[str, str] = {}
        self._load_attempts = 0
        #: LoRA settings the models currently run with; () = LoRAs disabled, None = unknown.
        self._active_loras: tuple | None = ()
        #: Embedding name -> the token it was added to the tokenizer as.
        self._embedding_tokens: dict[str, str] = {}
        self._compel: Compel | None = None
        self._compel_loras: tuple | None = ()

    def check(self, prompt: str, negative_prompt: str) -> None:
        """Raise the `ParamError` that `encode` would (syntax, unknown LoRA names), loading nothing.

        Lets a bad prompt fail before minutes of work, and also when no pass encodes it
        (creativity 0).
        """
        prompt, negative_prompt, _ = self._split_loras(prompt, negative_prompt)
        parse_weighting(prompt, "prompt")
        parse_weighting(negative_prompt, "negative_prompt")

    def encode(self, prompt: str, negative_prompt: str, do_cfg: bool) -> EncodedPrompt:
        """Apply the prompts' LoRA tags to the models and encode [negative, positive] (or positive)."""
        prompt, negative_prompt, loras = self._split_loras(prompt, negative_prompt)
        self._apply_loras(loras)

        texts = {"negative_prompt": negative_prompt, "prompt": prompt} if do_cfg else {"prompt": prompt}
        used_embeddings: list[str] = []
        conditionings = []
        compel = self._compel_for_current_models()
        embedding_files = _files_by_stem(self.embeddings_dir, EMBEDDING_SUFFIXES)
        for param, text in texts.items():
            segments = parse_weighting(text, param)
            if embedding_files:
                segments = [self._with_embedding_tokens(s, embedding_files, used_embeddings) for s in segments]
            conditionings.append(self._encode_segments(compel, segments))
        conditionings = compel.pad_conditioning_tensors_to_same_length(conditionings)
        embeds = torch.cat(conditionings).to(dtype=self.pipeline.unet.dtype, device=self.pipeline.device)
        return EncodedPrompt(
            embeds=embeds,
            windows=embeds.shape[1] // self.pipeline.tokenizer.model_max_length,
            loras={tag.name: (tag.text_encoder_weight, tag.unet_weight) for tag in loras.values()},
            embeddings=used_embeddings,
        )

    # --- encoding -------------------------------------------------------------------------

    def _compel_for_current_models(self) -> Compel:
        """A compel instance for the text encoder as it is now.

        compel caches the empty prompt's embedding, which a LoRA on the text encoder changes,
        so a new instance is made whenever the LoRA settings change.
        """
        compel = _import_compel()
        if self._compel is None or self._compel_loras != self._active_loras:
            self._compel = compel.Compel(
                tokenizer=self.pipeline.tokenizer,
                text_encoder=self.pipeline.text_encoder,
                truncate_long_prompts=False,
                # Windows end at the last comma or full stop that fits, like A1111's, else at a word.
                split_long_text_mode=compel.SplitLongTextMode.PHRASES,
            )
            self._compel_loras = self._active_loras
        return self._compel

    @staticmethod
    def _encode_segments(compel: Compel, segments: list[Fragments]) -> torch.Tensor:
        """(1, 77 x windows, width): each `BREAK` segment starts its own windows."""
        flattened_prompt = _import_compel().prompt_parser.FlattenedPrompt
        parts = []
        for segment in segments:
            # A fragment with no tokens (only spaces, say) has nothing to weight, and compel
            # fails to locate one whose weight is below 1.
            token_ids = compel.conditioning_provider.get_token_ids(
                [text for text, _ in segment], include_start_and_end_markers=False
            )
            segment = [(text, weight if ids else 1.0) for (text, weight), ids in zip(segment, token_ids, strict=True)]
            (conditioning, _tokens), _options = compel.build_conditioning_tensor_for_prompt_object(
                flattened_prompt(segment)
            )
            parts.append(conditioning)
        return torch.cat(parts, dim=1)

    # --- LoRAs ----------------------------------------------------------------------------

    def _split_loras(self, prompt: str, negative_prompt: str) -> tuple[str, str, dict[str, LoraTag]]:
        """Both prompts without their `<lora:...>` tags, and the LoRAs those name (checked to exist)."""
        prompt, tags = split_lora_tags(prompt, "prompt")
        negative_prompt, negative_tags = split_lora_tags(negative_prompt, "negative_prompt")
        loras = self._resolve_loras(negative_tags, "negative_prompt", self._resolve_loras(tags, "prompt", {}))
        return prompt, negative_prompt, loras

    def _resolve_loras(self, tags: list[LoraTag], param: str, resolved: dict[str, LoraTag]) -> dict[str, LoraTag]:
        """Check every tag names a LoRA file; `resolved` plus these tags, by name."""
        if not tags:
            return resolved
        available = _files_by_stem(self.lora_dir, [".safetensors"])
        resolved = dict(resolved)
        for tag in tags:
            # Only names of files directly in the folder are accepted, so `../x` finds nothing.
            if tag.name not in available:
                where = f"in {self.lora_dir}" if self.lora_dir is not None else "(no LoRA folder is configured)"
                raise ParamError(param, f"no LoRA named {tag.name!r} {where}; available: {_available(available)}")
            if tag.name in resolved and resolved[tag.name] != tag:
                raise ParamError(param, f"LoRA {tag.name!r} is given twice with different weights")
            resolved[tag.name] = tag
        return resolved

    def _apply_loras(self, loras: dict[str, LoraTag]) -> None:
        """Run the models with exactly these LoRAs at these weights (none: all disabled)."""
        settings = tuple(sorted(loras.values(), key=lambda tag: tag.name))
        if settings == self._active_loras:
            return
        if not settings:
            self.pipeline.disable_lora()
            self._active_loras = ()
            return
        # Until the new settings are in place the models' state is unknown (a load can fail
        # half-way), so the next request sets its own whatever this one did.
        self._active_loras = None
        for tag in settings:
            if tag.name not in self._adapters:
                self._load_lora(tag.name)
        held = self.pipeline.get_list_adapters()  # model -> adapter names it holds
        names, weights = [], []
        for tag in settings:
            adapter = self._adapters[tag.name]
            per_model = {"text_encoder": tag.text_encoder_weight, "unet": tag.unet_weight}
            names.append(adapter)
            # Only the models this LoRA trained (a LoRA may leave the text encoder alone).
            weights.append({model: w for model, w in per_model.items() if adapter in held.get(model, [])})
        self.pipeline.enable_lora()
        self.pipeline.set_adapters(names, weights)
        self._active_loras = settings

    def _load_lora(self, name: str) -> None:
        from safetensors.torch import load_file

        path = self.lora_dir / f"{name}.safetensors"
        # A fresh adapter name per attempt: a failed load may leave its name behind in the models.
        self._load_attempts += 1
        adapter = f"lora_{self._load_attempts}"
        _load_or_explain(
            lambda: self.pipeline.load_lora_weights(load_file(path), adapter_name=adapter), f"the LoRA {path}",
            "It must be an SD1.5 LoRA in kohya/A1111 or diffusers format (.safetensors).",
        )
        self._adapters[name] = adapter

    # --- textual-inversion embeddings -----------------------------------------------------

    def _with_embedding_tokens(self, fragments: Fragments, available: dict[str, Path], used: list[str]) -> Fragments:
        """`fragments` with every embedding name in `available` replaced by its token(s), loading it when new."""
        result = []
        for text, weight in fragments:
            for name in available:
                pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
                if pattern.search(text):
                    token = self._embedding_token(name, available[name])
                    text = pattern.sub(lambda _, token=token: token, text)
                    if name not in used:
                        used.append(name)
            if any(token in text for token in self._embedding_tokens.values()):
                # A multi-vector embedding is several tokens: <name> <name>_1 <name>_2 ...
                text = self.pipeline.maybe_convert_prompt(text, self.pipeline.tokenizer)
            result.append((text, weight))
        return result

    def _embedding_token(self, name: str, path: Path) -> str:
        """The tokenizer token of embedding `name`, loading it on first use.

        The token is `<name>`, not the bare name: tokens added to the tokenizer match anywhere
        in the text, and a bare `bad` would also split `badge`.
        """
        token = self._embedding_tokens.get(name)
        if token is not None:
            return token
        token = f"<{name}>"
        _load_or_explain(
            lambda: self.pipeline.load_textual_inversion(str(path), token=token), f"the embedding {path}",
            "It must be an SD1.5 textual-inversion embedding (.safetensors with emb_params, or an A1111 .pt"
            " with string_to_param).",
        )
        self._embedding_tokens[name] = token
        return token


def _load_or_explain(load: Callable[[], object], what: str, requirement: str) -> None:
    """Run `load()`; any failure is a `WeightsError` naming `what` was loaded and what it must be."""

    try:
        load()
    except Exception as error:  # noqa: BLE001 - any failure here means the file is not usable
        raise WeightsError(f"could not load {what}: {error}. {requirement}") from error
