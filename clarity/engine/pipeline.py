"""One upscaling pass: tiled ControlNet-tile img2img with MultiDiffusion, in named steps.

Reads top to bottom like a diffusers pipeline: check inputs, encode prompt, prepare
timesteps, prepare latents, plan tiles, denoise, decode. The one difference from diffusers'
`StableDiffusionControlNetImg2ImgPipeline` is the denoising step: the UNet and ControlNet see
batches of overlapping latent tiles, their noise predictions are blended into one prediction
for the whole latent, and the scheduler steps once over the whole latent. Multistep and SDE
solvers therefore keep one consistent history, and an image that fits in one tile gives
diffusers' result exactly.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from clarity.engine import vae as vae_ops
from clarity.engine.controlnet import residual_scales, scale_residuals
from clarity.engine.preview import StepPreview, step_preview
from clarity.engine.prompts import EncodedPrompt, PromptEncoder
from clarity.engine.schedulers import denoised_estimate, make_scheduler
from clarity.engine.tiling import TilePlan, plan_tiles, tile_weight


@dataclass(frozen=True)
class PassSettings:
    """Everything one pass needs besides the image; `Upscaler` derives it from `UpscaleParams`."""

    prompt: str
    negative_prompt: str
    strength: float
    guidance_scale: float
    num_inference_steps: int
    controlnet_scale: float
    controlnet_decay: float
    scheduler: str
    max_tile_height: int
    max_tile_width: int
    min_tile_overlap: int
    tile_batch_size: int
    seed: int
    vae_tile_size: int | None = None
    #: Treat the image as one tile of a repeating pattern: everything wraps around its edges.
    wrap: bool = False


@dataclass
class PassStats:
    """What one pass did and where its time went."""

    input_size: tuple[int, int]
    output_size: tuple[int, int]
    strength: float
    seed: int
    denoising_steps: int = 0
    tiles: int = 0
    tile_grid: tuple[int, int] = (0, 0)
    tile_size: tuple[int, int] = (0, 0)
    latent_size: tuple[int, int] = (0, 0)
    latent_area_ratio: float = 0.0
    unet_evaluations: int = 0
    vae_tiles: int = 1
    #: 77-token windows the prompt embeddings span (more than 1: a prompt over 75 tokens, kept whole).
    prompt_windows: int = 0
    #: LoRAs applied from <lora:...> tags: name -> (text encoder weight, UNet weight).
    loras: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Textual-inversion embeddings the prompts used, by name.
    embeddings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


#: Called after every denoising step with (steps done, steps in this pass, a preview of the step's
#: estimate or None): see `TiledUpscalePipeline.denoise`.
StepCallback = Callable[[int, int, StepPreview | None], None]


class TiledUpscalePipeline(StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    """SD1.5 + ControlNet-tile img2img over latent tiles. Components are passed in, never loaded here.

    diffusers' LoRA and textual-inversion loaders are mixed in (`load_lora_weights`,
    `set_adapters`, `load_textual_inversion`, ...); prompts name what to load, from
    `lora_dir` and `embeddings_dir` (see `clarity.engine.prompts`).
    """

    #: Read by diffusers' loaders, which undo accelerate device maps; this pipeline uses none.
    hf_device_map = None

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: ControlNetModel,
        scheduler_config: dict,
        lora_dir: Path | None = None,
        embeddings_dir: Path | None = None,
    ) -> None:
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.controlnet = controlnet
        self.scheduler_config = scheduler_config
        #: Set by model CPU offload (engine/acceleration.py), which keeps the weights on the CPU
        #: between calls: the work then happens here, not where the UNet's weights wait.
        self.execution_device: torch.device | None = None
        self.prompts = PromptEncoder(self, lora_dir=lora_dir, embeddings_dir=embeddings_dir)

    @property
    def components(self) -> dict[str, object]:
        """The models by name, as diffusers' loaders expect of a pipeline."""
        return {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "unet": self.unet, "controlnet": self.controlnet}

    @property
    def device(self) -> torch.device:
        return self.execution_device or self.unet.device

    @torch.no_grad()
    def __call__(
        self, image: torch.Tensor, settings: PassSettings, on_step: StepCallback | None = None
    ) -> tuple[torch.Tensor, PassStats]:
        """Denoise `image` (1, 3, H, W in [0, 1], already pre-upscaled to the output size).

        The image is both the img2img start point and the ControlNet-tile condition. Returns
        the result at the same size (float32 in [0, 1], on the CPU) and the pass statistics.
        """
        height, width = image.shape[-2:]
        stats = PassStats(input_size=(width, height), output_size=(width, height),
                          strength=settings.strength, seed=settings.seed)

        # 1. Check inputs
        self.check_inputs(image, settings)

        # 2. Prepare timesteps: img2img runs only the last int(steps x strength) of them.
        scheduler = make_scheduler(settings.scheduler, self.scheduler_config)
        timesteps = self.prepare_timesteps(scheduler, settings.num_inference_steps, settings.strength)
        stats.denoising_steps = len(timesteps) // scheduler.order
        if len(timesteps) == 0:
            # Nothing to denoise: the pre-upscaled image is the answer, bit for bit, rather
            # than a lossy VAE round trip of it.
            return image.float().cpu(), stats

        # 3. Encode prompt
        started = time.perf_counter()
        do_cfg = settings.guidance_scale > 1.0
        encoded = self.encode_prompt(settings.prompt, settings.negative_prompt, do_cfg)
        prompt_embeds = encoded.embeds
        stats.prompt_windows, stats.loras, stats.embeddings = encoded.windows, encoded.loras, encoded.embeddings
        stats.seconds["encode_prompt"] = self.seconds_since(started)

        # 4. Prepare latents: encode the padded image and noise it to the first timestep.
        started = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        padded = pad_to_multiple(image, vae_ops.VAE_SCALE)
        latents = self.prepare_latents(
            padded, scheduler, timesteps[:1], generator, settings.vae_tile_size, settings.wrap
        )
        control_image = padded.to(device=self.device, dtype=self.controlnet.dtype)
        stats.seconds["vae_encode"] = self.seconds_since(started)

        # 5. Plan tiles
        plan = plan_tiles(
            latents.shape[-2], latents.shape[-1],
            settings.max_tile_height, settings.max_tile_width, settings.min_tile_overlap, settings.wrap,
        )
        stats.latent_size = (plan.width, plan.height)
        stats.tiles = len(plan.tiles)
        stats.tile_size = (plan.tile_width, plan.tile_height)
        stats.tile_grid = (len({t.left for t in plan.tiles}), len({t.top for t in plan.tiles}))
        stats.latent_area_ratio = plan.area_ratio

        # 6. Denoise
        started = time.perf_counter()
        latents = self.denoise(
            latents, timesteps, scheduler, generator, plan, prompt_embeds, control_image, settings, stats, on_step
        )
        stats.seconds["denoise"] = self.seconds_since(started)

        # 7. Decode, and crop the padding away.
        started = time.perf_counter()
        result = vae_ops.decode(self.vae, latents, settings.vae_tile_size, settings.wrap)
        result = result[..., :height, :width].cpu()
        # With wrap the decoder sees the latent with a periodic margin on every side.
        margin = 2 * vae_ops.DECODER_CONTEXT if settings.wrap else 0
        vae_plan = vae_ops.tile_plan(latents.shape[-2] + margin, latents.shape[-1] + margin, settings.vae_tile_size)
        stats.vae_tiles = 1 if vae_plan is None else len(vae_plan.tiles)
        stats.seconds["vae_decode"] = self.seconds_since(started)
        return result, stats

    def seconds_since(self, started: float) -> float:
        """Seconds since `started` (`time.perf_counter()`) once the device has done the work queued so far: CUDA
        runs asynchronously, so without the wait a stage's time would show up in the next one's (stats)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def check_inputs(self, image: torch.Tensor, settings: PassSettings) -> None:
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"image must have shape (1, 3, H, W), got {tuple(image.shape)}")
        if min(image.shape[-2:]) < 1:
            raise ValueError(f"image must not be empty, got {tuple(image.shape)}")
        if not 0.0 <= settings.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {settings.strength}")
        if settings.wrap and (image.shape[-2] % vae_ops.VAE_SCALE or image.shape[-1] % vae_ops.VAE_SCALE):
            # Padding would break the period: the latent torus must be the image exactly.
            raise ValueError(f"with wrap, image sides must be multiples of 8, got {tuple(image.shape[-2:])}")

    def prepare_timesteps(self, scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
        """The scheduler's last int(steps x strength) timesteps, as diffusers' img2img picks them."""
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        init_steps = min(int(num_inference_steps * strength), num_inference_steps)
        start = num_inference_steps - init_steps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        return scheduler.timesteps[start * scheduler.order:]

    def encode_prompt(self, prompt: str, negative_prompt: str, do_cfg: bool) -> EncodedPrompt:
        """CLIP embeddings, [negative, positive] stacked when guidance is on, of prompts in A1111 syntax.

        Also applies the prompts' `<lora:...>` tags to the UNet and text encoder for this pass
        (a prompt without tags runs with every LoRA disabled) and loads the embeddings they
        name. Prompts longer than 75 tokens are encoded in windows, never cut.
        """
        return self.prompts.encode(prompt, negative_prompt, do_cfg)

    def check_prompt(self, prompt: str, negative_prompt: str) -> None:
        """Raise the `ParamError` `encode_prompt` would (syntax, unknown LoRA names), loading nothing."""
        self.prompts.check(prompt, negative_prompt)

    def prepare_latents(
        self,
        image: torch.Tensor,
        scheduler,
        first_timestep: torch.Tensor,
        generator: torch.Generator,
        vae_tile_size: int | None = None,
        wrap: bool = False,
    ) -> torch.Tensor:
        """Encode `image` and add noise for `first_timestep`, drawing from `generator` like diffusers."""
        latents = vae_ops.encode(self.vae, image, generator, vae_tile_size, wrap)
        latents = latents.to(device=self.device, dtype=self.unet.dtype)
        noise = randn_tensor(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
        return scheduler.add_noise(latents, noise, first_timestep.repeat(latents.shape[0]))

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        scheduler,
        generator: torch.Generator,
        plan: TilePlan,
        prompt_embeds: torch.Tensor,
        control_image: torch.Tensor,
        settings: PassSettings,
        stats: PassStats,
        on_step: StepCallback | None,
    ) -> torch.Tensor:
        """Step the whole latent through `timesteps`: blended tile predictions, one scheduler step each.

        After every step `on_step` gets the steps done, the steps in the pass and a preview of the
        step's estimate of the finished image (`engine.preview`), valid while `on_step` runs.
        """
        blend_weights = [tile_weight(tile, plan).to(self.device) for tile in plan.tiles]
        scales = residual_scales(
            len(self.controlnet.controlnet_down_blocks) + 1, settings.controlnet_scale, settings.controlnet_decay
        )
        step_kwargs = _generator_kwarg(scheduler, generator)
        for index, t in enumerate(timesteps):
            noise_pred = self.predict_noise(
                latents, t, scheduler, plan, blend_weights, prompt_embeds, control_image, scales, settings, stats
            )
            output = scheduler.step(noise_pred, t, latents, **step_kwargs)
            if on_step is not None and (index + 1) % scheduler.order == 0:
                with step_preview(
                    denoised_estimate(scheduler, output, noise_pred, latents), stats.output_size
                ) as preview:
                    on_step((index + 1) // scheduler.order, stats.denoising_steps, preview)
            latents = output.prev_sample
            # The step's other outputs (its x0 estimate) would otherwise live through the next step's forwards.
            del output
        return latents

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        scheduler,
        plan: TilePlan,
        blend_weights: list[torch.Tensor],
        prompt_embeds: torch.Tensor,
        control_image: torch.Tensor,
        scales: list[float],
        settings: PassSettings,
        stats: PassStats,
    ) -> torch.Tensor:
        """The guided noise prediction for the whole latent, blended from batches of tiles."""
        model_input = scheduler.scale_model_input(latents, t)
        blended = torch.zeros_like(latents, dtype=torch.float32)
        weights = torch.zeros(latents.shape[-2:], dtype=torch.float32, device=latents.device)
        do_cfg = prompt_embeds.shape[0] == 2
        for first in range(0, len(plan.tiles), settings.tile_batch_size):
            batch = plan.tiles[first:first + settings.tile_batch_size]
            tiles = torch.cat([plan.crop(model_input, tile) for tile in batch])
            conditions = torch.cat([plan.crop(control_image, tile, vae_ops.VAE_SCALE) for tile in batch])
            embeds = prompt_embeds.repeat_interleave(len(batch), dim=0)
            if do_cfg:
                # Batch layout [uncond tiles..., cond tiles...], matching the embeddings above.
                tiles, conditions = torch.cat([tiles, tiles]), torch.cat([conditions, conditions])
            down, mid = self.controlnet(
                tiles, t, encoder_hidden_states=embeds, controlnet_cond=conditions,
                conditioning_scale=1.0, return_dict=False,
            )
            down, mid = scale_residuals(down, mid, scales)
            noise = self.unet(
                tiles, t, encoder_hidden_states=embeds,
                down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
            )[0]
            stats.unet_evaluations += noise.shape[0]
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + settings.guidance_scale * (cond - uncond)
            for tile, tile_noise, weight in zip(batch, noise, blend_weights[first:first + len(batch)], strict=True):
                plan.add(blended, tile, tile_noise.float() * weight)
                plan.add(weights, tile, weight)
        return (blended / weights).to(latents.dtype)


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom and right of `image` by mirroring so both sides are multiples of `multiple`.

    Mirroring keeps the padding's content continuous with the image, so the model does not
    react to an artificial edge; images smaller than the padding fall back to repeating edges.
    """
    height, width = image.shape[-2:]
    pad_bottom, pad_right = -height % multiple, -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return image
    mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
    return F.pad(image, (0, pad_right, 0, pad_bottom), mode=mode)


def _generator_kwarg(scheduler, generator: torch.Generator) -> dict:
    """SDE and ancestral samplers draw noise in `step`; pass them our generator so runs repeat."""
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepted else {}
