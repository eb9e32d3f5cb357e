"""The engine end to end on the tiny model: sizes, determinism, passes, tiling, conditioning."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from conftest import FAST, make_test_image
from PIL import Image

from clarity import ParamError, SpeedOptions, UpscaleParams, Upscaler
from clarity.engine.images import pil_to_tensor
from clarity.engine.pipeline import PassSettings
from clarity.engine.schedulers import make_scheduler
from clarity.engine.upscaler import plan_passes


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("size", "scale", "expected"),
    [
        ((40, 32), 2, (80, 64)),
        ((37, 23), 2, (74, 46)),  # sides not divisible by 8
        ((23, 61), 1.5, (35, 92)),  # portrait; 34.5 rounds half up
        ((50, 30), 3, (150, 90)),  # chained passes 2 x 1.5
        ((9, 5), 4, (36, 20)),
    ],
)
def test_output_size_is_input_times_scale(upscaler, size, scale, expected):
    result = upscaler.upscale(make_test_image(*size), scale_factor=scale, **FAST)
    assert result.image.size == expected
    assert result.stats.passes[-1].output_size == expected


def test_same_seed_gives_the_same_image_and_another_seed_another(upscaler, image):
    first = upscaler.upscale(image, seed=7, **FAST).image
    again = upscaler.upscale(image, seed=7, **FAST).image
    other = upscaler.upscale(image, seed=8, **FAST).image
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 0.5


def test_random_seed_is_reported_so_the_result_can_be_reproduced(upscaler, image):
    result = upscaler.upscale(image, seed=None, **FAST)
    replay = upscaler.upscale(image, seed=result.stats.seeds[0], **FAST)
    assert np.array_equal(pixels(result.image), pixels(replay.image))


def test_creativity_zero_returns_the_pre_upscaled_image(upscaler, image):
    result = upscaler.upscale(image, creativity=0.0)
    assert np.array_equal(pixels(result.image), pixels(image.resize((80, 64), Image.Resampling.LANCZOS)))
    assert result.stats.unet_evaluations == 0


def test_creativity_adds_detail_that_grows_with_strength(upscaler, image):
    base = pixels(image.resize((80, 64), Image.Resampling.LANCZOS))
    low = np.abs(pixels(upscaler.upscale(image, num_inference_steps=10, creativity=0.2).image) - base).mean()
    high = np.abs(pixels(upscaler.upscale(image, num_inference_steps=10, creativity=0.8).image) - base).mean()
    assert 0 < low < high


def test_resemblance_and_dynamic_change_the_output(upscaler, image):
    # Outputs are deterministic, so any difference beyond rounding is the parameter's effect;
    # the colour fix is off so that it cannot mask one.
    plain = {"color_fix": "none", **FAST}
    reference = pixels(upscaler.upscale(image, **plain).image)
    assert np.abs(pixels(upscaler.upscale(image, resemblance=2.5, **plain).image) - reference).mean() > 0.1
    assert np.abs(pixels(upscaler.upscale(image, dynamic=12, **plain).image) - reference).mean() > 0.1


def test_variants_use_consecutive_seeds(upscaler, image):
    result = upscaler.upscale(image, num_images=2, seed=10, **FAST)
    assert result.stats.seeds == [10, 11]
    second = upscaler.upscale(image, seed=11, **FAST).image
    assert np.array_equal(pixels(result.images[1]), pixels(second))
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))


def test_pass_plan():
    assert plan_passes(1) == [1]
    assert plan_passes(2) == [2]
    assert plan_passes(3) == [2, 1.5]
    assert plan_passes(4) == [2, 2]
    assert plan_passes(16) == [2, 2, 2, 2]


def test_chained_4x_equals_two_2x_passes_with_the_multistep_factor(upscaler):
    image = make_test_image(20, 16)
    params = UpscaleParams(scale_factor=4, seed=5, multistep_factor=0.7, **FAST)
    chained = upscaler.upscale(image, params)
    first = upscaler.upscale(image, params.replace(scale_factor=2)).image
    second = upscaler.upscale(first, params.replace(scale_factor=2, seed=6, creativity=0.5 * 0.7)).image
    assert [p.strength for p in chained.stats.passes] == pytest.approx([0.5, 0.35])
    assert [p.seed for p in chained.stats.passes] == [5, 6]
    assert np.array_equal(pixels(chained.image), pixels(second))


def test_tiled_run_reports_its_work(upscaler):
    image = make_test_image(96, 80)  # 192x160 output -> 24x20 latent
    steps, creativity = 4, 0.5
    result = upscaler.upscale(
        image, tiling_width=16, tiling_height=16, tile_overlap=4, tile_batch_size=3,
        num_inference_steps=steps, creativity=creativity,
    )
    stats = result.stats.passes[0]
    assert result.image.size == (192, 160)
    assert stats.latent_size == (24, 20)
    assert stats.tile_grid == (2, 2) and stats.tiles == 4
    assert stats.latent_area_ratio == pytest.approx(4 * 14 * 12 / (24 * 20))
    # Every denoising step sends every tile through the UNet twice (guided and unguided).
    assert stats.denoising_steps == int(steps * creativity)
    assert stats.unet_evaluations == stats.denoising_steps * stats.tiles * 2
    assert {"pre_upscale", "encode_prompt", "vae_encode", "denoise", "vae_decode"} <= set(stats.seconds)


def test_guidance_off_halves_the_unet_work(upscaler, image):
    guided = upscaler.upscale(image, **FAST).stats.unet_evaluations
    unguided = upscaler.upscale(image, dynamic=1, **FAST).stats.unet_evaluations
    assert unguided * 2 == guided


def test_tile_batch_size_does_not_change_the_result(fp32_vae_upscaler):
    # An fp32 VAE: batching changes the UNet's float32 rounding only, which a bf16 VAE (the
    # default on CPUs with native bf16, rounding to 8 bits) can turn into 2 levels.
    upscaler = fp32_vae_upscaler
    image = make_test_image(96, 80)
    common = {"tiling_width": 16, "tiling_height": 16, "tile_overlap": 4, **FAST}
    one = upscaler.upscale(image, tile_batch_size=1, **common).image
    four = upscaler.upscale(image, tile_batch_size=4, **common).image
    assert np.abs(pixels(one) - pixels(four)).max() <= 1


@pytest.fixture(scope="module")
def fp32_vae_upscaler(tiny_weights):
    # Pinned to an fp32 VAE: diffusers' pipeline feeds the VAE float32 tensors (a bf16 VAE, the
    # default on CPUs with native bf16, would refuse them), and "number for number" needs the
    # same arithmetic on both sides.
    return Upscaler.from_pretrained(tiny_weights, device="cpu", speed=SpeedOptions(vae_dtype="fp32"))


@pytest.mark.parametrize("scheduler", ["DDIM", "DPM++ 3M SDE Karras", "Euler a"])
def test_single_tile_matches_diffusers_controlnet_img2img(fp32_vae_upscaler, scheduler):
    """With one tile and uniform residual scaling, the engine is diffusers' pipeline, number for number."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    ours = fp32_vae_upscaler.pipeline
    image = make_test_image(80, 64)
    settings = PassSettings(
        prompt="a red house", negative_prompt="blurry", strength=0.6, guidance_scale=5.0,
        num_inference_steps=6, controlnet_scale=0.8, controlnet_decay=1.0, scheduler=scheduler,
        max_tile_height=144, max_tile_width=112, min_tile_overlap=8, tile_batch_size=8, seed=3,
    )
    our_result, stats = ours(pil_to_tensor(image), settings)
    assert stats.tiles == 1

    reference = StableDiffusionControlNetImg2ImgPipeline(
        vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer, unet=ours.unet,
        controlnet=ours.controlnet, scheduler=make_scheduler(scheduler, ours.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        prompt="a red house", negative_prompt="blurry", image=image, control_image=image, strength=0.6,
        guidance_scale=5.0, num_inference_steps=6, controlnet_conditioning_scale=0.8,
        generator=torch.Generator("cpu").manual_seed(3), output_type="np",
    ).images[0]
    ours_np = our_result[0].permute(1, 2, 0).numpy()
    assert np.abs(ours_np - expected).max() < 1e-4


def test_controlnet_decay_weights_deep_residuals_most(upscaler, image):
    from clarity.engine.controlnet import residual_scales

    scales = residual_scales(13, 0.6, 0.825)
    assert scales[-1] == pytest.approx(0.6) and scales[0] == pytest.approx(0.6 * 0.825**12)
    uniform = pixels(upscaler.upscale(image, controlnet_decay=1.0, color_fix="none", **FAST).image)
    decayed = pixels(upscaler.upscale(image, color_fix="none", **FAST).image)
    assert np.abs(uniform - decayed).mean() > 0.1


def test_alpha_and_grayscale_survive(upscaler):
    rgba = make_test_image(40, 32, "RGBA")
    alpha = Image.linear_gradient("L").resize((40, 32))
    rgba.putalpha(alpha)
    result = upscaler.upscale(rgba, **FAST).image
    assert result.mode == "RGBA"
    expected_alpha = pixels(alpha.resize((80, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(pixels(result.getchannel("A")), expected_alpha)

    gray = upscaler.upscale(make_test_image(40, 32, "L"), **FAST).image
    assert gray.mode == "L" and gray.size == (80, 64)


def test_transparent_png_does_not_bloom(upscaler):
    """The colour stored under transparent pixels (black here) must not leak into the visible edge."""
    size = 64
    y, x = np.mgrid[0:size, 0:size]
    disc = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[disc] = (40, 200, 90, 255)
    result = pixels(upscaler.upscale(Image.fromarray(rgba), **FAST).image)
    edge = (result[..., 3] > 64) & (result[..., 3] < 192)  # the soft, half-visible rim
    inside = result[..., 3] == 255
    rim, core = result[edge][:, :3].mean(0), result[inside][:, :3].mean(0)
    # Unfilled, the black under the transparent pixels halves the rim's green.
    assert edge.sum() > 20 and np.abs(rim - core).max() < 0.1 * core.max(), (rim, core)


def _wrap_seams(image: Image.Image) -> list[float]:
    """Per axis (x, y): the step across the wrap-around over the mean step next to it on both sides.

    Near 1, copies laid edge to edge continue each other; far above 1, they show a seam.
    """
    array = pixels(image).astype(np.float32)
    ratios = []
    for axis in (1, 0):
        steps = np.abs(np.diff(array, axis=axis, append=array.take([0], axis=axis))).mean(axis=(1 - axis, 2))
        across, beside = steps[-1], np.r_[steps[:2], steps[-3:-1]].mean()
        ratios.append(float(across / beside))
    return ratios


def test_pattern_output_tiles_without_a_seam(upscaler):
    photo = make_test_image(36, 28)  # gradients: its opposite edges differ a lot
    plain = upscaler.upscale(photo, **FAST)
    assert min(_wrap_seams(plain.image)) > 3
    tiled = upscaler.upscale(photo, pattern=True, **FAST)
    assert tiled.stats.pattern_crossfaded == ["x", "y"]
    assert tiled.stats.passes[0].tiles == 4  # the wrap-around is cross-faded like any tile seam
    assert max(_wrap_seams(tiled.image)) < 1.5, _wrap_seams(tiled.image)  # measured 1.00 and 1.12
    # Sides that are not multiples of 8 are diffused at the nearest multiples, then resized back.
    odd = upscaler.upscale(photo, pattern=True, scale_factor=1.5, creativity=0.0).image
    assert odd.size == (54, 42) and max(_wrap_seams(odd)) < 1.5


def test_sixteen_bit_input_is_rescaled_not_clipped(upscaler):
    deep = Image.fromarray(np.full((32, 40), 30000, dtype=np.uint16))
    result = upscaler.upscale(deep, creativity=0.0).image
    assert result.mode == "L"
    assert abs(int(np.asarray(result).mean()) - round(30000 / 65535 * 255)) <= 1


def test_tiny_images_work(upscaler):
    assert upscaler.upscale(Image.new("RGB", (1, 1), "red"), **FAST).image.size == (2, 2)
    assert upscaler.upscale(Image.new("RGB", (1, 30), "red"), **FAST).image.size == (2, 60)


@pytest.mark.parametrize(
    ("source", "field"),
    [
        (b"definitely not an image", "image"),
        (b"", "image"),
        (Image.new("RGB", (0, 0)), "image"),
    ],
)
def test_bad_images_raise_an_error_naming_the_image(upscaler, source, field):
    with pytest.raises(ParamError) as caught:
        upscaler.upscale(source, **FAST)
    assert caught.value.param == field


def test_truncated_file_is_a_clear_error(upscaler, image):
    buffer = io.BytesIO()
    make_test_image(64, 64).save(buffer, format="PNG")
    with pytest.raises(ParamError, match="truncated or corrupt") as caught:
        upscaler.upscale(buffer.getvalue()[:200], **FAST)
    assert caught.value.param == "image"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"creativity": 2}, "creativity"), ({"scale_factor": "2"}, "scale_factor"), ({"sead": 1}, "sead"),
     ({"num_images": 0}, "num_images")],
)
def test_bad_parameters_raise_an_error_naming_them(upscaler, image, overrides, field):
    with pytest.raises(ParamError) as caught:
        upscaler.upscale(image, **overrides)
    assert caught.value.param == field


