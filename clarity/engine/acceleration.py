"""Speed options: where and how the models run (device, dtype, attention, memory format, compile, offload).

`SpeedOptions` says what is wanted; `resolve_device` and `resolve_dtype` turn it into a
device and a dtype for loading (refusing what cannot work, with the flag's name), and
`apply_speed_options` sets up the loaded pipeline and returns an `AccelerationReport` of what
is actually in effect, which `Upscaler` puts into every result's stats.

What each option does and why:
- dtype: fp16 (default on CUDA) or bf16 halve the UNet's, ControlNet's and text encoder's
  memory and run on tensor cores. `Upscaler` also checks every pass's output for NaNs and
  fails loudly rather than writing a black or garbled image.
- vae_dtype: the VAE is loaded in float32 (models/loading.py) and cast here. On SD1.5 at
  real sizes it is most of a CPU job's time (three quarters of a 1 MP job in float32), and
  bfloat16 keeps float32's range, so SD1.5's VAE stays finite in it, while float16 can
  overflow to inf/NaN. `auto` picks bf16 where the hardware computes it natively
  (`native_bf16`: x86 CPUs with AVX512-BF16 or AMX, CUDA compute capability 8.0 and up) and
  float32 elsewhere. fp16 is allowed on CUDA only, for GPUs without bf16; the NaN check then
  stops a job that overflowed, naming --vae-dtype.
- vae_channels_last: NHWC memory layout for the VAE. On the CPU it was faster in every
  measurement (README, Performance), so `auto` turns it on there; on CUDA `auto` follows
  --channels-last (not measured on a GPU yet). A separate field from `channels_last` because
  the two defaults differ and a boolean flag could not turn the CPU default off.
- attention: PyTorch's fused `scaled_dot_product_attention` through diffusers'
  `AttnProcessor2_0`, set explicitly on every model so that the report is a fact, not a hope.
- channels_last: NHWC memory layout for the UNet and ControlNet, faster convolutions on
  tensor cores; same results up to float rounding.
- compile: `torch.compile` of the UNet and ControlNet forwards, in place (attributes such as
  `.dtype` stay reachable). The first calls, and calls with a new tile shape, compile.
- threads: torch's CPU threads for this process (engine/threads.py): auto divides the CPUs
  the process may use (a container's quota included) among the workers sharing them, or
  follows OMP_NUM_THREADS when it is set.
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

from clarity.engine.threads import set_cpu_threads
from clarity.errors import ParamError
from clarity.options import option

if TYPE_CHECKING:
    from clarity.engine.pipeline import TiledUpscalePipeline

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)
VAE_CHANNELS_LAST_CHOICES: tuple[str, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class SpeedOptions:
    """How the models run. The defaults are safe everywhere; each field is a flag of `upscale` and `serve`."""

    dtype: str = option(
        "auto", "UNet, ControlNet and text encoder dtype: auto = fp16 on CUDA, fp32 on the CPU; fp16 is refused on"
        " the CPU. The VAE's is --vae-dtype.", choices=DTYPE_CHOICES,
    )
    vae_dtype: str = option(
        "auto", "VAE dtype: auto = bf16 where the hardware has native bf16 (x86 CPUs with AVX512-BF16 or AMX, CUDA"
        " compute capability 8.0+), else fp32. fp16 only on CUDA: SD1.5's VAE can overflow to NaN in it (the job"
        " then fails, naming this flag).", choices=DTYPE_CHOICES,
    )
    vae_channels_last: str = option(
        "auto", "NHWC memory layout for the VAE: auto = on on the CPU (faster there), as --channels-last on CUDA.",
        choices=VAE_CHANNELS_LAST_CHOICES,
    )
    channels_last: bool = option(
        False, "NHWC memory layout for the UNet and ControlNet (faster convolutions on tensor cores)."
    )
    compile: bool = option(False, "torch.compile the UNet and ControlNet: slow first requests, faster after.")
    cpu_offload: bool = option(
        False, "Keep models on the CPU between their calls, for GPUs too small to hold them all."
    )
    threads: int = option(
        0, "Torch threads per process on the CPU: 0 = auto (OMP_NUM_THREADS if set, else the CPUs this process may"
        " use, after a container's CPU quota, divided among the workers sharing them).", min=0,
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ParamError("dtype", f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {self.dtype!r}")
        if self.vae_dtype not in DTYPE_CHOICES:
            raise ParamError(
                "vae_dtype", f"--vae-dtype must be one of {', '.join(DTYPE_CHOICES)}; got {self.vae_dtype!r}"
            )
        if self.vae_channels_last not in VAE_CHANNELS_LAST_CHOICES:
            raise ParamError(
                "vae_channels_last", f"--vae-channels-last must be one of {', '.join(VAE_CHANNELS_LAST_CHOICES)};"
                f" got {self.vae_channels_last!r}",
            )
        if self.threads < 0:
            raise ParamError("threads", f"--threads must be 0 (auto) or a positive number; got {self.threads}")
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
    vae_channels_last: bool = False
    compiled: list[str] = field(default_factory=list)
    cpu_offload: bool = False
    #: torch's intra-op threads when the models run on the CPU (--threads); None on CUDA.
    cpu_threads: int | None = None


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
    """The dtype for the UNet, ControlNet and text encoder; fp16 on the CPU is refused.

    --vae-dtype is checked here too (`check_vae_dtype`), so that whoever checks the options
    before loading (`clarity serve`) refuses a bad one as early.
    """
    check_vae_dtype(options, device)
    if options.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if options.dtype == "fp16" and device.type == "cpu":
        raise ParamError(
            "dtype", "--dtype fp16 is refused on the CPU: many CPU kernels have no float16 version and the others"
            " are slower than float32; use fp32, or bf16 on CPUs with bfloat16 support",
        )
    return DTYPES[options.dtype]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware, so that bf16 is faster there rather than emulated.

    CUDA: compute capability 8.0 (Ampere) and up (`torch.cuda.is_bf16_supported` would also
    say yes where bf16 is only emulated). CPU: x86 with AVX512-BF16 (which every AMX CPU has)
    and oneDNN in the torch build. `torch.cpu._is_avx512_bf16_supported` is private torch API,
    used only here; tests/test_acceleration.py fails if it disappears. (oneDNN's own
    `_is_mkldnn_bf16_supported` says yes on any AVX512 CPU, where bf16 is emulated and slow.)
    Other CPUs (ARM included) are not measured, so they get fp32.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported())


def resolve_vae_dtype(options: SpeedOptions, device: torch.device) -> torch.dtype:
    """The VAE's dtype: `auto` is bf16 where `native_bf16`, else fp32; fp16 only on CUDA."""
    check_vae_dtype(options, device)
    if options.vae_dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return DTYPES[options.vae_dtype]


