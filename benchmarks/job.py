"""One upscale in a fresh process: `python -m benchmarks.job ENGINE --weights DIR --side PX [--params defaults]`.

Prints one JSON line: the job's wall time (model loading excluded), the process's resident
memory after loading and its peak (ru_maxrss, loading included), and for Clarity's engines the
seconds of each stage (pre-upscale, VAE encode, denoise, VAE decode, ...). Every weight is read
once before the clock starts (`page_in`): the weights are memory-mapped from their safetensors
files, and otherwise the first forward of each model pays for its first touch, a cost a serving
process pays once, which fell on whichever engine a run happened to start first. Engines:

- `clarity`: this engine (`Upscaler.upscale`, scale 2 from a side/2 input);
- `naive`: diffusers' `StableDiffusionControlNetImg2ImgPipeline` on the whole Lanczos
  pre-upscaled image (it is also the ControlNet-tile condition), built from the same
  components, with the same steps, strength, guidance, seed and scheduler;
- `naive_vae_tiling`: the same with `vae.enable_tiling()`, at SD1.5's VAE tile size (512 px;
  the tiny VAE's config would give 64 px tiles);
- `naive_fast_vae`: the naive pipeline with Clarity's default VAE setup (`--vae-dtype auto`,
  `--vae-channels-last auto`: bf16 and channels-last on a CPU with native bf16), its inputs cast
  to the VAE's dtype and its latents back to float32 by hooks, for a comparison at equal VAE
  precision (diffusers' pipeline itself would run the VAE in whatever dtype it was given, and
  fails on a bf16 VAE fed float32). The plain `naive` engines keep an fp32 NCHW VAE, as
  diffusers does by default;
- `clarity_no_denoiser`: this engine with the UNet and ControlNet forwards answering zeros, so
  that very large outputs can be measured in minutes: everything that holds whole images
  (pre-upscaling, VAE encode and decode, blending, colour fix, conversions) runs for real;
  the denoiser's own activations follow the tile size, not the image.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

#: The benchmark job every engine runs by default: 2 scheduler steps at strength 0.5 = 1 denoising
#: step, guidance off (it would double every engine's work alike), the default sampler and
#: resemblance. `--params defaults` runs `UpscaleParams()`'s defaults instead (6 denoising steps
#: of DPM++ 3M SDE Karras with guidance 6) under the same seed.
STEPS, STRENGTH, GUIDANCE, SEED = 2, 0.5, 1.0, 1
PARAMS = ("benchmark", "defaults")
ENGINES = ("clarity", "naive", "naive_vae_tiling", "naive_fast_vae", "clarity_no_denoiser")
#: SD1.5's VAE tile: its config's sample_size (the tiny VAE's is 64).
NAIVE_VAE_TILE = 512


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def add_params_option(parser: argparse.ArgumentParser) -> None:
    """`--params`, the job's parameters by name, for this script and those that run it."""
    parser.add_argument("--params", choices=PARAMS, default="benchmark",
                        help="The benchmark job (1 step, no guidance) or UpscaleParams' defaults.")


def job_params(name: str = "benchmark"):
    """The `UpscaleParams` of the job named `name` (one of `PARAMS`)."""
    from clarity import UpscaleParams

    if name == "defaults":
        return UpscaleParams(seed=SEED)
    return UpscaleParams(num_inference_steps=STEPS, creativity=STRENGTH, dynamic=GUIDANCE, seed=SEED)