def test_progress_reports_every_step_of_every_pass(upscaler, image):
    events = []
    upscaler.upscale(image, scale_factor=4, progress=events.append, **FAST)
    assert [(e.pass_index, e.step) for e in events] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    fractions = [e.fraction for e in events]
    assert fractions[0] == 0 and fractions == sorted(fractions)  # a pass starting is not a pass done
    assert events[-1].fraction == pytest.approx(1.0)


def test_outputs_over_the_pixel_limit_are_refused_before_any_work(tiny_weights):
    from clarity import Upscaler

    limited = Upscaler.from_pretrained(tiny_weights, device="cpu", max_output_pixels=100 * 100)
    with pytest.raises(ParamError, match="125x100 = 0.0 MP; the limit here is 0.0 MP") as caught:
        limited.upscale(make_test_image(50, 40), scale_factor=2.5, **FAST)
    assert caught.value.param == "scale_factor"
    assert limited.upscale(make_test_image(50, 40), scale_factor=2, **FAST).image.size == (100, 80)


class _RunsOutOfMemory:
    """Wraps the pipeline to fail like a GPU that is too small for big tile batches."""

    def __init__(self, inner, fits_batch: int, error: Exception) -> None:
        self.inner, self.fits_batch, self.error = inner, fits_batch, error
        self.batches: list[int] = []

    def __getattr__(self, name):  # everything but the call is the real pipeline's
        return getattr(self.inner, name)

    def __call__(self, image, settings, on_step=None):
        self.batches.append(settings.tile_batch_size)
        if settings.tile_batch_size > self.fits_batch:
            raise self.error
        return self.inner(image, settings, on_step)


