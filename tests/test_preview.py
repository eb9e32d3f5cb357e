"""Previews of an upscale in progress (`ProgressEvent.preview`): the latent-to-RGB map, the size rule,
the schedulers' estimates of the finished latent, and the promise that looking changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, make_test_image
from diffusers import DPMSolverMultistepScheduler

from clarity.engine.preview import latents_to_rgb, preview_image, preview_size
from clarity.engine.schedulers import denoised_estimate, make_scheduler
from clarity.params import SCHEDULER_NAMES

GREY = (128, 128, 128)  # a zero latent: the bias, 0, is the middle of -1..1, 127.5 rounded half to even
#: Each latent channel at 1 alone: (1 + its row of SD15_LATENT_RGB_FACTORS) x 127.5, rounded, worked out by hand.
CHANNEL_COLOURS = [(172, 157, 169), (169, 191, 157), (91, 150, 162), (100, 94, 36)]
DPM_SOLVERS = [name for name in SCHEDULER_NAMES if name.startswith("DPM++")]


def test_a_zero_latent_is_the_bias_colour_and_each_channel_alone_is_its_row():
    latents = torch.zeros(1, 4, 2, 3)
    spots = [(0, 0), (0, 2), (1, 1), (1, 2)]  # (row, column) where channel k is 1
    for channel, (y, x) in enumerate(spots):
        latents[0, channel, y, x] = 1.0
    image = latents_to_rgb(latents)
    assert image.mode == "RGB" and image.size == (3, 2)
    pixels = np.asarray(image)
    for channel, (y, x) in enumerate(spots):
        assert tuple(pixels[y, x]) == CHANNEL_COLOURS[channel]
    assert tuple(pixels[1, 0]) == GREY and tuple(pixels[0, 1]) == GREY


def test_colours_beyond_the_range_are_clipped_and_half_precision_latents_work():
    latents = torch.zeros(1, 4, 1, 2, dtype=torch.float16)
    latents[0, 0, 0, 0] = 10.0  # every factor of channel 0 is positive, the others' mostly negative
    latents[0, 3, 0, 1] = 10.0  # every factor of channel 3 is negative
    assert np.asarray(latents_to_rgb(latents)).tolist() == [[[255, 255, 255], [0, 0, 0]]]


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ((80, 64), (20, 16)),
        ((4000, 3000), (1000, 750)),
        ((4096, 4096), (1024, 1024)),  # exactly at the limit
        ((10000, 2500), (1024, 256)),  # the long side would be 2500: shrunk to 1024, the aspect ratio kept
        ((3, 2), (1, 1)),
        ((9000, 3), (1024, 1)),
    ],
)
def test_a_preview_is_a_quarter_of_each_side_at_most_1024_and_at_least_1(output, expected):
    assert preview_size(output) == expected


def test_the_padding_of_the_latents_is_cropped_off():
    latents = torch.zeros(1, 4, 4, 8)
    latents[0, 0, :, 7] = 10.0  # a white column of padding: the pass's output is 56 px = 7 latent px wide
    preview = np.asarray(preview_image(latents, (56, 32)))
    assert preview.shape == (8, 14, 3)
    # Bilinear resampling near the edge reads the padding a little, and only there.
    assert (preview[:, :13] == GREY).all()
    assert (preview[:, 13] != 255).all()


@pytest.mark.parametrize("name", DPM_SOLVERS)
def test_the_dpm_solver_estimate_is_the_one_the_solver_computes(upscaler, name):
    scheduler = make_scheduler(name, upscaler.pipeline.scheduler_config)
    scheduler.set_timesteps(8)
    scheduler.set_begin_index(2)  # img2img starts part way, as the pipeline does
    generator = torch.Generator().manual_seed(0)
    sample, noise = torch.randn(2, 1, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps[2:6]:
        output = scheduler.step(noise, t, sample, generator=generator)
        estimate = denoised_estimate(scheduler, output, noise, sample)
        # The solver keeps its data predictions (x0, from convert_model_output) for its multistep update.
        torch.testing.assert_close(estimate(), scheduler.model_outputs[-1])
        sample = output.prev_sample


@pytest.mark.parametrize("name", [name for name in SCHEDULER_NAMES if name not in DPM_SOLVERS])
def test_other_schedulers_give_their_own_estimate(upscaler, name):
    scheduler = make_scheduler(name, upscaler.pipeline.scheduler_config)
    scheduler.set_timesteps(8)
    sample, noise = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    output = scheduler.step(noise, scheduler.timesteps[0], sample)
    assert denoised_estimate(scheduler, output, noise, sample)() is output.pred_original_sample


def test_no_estimate_where_the_formula_does_not_hold(upscaler):
    scheduler = DPMSolverMultistepScheduler.from_config(upscaler.pipeline.scheduler_config,
                                                        prediction_type="v_prediction")
    scheduler.set_timesteps(8)
    sample, noise = torch.randn(2, 1, 4, 8, 8)
    output = scheduler.step(noise, scheduler.timesteps[0], sample)
    assert denoised_estimate(scheduler, output, noise, sample) is None


# --- through Upscaler.upscale on the tiny model ---------------------------------------------------


@pytest.mark.parametrize("scheduler", ["DPM++ 3M SDE Karras", "Euler"])  # computed here; given by diffusers
def test_every_step_offers_an_rgb_preview_a_quarter_of_its_pass(upscaler, scheduler):
    seen = []

    def look(event):
        preview = event.preview() if event.preview is not None else None
        seen.append((event.pass_index, event.step, preview and (preview.mode, preview.size)))

    upscaler.upscale(make_test_image(40, 32), scale_factor=4, scheduler=scheduler, progress=look, **FAST)
    # Passes of 80x64 and 160x128; None at the start of each pass.
    assert seen == [(0, 0, None), (0, 1, ("RGB", (20, 16))), (0, 2, ("RGB", (20, 16))),
                    (1, 0, None), (1, 1, ("RGB", (40, 32)))]


def test_looking_at_previews_changes_nothing_and_looking_twice_sees_the_same(upscaler, image):
    twice = []

    def look_twice(event):
        if event.preview is not None:
            twice.append((np.asarray(event.preview()), np.asarray(event.preview())))

    looked = upscaler.upscale(image, seed=5, progress=look_twice, **FAST).image
    not_looked = upscaler.upscale(image, seed=5, progress=lambda event: None, **FAST).image
    assert looked.tobytes() == not_looked.tobytes()
    assert len(twice) == 2 and all(np.array_equal(first, second) for first, second in twice)
    assert not np.array_equal(twice[0][0], twice[1][0])  # each step shows its own estimate


def test_a_preview_kept_past_its_callback_raises(upscaler, image):
    kept = []
    upscaler.upscale(image, progress=kept.append, **FAST)
    with pytest.raises(RuntimeError, match="inside the callback"):
        kept[-1].preview()