def run_job(engine: str, weights: Path, side: int, params_name: str = "benchmark") -> dict:
    import torch

    from benchmarks.common import sample_image
    from clarity import SpeedOptions, Upscaler

    torch.set_grad_enabled(False)
    # Clarity's engines run its defaults; the plain naive ones get the fp32 NCHW VAE diffusers would have.
    plain_vae = engine in ("naive", "naive_vae_tiling")
    speed = SpeedOptions(vae_dtype="fp32", vae_channels_last="off") if plain_vae else SpeedOptions()
    upscaler = Upscaler.from_pretrained(weights, device="cpu", max_output_pixels=max(side * side, 1), speed=speed)
    source = sample_image(side // 2, side // 2)
    params = job_params(params_name)
    loaded_rss = _current_rss_mb()
    pipeline = upscaler.pipeline
    if engine == "clarity_no_denoiser":
        _answer_zeros(pipeline)
        # Their weights are never read: paged in, they would count in the peak RSS this engine measures.
        page_in([pipeline.vae, pipeline.text_encoder])
    else:
        page_in([pipeline.vae, pipeline.text_encoder, pipeline.unet, pipeline.controlnet])
    stages = None
    if engine in ("clarity", "clarity_no_denoiser"):
        started = time.perf_counter()
        stats = upscaler.upscale(source, params).stats
        seconds = time.perf_counter() - started
        stages = {stage: round(value, 2) for stage, value in stats.seconds_by_stage.items()}
    else:
        naive = naive_pipeline(upscaler, params, engine)
        started = time.perf_counter()
        run_naive(naive, source, side, params)
        seconds = time.perf_counter() - started
    report = upscaler.acceleration
    return {"seconds": seconds, "rss_after_loading_mb": round(loaded_rss), "peak_rss_mb": round(_rss_mb()),
            "torch_threads": torch.get_num_threads(), "seconds_by_stage": stages,
            "vae": {"dtype": report.vae_dtype, "channels_last": report.vae_channels_last} if report else None}


def page_in(models) -> None:
    """Read every parameter and buffer of `models` once (see the module's docstring)."""
    import itertools

    for model in models:
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.sum()


def naive_pipeline(upscaler, params, engine: str = "naive"):
    """diffusers' `StableDiffusionControlNetImg2ImgPipeline` built from `upscaler`'s components, with the
    scheduler of `params`; `naive_vae_tiling` turns on the VAE's tiling at SD1.5's tile size, `naive_fast_vae`
    lets it run a VAE of another dtype than float32 (`_cast_vae_inputs`)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from clarity.engine.schedulers import make_scheduler

    ours = upscaler.pipeline
    naive = StableDiffusionControlNetImg2ImgPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        controlnet=ours.controlnet, scheduler=make_scheduler(params.scheduler, ours.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    naive.set_progress_bar_config(disable=True)
    if engine == "naive_fast_vae":
        _cast_vae_inputs(naive.vae)
    if engine == "naive_vae_tiling":
        naive.vae.enable_tiling()
        naive.vae.tile_sample_min_size = NAIVE_VAE_TILE
        naive.vae.tile_latent_min_size = NAIVE_VAE_TILE // 8
    return naive


def run_naive(naive, source, side: int, params) -> None:
    """The job of `params` through the naive pipeline: `source` Lanczos-upscaled to side x side (also the
    ControlNet-tile condition), then img2img at creativity as strength, dynamic as guidance and resemblance
    as ControlNet scale."""
    import torch

    from clarity.engine.preupscale import lanczos

    image = lanczos(source, (side, side))
    naive(
        prompt=params.prompt, negative_prompt=params.negative_prompt, image=image, control_image=image,
        strength=params.creativity, guidance_scale=params.dynamic, num_inference_steps=params.num_inference_steps,
        controlnet_conditioning_scale=params.resemblance, generator=torch.Generator("cpu").manual_seed(params.seed),
    )


def _cast_vae_inputs(vae) -> None:
    """Let diffusers' pipeline, which feeds its VAE float32, run a VAE of another dtype.

    The encoder's and the decoder's inputs are cast to the VAE's dtype and memory layout (as
    clarity/engine/vae.py does: a channels-last VAE fed NCHW inputs measured barely faster than
    fp32), and the encoder's moments back to float32 (so the latents and the UNet stay float32).
    """
    import torch

    weight = vae.encoder.conv_in.weight
    is_nhwc = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    layout = torch.channels_last if is_nhwc else torch.contiguous_format

    def to_vae_dtype(module, args):
        return (args[0].to(vae.dtype, memory_format=layout), *args[1:])

    def to_float32(module, args, output):
        return output.float()

    vae.encoder.register_forward_pre_hook(to_vae_dtype)
    vae.post_quant_conv.register_forward_pre_hook(to_vae_dtype)
    vae.quant_conv.register_forward_hook(to_float32)


def _answer_zeros(pipeline) -> None:
    """Make the pipeline's UNet and ControlNet return zeros of the right shapes, at no cost."""
    import torch

    def unet_forward(sample, *args, **kwargs):
        return (torch.zeros_like(sample),)

    def controlnet_forward(sample, *args, **kwargs):
        residuals = [torch.zeros(sample.shape[0], 1, 1, 1)] * len(pipeline.controlnet.controlnet_down_blocks)
        return residuals, torch.zeros(sample.shape[0], 1, 1, 1)

    # Instance attributes shadow the modules' forward: the pipeline calls them as usual.
    pipeline.unet.forward = unet_forward
    pipeline.controlnet.forward = controlnet_forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.job", description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=ENGINES)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--side", type=int, required=True, help="Output side in pixels (square, even).")
    add_params_option(parser)
    args = parser.parse_args(argv)
    print(json.dumps(run_job(args.engine, args.weights, args.side, args.params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