def test_out_of_memory_retries_with_smaller_batches_and_says_so(upscaler, image, caplog):
    from clarity import Upscaler

    flaky = _RunsOutOfMemory(upscaler.pipeline, fits_batch=2, error=torch.OutOfMemoryError("out of memory"))
    result = Upscaler(flaky).upscale(image, tile_batch_size=8, **FAST)
    assert flaky.batches == [8, 4, 2]
    assert len(result.stats.retries) == 2 and "retried with tile_batch_size=2" in result.stats.retries[1]
    assert "out of memory" in caplog.text
    assert len(result.stats.passes) == 1  # the failed attempts leave no stats behind
    expected = upscaler.upscale(image, tile_batch_size=2, **FAST).image
    assert np.array_equal(pixels(result.image), pixels(expected))


def test_out_of_memory_that_persists_and_other_errors_are_raised(upscaler, image):
    from clarity import Upscaler

    hopeless = _RunsOutOfMemory(upscaler.pipeline, fits_batch=0, error=torch.OutOfMemoryError("out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        Upscaler(hopeless).upscale(image, tile_batch_size=2, vae_tile_size=256, **FAST)
    assert hopeless.batches == [2, 1, 1]  # batch halved, then the VAE tile, then nothing is left
    broken = _RunsOutOfMemory(upscaler.pipeline, fits_batch=0, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        Upscaler(broken).upscale(image, **FAST)
    assert broken.batches == [8]  # not a memory problem: no retry


def test_an_exception_from_progress_cancels_the_work(upscaler, image):
    class Stop(Exception):
        pass

    def cancel_after_first_step(event):
        if event.step == 1:
            raise Stop

    with pytest.raises(Stop):
        upscaler.upscale(image, progress=cancel_after_first_step, **FAST)


def test_an_upscaler_of_the_tiny_model_says_so_once(upscaler, caplog):
    from clarity import Upscaler

    with caplog.at_level(logging.WARNING, logger="clarity.engine.upscaler"):
        Upscaler(upscaler.pipeline, name="tiny-test", tiny_model=True)
        Upscaler(upscaler.pipeline, name="real-model")
    warnings = [record.getMessage() for record in caplog.records if record.name == "clarity.engine.upscaler"]
    assert warnings == ["model tiny-test is the tiny test model: its outputs have no meaningful detail"]


def test_denoising_work_counts_pixels_steps_guidance_and_variants():
    from clarity import denoising_work

    def work(size: tuple[int, int], num_images: int = 1, **params) -> float:
        return denoising_work(size, UpscaleParams(**params), num_images).megapixel_steps

    base = denoising_work((256, 256), UpscaleParams())  # 512 px output: one tile, 6 steps, guidance
    assert base.tile_evaluations == 6 * 2 and base.megapixel_steps == pytest.approx(512 * 512 * 12 / 1e6)
    assert work((256, 256), num_images=3) == pytest.approx(3 * base.megapixel_steps)
    assert work((256, 256), dynamic=1) == pytest.approx(base.megapixel_steps / 2)
    assert work((256, 256), creativity=0) == 0
    # Smaller tiles overlap more: more work for the same output.
    assert work((256, 256), tiling_width=16, tiling_height=16) > 2 * base.megapixel_steps
    # A 4x upscale runs a 2x pass first; the second runs at 0.8 x creativity (5 of 18 steps).
    assert work((128, 128), scale_factor=4) == pytest.approx((256 * 256 * 12 + 512 * 512 * 10) / 1e6)
