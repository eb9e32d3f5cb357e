"""`Upscaler`: the public engine. Turns an image and `UpscaleParams` into upscaled images.

It owns what spans passes: decoding the input, splitting off alpha and grayscale, planning
chained passes of at most 2x, pre-upscaling before each pass, seeds and creativity per pass,
variants, progress and statistics. One pass of diffusion is `TiledUpscalePipeline`'s job.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from clarity.engine.acceleration import (
    AccelerationReport,
    SpeedOptions,
    apply_speed_options,
    resolve_device,
    resolve_dtype,
)
from clarity.engine.images import keep_mask, pil_to_tensor, shrink_to, tensor_to_pil
from clarity.engine.memory import with_memory_retries
from clarity.engine.pipeline import PassSettings, TiledUpscalePipeline
from clarity.engine.postprocess import color_fix, sharpen
from clarity.engine.preupscale import PreUpscaler, PreUpscalerRegistry, lanczos
from clarity.engine.preview import StepPreview
from clarity.engine.results import ProgressCallback, ProgressEvent, UpscaleResult, UpscaleStats
from clarity.engine.safety import SafetyChecker, is_installed, not_installed
from clarity.engine.seamless import crossfade_borders, filter_periodic, resize_periodic, seam_axes, snap_to_latent_grid
from clarity.errors import ContentPolicyError, ParamError
from clarity.imageio import (
    DEFAULT_MAX_OUTPUT_PIXELS,
    ImageSource,
    join_from_model,
    load_image,
    output_size,
    split_for_model,
)
from clarity.params import UpscaleParams

if TYPE_CHECKING:
    from clarity.models.loading import ModelSource

logger = logging.getLogger(__name__)

#: Largest factor of a single pass; larger scale factors chain passes (the original's scheme).
MAX_PASS_FACTOR = 2.0
#: Logged, with the model's name, whenever an `Upscaler` is made for the tiny test model (see
#: clarity/testing/tiny.py), so that nobody mistakes its outputs for what a real model gives.
TINY_MODEL_WARNING = "model %s is the tiny test model: its outputs have no meaningful detail"
#: Logged likewise for the full-size random model (see clarity/testing/random_sd15.py): it has real
#: SD1.5 sizes and speed, so it serves benchmarks, but its weights are random.
RANDOM_MODEL_WARNING = "model %s is a full-size random model: its outputs have no meaningful detail (for benchmarks)"


def plan_passes(scale_factor: float) -> list[float]:
    """Per-pass factors of at most 2 whose product is `scale_factor`: 4 -> [2, 2], 3 -> [2, 1.5]."""
    factors = []
    remaining = scale_factor
    while remaining > MAX_PASS_FACTOR * (1 + 1e-9):
        factors.append(MAX_PASS_FACTOR)
        remaining /= MAX_PASS_FACTOR
    return [*factors, remaining]


def pass_targets(size: tuple[int, int], params: UpscaleParams) -> list[tuple[int, int]]:
    """The output size of each chained pass over an input of `size`: the cumulative scales of
    `plan_passes`, the last one exactly the requested size whatever rounding came before (with
    `pattern`, sides in whole latent pixels)."""
    factors = plan_passes(params.scale_factor)
    targets = []
    cumulative = 1.0
    for index, factor in enumerate(factors):
        cumulative *= factor
        target = output_size(size, params.scale_factor if index == len(factors) - 1 else cumulative)
        targets.append(snap_to_latent_grid(target) if params.pattern else target)
    return targets


def pass_strength(params: UpscaleParams, pass_index: int) -> float:
    """Pass k runs at creativity x multistep_factor^k, capped at 1."""
    return min(1.0, params.creativity * params.multistep_factor**pass_index)


class Upscaler:
    """Creative upscaling with SD1.5 + ControlNet-tile over latent tiles.

    Build it with `Upscaler.from_pretrained(folder)`, or pass a ready pipeline to the
    constructor (components are never loaded behind the caller's back). `<lora:name:weight>`
    tags and embedding names in prompts are looked up in the pipeline's `lora_dir` and
    `embeddings_dir`.
    """

    def __init__(
        self,
        pipeline: TiledUpscalePipeline,
        name: str = "clarity-upscaler",
        tiny_model: bool = False,
        random_model: bool = False,
        max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
        upscalers_dir: Path | None = None,
        safety_checker_dir: Path | None = None,
        acceleration: AccelerationReport | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.name = name
        self.tiny_model = tiny_model
        if tiny_model:
            logger.warning(TINY_MODEL_WARNING, name)
        if random_model:
            logger.warning(RANDOM_MODEL_WARNING, name)
        self.max_output_pixels = max_output_pixels
        #: `params.upscaler` names: lanczos, or model files in `upscalers_dir` (loaded on first use).
        self.pre_upscalers = PreUpscalerRegistry(upscalers_dir, device=pipeline.device)
        self.safety_checker_dir = Path(safety_checker_dir) if safety_checker_dir is not None else None
        self._safety_checker: SafetyChecker | None = None
        self.acceleration = acceleration

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | ModelSource,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
        lora_dir: Path | None = None,
        embeddings_dir: Path | None = None,
        speed: SpeedOptions | None = None,
        upscalers_dir: str | Path | None = None,
        safety_checker_dir: str | Path | None = None,
        name: str = "clarity-upscaler",
        cpu_workers: int = 1,
    ) -> Upscaler:
        """Load a model folder or `ModelSource` (see weights/README.md) onto `device` (default: CUDA if present).

        `speed` sets dtype, attention, memory layout, compilation and offloading (see
        engine/acceleration.py); `dtype`, when given, overrides `speed.dtype`. LoRAs and
        embeddings named in prompts are loaded from `lora_dir` and `embeddings_dir` when a prompt
        first uses them; `upscalers_dir` holds the ESRGAN-family models `params.upscaler` may
        name, `safety_checker_dir` the safety checker `params.enable_safety_checker` uses. `name`
        is the model id reported in `stats.model`. `cpu_workers` is how many processes of this
        machine upscale on its CPUs at once (`speed.threads` auto divides the CPUs among them).
        """
        from clarity.models.loading import load_components

        speed = speed or SpeedOptions()
        device = resolve_device(device)
        dtype = dtype or resolve_dtype(speed, device)
        parts = load_components(path, device=device, dtype=dtype)
        pipeline = TiledUpscalePipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            controlnet=parts.controlnet,
            scheduler_config=parts.scheduler_config,
            lora_dir=lora_dir,
            embeddings_dir=embeddings_dir,
        )
        acceleration = apply_speed_options(pipeline, speed, device, cpu_workers)
        return cls(
            pipeline, name=name, tiny_model=parts.is_tiny, random_model=parts.is_random,
            max_output_pixels=max_output_pixels,
            upscalers_dir=Path(upscalers_dir) if upscalers_dir is not None else None,
            safety_checker_dir=Path(safety_checker_dir) if safety_checker_dir is not None else None,
            acceleration=acceleration,
        )

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    def upscale(
        self,
        image: ImageSource,
        params: UpscaleParams | None = None,
        *,
        num_images: int = 1,
        mask: ImageSource | None = None,
        progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> UpscaleResult:
        """Upscale `image` by `params.scale_factor`, adding detail.

        `overrides` change single fields of `params` (e.g. `creativity=0.5`). `num_images`
        variants use seeds seed, seed+1, ...; with `seed=None` a random seed is drawn and
        reported in `stats.seeds`. `mask` (same aspect ratio as `image`) marks what to keep:
        where it is white, or opaque if it has an alpha channel, the output is the plain
        pre-upscaled input; elsewhere the upscale adds detail, with a soft edge between.
        `progress` gets a `ProgressEvent` at the start of every pass and after every denoising step (with
        a cheap `preview()` of the work so far); an exception it raises stops the work and propagates (to cancel).

        When the device runs out of memory, the variant is retried with half the tile batch,
        then half the VAE tile size, and each retry is logged and listed in `stats.retries`.
        `params.upscaler` picks the pre-upscaler (lanczos or a model in the upscalers folder).
        With `params.enable_safety_checker`, every output is checked and a flagged one raises
        `ContentPolicyError`. Raises `ParamError` naming the field for invalid input.
        """
        params = params or UpscaleParams()
        if overrides:
            params = params.replace(**overrides)
        _check_num_images(num_images)
        started = time.perf_counter()
        stats = self._new_stats(params)

        # 1. Prepare the input (alpha and grayscale are set aside, put back at the end); check the output size.
        source = split_for_model(load_image(image))
        rgb = _prepare_rgb(source.rgb, params, stats)
        size = self._checked_output_size(rgb.size, params.scale_factor)

        # 2. Check the rest before any work: a wrong name or a missing checker must not cost minutes.
        self.pipeline.check_prompt(params.prompt, params.negative_prompt)
        pre_upscaler = self.pre_upscalers.get(params.upscaler)
        safety_checker = self.safety_checker() if params.enable_safety_checker else None
        kept = self._kept_original(mask, source.rgb.size, rgb, size, pre_upscaler, params.pattern)

        # 3. Upscale each variant: chained passes (retried while memory runs out), sharpening, the kept original.
        base_seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        images = []
        for variant in range(num_images):
            seed = base_seed + variant
            stats.seeds.append(seed)
            run = partial(self._upscale_rgb, rgb, seed=seed, variant=variant, variants=num_images,
                          progress=progress, stats=stats, pre_upscaler=pre_upscaler)
            result = with_memory_retries(run, params, partial(_record_retry, stats, variant, len(stats.passes)))
            images.append(join_from_model(_finish(result, params, kept), source))

        # 4. Check the outputs.
        if safety_checker is not None:
            _refuse_flagged(safety_checker.flagged(images), stats.seeds)
        stats.seconds = time.perf_counter() - started
        return UpscaleResult(images=images, stats=stats)

    def _new_stats(self, params: UpscaleParams) -> UpscaleStats:
        """Statistics of an upscale with `params` on this model, before any work."""
        return UpscaleStats(
            model=self.name, tiny_model=self.tiny_model, device=str(self.device), pre_upscaler=params.upscaler,
            acceleration=asdict(self.acceleration) if self.acceleration is not None else {},
        )

    def _checked_output_size(self, input_size: tuple[int, int], scale_factor: float) -> tuple[int, int]:
        """The output size for `input_size`; `ParamError` when it is over `max_output_pixels`."""
        width, height = output_size(input_size, scale_factor)
        if width * height > self.max_output_pixels:
            raise ParamError(
                "scale_factor",
                f"the output would be {width}x{height} = {width * height / 1e6:.1f} MP; the limit here is"
                f" {self.max_output_pixels / 1e6:.1f} MP (max_output_pixels)",
            )
        return width, height

    def _kept_original(
        self,
        mask: ImageSource | None,
        input_size: tuple[int, int],
        rgb: Image.Image,
        size: tuple[int, int],
        pre_upscaler: PreUpscaler,
        wrap: bool,
    ) -> _KeptOriginal | None:
        """What `mask` keeps of `rgb` in an output of `size`: its plain pre-upscaled version (None without a mask).

        `mask` must have the shape of the image as sent (`input_size`), not of `rgb`: `downscaling`
        rounds the sides of `rgb`, which shifts the aspect ratio of a small or thin image.
        """
        if mask is None:
            return None
        keep = keep_mask(load_image(mask, param="mask"), input_size, size)
        return _KeptOriginal(image=self._pre_upscale(pre_upscaler, rgb, size, wrap), mask=keep)

    def safety_checker(self) -> SafetyChecker:
        """The safety checker, loaded on first use; `ParamError` saying how to install it if it is not."""
        if self._safety_checker is None:
            if not is_installed(self.safety_checker_dir):
                raise not_installed(self.safety_checker_dir)
            self._safety_checker = SafetyChecker.load(self.safety_checker_dir, device=self.device)
        return self._safety_checker

    def _upscale_rgb(
        self,
        rgb: Image.Image,
        params: UpscaleParams,
        seed: int,
        variant: int,
        variants: int,
        progress: ProgressCallback | None,
        stats: UpscaleStats,
        pre_upscaler: PreUpscaler,
    ) -> Image.Image:
        """Run the chained passes for one variant."""
        original_size = rgb.size
        targets = pass_targets(original_size, params)
        for index, target in enumerate(targets):
            started = time.perf_counter()
            pre_upscaled = self._pre_upscale(pre_upscaler, rgb, target, params.pattern)
            preupscale_seconds = time.perf_counter() - started

            settings = self._pass_settings(params, pass_index=index, seed=seed + index)

            def on_step(step: int, steps: int, preview: StepPreview | None, index: int = index) -> None:
                if progress is not None:
                    progress(ProgressEvent(variant, variants, index, len(targets), step, steps, preview))

            if progress is not None:
                progress(ProgressEvent(variant, variants, index, len(targets), 0, 0))
            reference = pil_to_tensor(pre_upscaled)
            result, pass_stats = self.pipeline(reference, settings, on_step=on_step)
            if not torch.isfinite(result).all():
                # Written out, NaNs would become a black or garbled image that looks like a result.
                speed = self.acceleration
                dtypes = f" (models in {speed.dtype}, VAE in {speed.vae_dtype})" if speed is not None else ""
                raise RuntimeError(
                    f"pass {index + 1} produced NaN or infinite pixels{dtypes}; retry with --dtype fp32"
                    " --vae-dtype fp32"
                )
            pass_stats.input_size = rgb.size
            pass_stats.seconds = {"pre_upscale": preupscale_seconds, **pass_stats.seconds}
            if pass_stats.denoising_steps > 0:
                started = time.perf_counter()
                result = color_fix(result, reference, params.color_fix, wrap=params.pattern)
                pass_stats.seconds["color_fix"] = time.perf_counter() - started
            stats.passes.append(pass_stats)
            # Whole-image buffers go as soon as they are spent: at 100 MP each float32 one is 1.2 GB.
            del reference, pre_upscaled
            rgb = tensor_to_pil(result)
            del result
        final_size = output_size(original_size, params.scale_factor)
        if rgb.size != final_size:  # `pattern` diffused at sides rounded to multiples of 8
            rgb = resize_periodic(lanczos, rgb, final_size)
        return rgb

    @staticmethod
    def _pre_upscale(pre_upscaler: PreUpscaler, rgb: Image.Image, size: tuple[int, int], wrap: bool) -> Image.Image:
        return resize_periodic(pre_upscaler, rgb, size) if wrap else pre_upscaler(rgb, size)

    @staticmethod
    def _pass_settings(params: UpscaleParams, pass_index: int, seed: int) -> PassSettings:
        """Pass k runs at creativity x multistep_factor^k (capped at 1) with seed + k."""
        return PassSettings(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            strength=pass_strength(params, pass_index),
            guidance_scale=params.dynamic,
            num_inference_steps=params.num_inference_steps,
            controlnet_scale=params.resemblance,
            controlnet_decay=params.controlnet_decay,
            scheduler=params.scheduler,
            max_tile_height=params.tiling_height,
            max_tile_width=params.tiling_width,
            min_tile_overlap=params.tile_overlap,
            tile_batch_size=params.tile_batch_size,
            seed=seed,
            vae_tile_size=params.vae_tile_size,
            wrap=params.pattern,
        )


def _check_num_images(num_images: int) -> None:
    if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= 16:
        raise ParamError("num_images", f"must be an integer from 1 to 16, got {num_images!r}")


def _prepare_rgb(rgb: Image.Image, params: UpscaleParams, stats: UpscaleStats) -> Image.Image:
    """The input's RGB as the passes start from it: shrunk by `downscaling`, borders cross-faded by `pattern`."""
    if params.downscaling:
        rgb = shrink_to(rgb, params.downscaling_resolution)
    if params.pattern:
        stats.pattern_crossfaded = seam_axes(rgb)
        rgb = crossfade_borders(rgb, stats.pattern_crossfaded)
    return rgb


@dataclass(frozen=True)
class _KeptOriginal:
    """What a `mask` keeps: the plain pre-upscaled input, shown where `mask` (at output size) is white."""

    image: Image.Image
    mask: Image.Image


def _finish(result: Image.Image, params: UpscaleParams, kept: _KeptOriginal | None) -> Image.Image:
    """A variant's last steps at output size: sharpening (wrapping around with `pattern`), then the kept original."""
    if params.pattern:
        result = filter_periodic(partial(sharpen, amount=params.sharpen), result, reach=1)
    else:
        result = sharpen(result, params.sharpen)
    return Image.composite(kept.image, result, kept.mask) if kept is not None else result


def _refuse_flagged(flags: list[bool], seeds: list[int]) -> None:
    """`ContentPolicyError` when the safety checker flagged any output (`flags`, one per variant)."""
    flagged = [index for index, flag in enumerate(flags) if flag]
    if flagged:
        raise ContentPolicyError(
            f"the safety checker flagged output(s) {flagged} (seeds {[seeds[i] for i in flagged]}); nothing is returned"
        )


def _record_retry(stats: UpscaleStats, variant: int, passes_before: int, note: str) -> None:
    """Log and list a retry of `variant` after running out of memory; drop the failed attempt's passes."""
    del stats.passes[passes_before:]
    logger.warning("variant %d: %s", variant, note)
    stats.retries.append(note)
