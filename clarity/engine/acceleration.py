"""Speed options: where and how the models run (device, dtype, attention, memory format, compile, offload).

`SpeedOptions` says what is wanted; `resolve_device` and `resolve_dtype` turn it into a
device and a dtype for loading (refusing what cannot work, with the flag's name), and
`apply_speed_options` sets up the loaded pipeline and returns an `AccelerationReport` of what
is actually in effect, which `Upscaler` puts into every result's stats.

What each option does and why:
- dtype: fp16 (default on CUDA) or bf16 halve the UNet's, ControlNet's and text encoder's
  memory and run on tensor cores. The VAE always stays float32 (models/loading.py loads it so):
  SD1.5's VAE overflows to inf/NaN in float16. `Upscaler` also checks every pass's output
  for NaNs and fails loudly rather than writing a black or garbled image.
- attention: PyTorch's fused `scaled_dot_product_attention` through diffusers'
  `AttnProcessor2_0`, set explicitly on every model so that the report is a fact, not a hope.
- channels_last: NHWC memory layout for the UNet and ControlNet, faster convolutions on
  tensor cores; same results up to float rounding.
- compile: `torch.compile` of the UNet and ControlNet forwards, in place (attributes such as
  `.dtype` stay reachable). The first calls, and calls with a new tile shape, compile.
- cpu_offload: the text encoder, UNet and ControlNet wait on the CPU and move to the device
  when they run (accelerate's `cpu_offload_with_hook` chain, as diffusers'
  `enable_model_cpu_offload`); for GPUs too small to hold everything. The VAE stays on the
  device: it is small, and the tiled VAE calls its encoder and decoder directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from clarity.errors import ParamError
from clarity.options import option

if TYPE_CHECKING:
    from clarity.engine.pipeline import TiledUpscalePipeline

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)


@dataclass(frozen=True)
class SpeedOptions:
    """How the models run. The defaults are safe everywhere; each field is a flag of `upscale` and `serve`."""

    dtype: str = option(
        "auto", "UNet, ControlNet and text encoder dtype: auto = fp16 on CUDA, fp32 on the CPU; fp16 is refused on"
        " the CPU. The VAE always runs in fp32.", choices=DTYPE_CHOICES,
    )
    channels_last: bool = option(
        False, "NHWC memory layout for the UNet and ControlNet (faster convolutions on tensor cores)."
    )
    compile: bool = option(False, "torch.compile the UNet and ControlNet: slow first requests, faster after.")
    cpu_offload: bool = option(
        False, "Keep models on the CPU between their calls, for GPUs too small to hold them all."
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ParamError("dtype", f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {self.dtype!r}")
        if self.compile and self.cpu_offload:
            raise ParamError(
                "compile", "--compile and --cpu-offload do not go together: offloading swaps the module's"
                " forward for a hook that moves weights, which a compiled graph cannot follow; choose one",
            )


@dataclass
class AccelerationReport:
    """What is in effect after `apply_speed_options` (reported in `UpscaleStats.acceleration`)."""

    device: str
    dtype: str
    vae_dtype: str
    #: Attention processor class per model, e.g. {"unet": "AttnProcessor2_0"}.
    attention: dict[str, str] = field(default_factory=dict)
    channels_last: bool = False
    compiled: list[str] = field(default_factory=list)
    cpu_offload: bool = False


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto: `device`, or CUDA if present, else the CPU. Refuses what is not there."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParamError("device", f"--device must be cpu, cuda or cuda:N; got {device!r}") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ParamError("device", f"--device {device}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise ParamError(
            "device", f"--device {device}: CUDA is not available here (no NVIDIA GPU or driver, or a CPU-only"
            " torch build); use --device cpu",
        )
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ParamError(
            "device", f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0 to"
            f" cuda:{torch.cuda.device_count() - 1})",
        )
    return resolved


def resolve_dtype(options: SpeedOptions, device: torch.device) -> torch.dtype:
    """The dtype for the UNet, ControlNet and text encoder; fp16 on the CPU is refused."""
    if options.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if options.dtype == "fp16" and device.type == "cpu":
        raise ParamError(
            "dtype", "--dtype fp16 is refused on the CPU: many CPU kernels have no float16 version and the others"
            " are slower than float32; use fp32, or bf16 on CPUs with bfloat16 support",
        )
    return DTYPES[options.dtype]


def apply_speed_options(
    pipeline: TiledUpscalePipeline, options: SpeedOptions, device: torch.device
) -> AccelerationReport:
    """Set up the loaded `pipeline` (already on `device` in its dtype) as `options` ask."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    models = {"unet": pipeline.unet, "controlnet": pipeline.controlnet, "vae": pipeline.vae}
    attention = {}
    for name, model in models.items():
        # The same processor diffusers would pick on torch >= 2, set explicitly so it is certain.
        model.set_attn_processor(AttnProcessor2_0())
        kinds = {type(processor).__name__ for processor in model.attn_processors.values()}
        attention[name] = ", ".join(sorted(kinds)) or "none"

    denoisers = {"unet": pipeline.unet, "controlnet": pipeline.controlnet}
    if options.channels_last:
        for model in denoisers.values():
            model.to(memory_format=torch.channels_last)
    compiled = []
    if options.compile:
        for name, model in denoisers.items():
            model.compile()
            compiled.append(name)
    if options.cpu_offload:
        _offload_to_cpu(pipeline, device)

    report = AccelerationReport(
        device=str(device),
        dtype=str(pipeline.unet.dtype).removeprefix("torch."),
        vae_dtype=str(pipeline.vae.dtype).removeprefix("torch."),
        attention=attention,
        channels_last=options.channels_last,
        compiled=compiled,
        cpu_offload=options.cpu_offload,
    )
    logger.info("models run with %s", report)
    return report


def _offload_to_cpu(pipeline: TiledUpscalePipeline, device: torch.device) -> None:
    """diffusers' model offload for this pipeline's order of calls.

    The text encoder runs first and is offloaded when the VAE encoder starts; the UNet and
    ControlNet alternate every step, so both stay on the device through the loop and are
    offloaded when the VAE decoder starts. The VAE itself stays on the device.
    """
    from accelerate import cpu_offload_with_hook

    _, text_encoder_hook = cpu_offload_with_hook(pipeline.text_encoder, device)
    _, controlnet_hook = cpu_offload_with_hook(pipeline.controlnet, device)
    _, unet_hook = cpu_offload_with_hook(pipeline.unet, device)
    pipeline.execution_device = device  # the UNet's own `.device` is now the CPU's

    def offload_text_encoder(module: torch.nn.Module, args: tuple) -> None:
        text_encoder_hook.offload()

    def offload_denoisers(module: torch.nn.Module, args: tuple) -> None:
        unet_hook.offload()
        controlnet_hook.offload()

    pipeline.vae.encoder.register_forward_pre_hook(offload_text_encoder)
    pipeline.vae.decoder.register_forward_pre_hook(offload_denoisers)