def check_vae_dtype(options: SpeedOptions, device: torch.device) -> None:
    """Refuse --vae-dtype fp16 off CUDA (without touching the device, so it can run before loading)."""
    if options.vae_dtype == "fp16" and device.type != "cuda":
        raise ParamError(
            "vae_dtype", "--vae-dtype fp16 is refused on the CPU: many CPU kernels have no float16 version and the"
            " others are slower than float32, and SD1.5's VAE can overflow in float16; use bf16 or fp32",
        )


def resolve_vae_channels_last(options: SpeedOptions, device: torch.device) -> bool:
    """Whether the VAE runs channels-last: `auto` is on on the CPU (measured faster), as --channels-last on CUDA."""
    if options.vae_channels_last == "auto":
        return device.type == "cpu" or options.channels_last
    return options.vae_channels_last == "on"


def prepare_vae(vae: torch.nn.Module, options: SpeedOptions, device: torch.device) -> bool:
    """Cast the (float32) `vae` to --vae-dtype and lay it out channels-last if --vae-channels-last says so.

    Returns whether it is now channels-last.
    """
    # torch's own `to`: diffusers' override warns on every cast that "modules that should be kept
    # in float32: []" (none, for AutoencoderKL), which would only confuse whoever reads the log.
    torch.nn.Module.to(vae, dtype=resolve_vae_dtype(options, device))
    channels_last = resolve_vae_channels_last(options, device)
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    return channels_last


def apply_speed_options(
    pipeline: TiledUpscalePipeline, options: SpeedOptions, device: torch.device, cpu_workers: int = 1
) -> AccelerationReport:
    """Set up the loaded `pipeline` (already on `device` in its dtype, the VAE in float32) as `options` ask.

    On the CPU this also sets the process's torch threads (engine/threads.py), `cpu_workers` being
    the processes of this machine that upscale on its CPUs at once.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    vae_channels_last = prepare_vae(pipeline.vae, options, device)

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
        vae_channels_last=vae_channels_last,
        compiled=compiled,
        cpu_offload=options.cpu_offload,
        cpu_threads=set_cpu_threads(options.threads, cpu_workers) if device.type == "cpu" else None,
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
