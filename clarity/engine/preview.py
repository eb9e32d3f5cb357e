"""Cheap previews of a pass in progress, for `ProgressEvent.preview`.

A preview is the scheduler's current estimate of the finished latent (x0, the "denoised" sample)
of the whole blended latent, turned into colours without the VAE: every latent pixel becomes one
RGB pixel by a fixed linear map, the padding the pass added is cropped off, and the picture is
resized (bilinear) to a quarter of the pass's output sides, at most 1024 px on the long side.
It shows the colours and layout of what the step is heading for, at 1/8 of the output's
resolution before the resize; fine detail and exact tones are the VAE's work and are missing.

What it costs, when called: the estimate itself where the scheduler does not return it (DPM-Solver++:
one multiply-add over the latent), a 4 x 3 product per latent pixel, a copy of 3 bytes per latent
pixel to the CPU (on a GPU, that waits for the step's kernels to finish) and one PIL resize.
Uncalled: one small object per step that refers to tensors the step made anyway, dropped when the
progress callback returns. Measured on one thread of a shared 2-core CPU (`python -m benchmarks
--model tiny --only preview`, and `benchmarks.preview.in_upscale` at other sizes):

- a 4x128x128 latent alone (a 1024x1024 pass): 0.62-0.67 ms in three runs (the map 0.23 ms, the
  resize 0.35 ms, DPM-Solver++'s estimate 0.04 ms); uncalled, 2.3 us per step;
- in upscales on the tiny test model: 0.47 ms against 27 ms for one denoising step at an 80x80
  output (the tests' size: 1.7 % of a step), 0.76 ms against 0.97 s at 512x512, 1.8 ms against
  7.8 s at 1024x1024. The preview's work does not depend on the model: with SD1.5's full-size
  UNet and ControlNet a step only costs more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from PIL import Image

from clarity.engine.vae import VAE_SCALE

#: A linear approximation of SD1.5's VAE decoder, one latent pixel at a time: the RGB colour (in the
#: decoder's output range, -1 to 1) is the latent's four channels (scaled by the VAE's scaling factor,
#: as the UNet sees them) times these rows, plus the bias below. It is a least-squares fit of decoded
#: colours against latents. The idea was shared on the Hugging Face forum in 2022 and is what
#: AUTOMATIC1111's "Approx cheap" live preview and ComfyUI's "latent2rgb" previewer do; these are the
#: SD1.5 factors ComfyUI uses. Rows: latent channels 0 to 3; columns: red, green, blue.
SD15_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
#: The fit's constant term, in the same -1 to 1 range: none for SD1.5, so a zero latent is mid grey.
SD15_LATENT_RGB_BIAS = (0.0, 0.0, 0.0)
#: A preview's sides as a share of the pass's output sides.
PREVIEW_FRACTION = 0.25
#: The longest side a preview has, in pixels.
PREVIEW_MAX_SIDE = 1024


def latents_to_rgb(latents: torch.Tensor) -> Image.Image:
    """(1, 4, h, w) SD1.5 latents as a w x h RGB image, one pixel per latent pixel, by the linear fit above."""
    factors = torch.tensor(SD15_LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(SD15_LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), factors) + bias
    pixels = rgb.add_(1).mul_(255 / 2).clamp_(0, 255).round_().to(torch.uint8)
    return Image.fromarray(pixels.cpu().numpy())


def preview_size(output_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the preview of a pass whose output is `output_size`: a quarter of each side,
    less when that would make the long side over 1024 px, each side rounded and at least 1 px."""
    width, height = output_size
    factor = min(PREVIEW_FRACTION, PREVIEW_MAX_SIDE / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


def preview_image(latents: torch.Tensor, output_size: tuple[int, int]) -> Image.Image:
    """The preview of `latents`, the latents of a pass whose output is `output_size` (width, height).

    The latents may cover more than the output (the pass pads the image to multiples of 8 at the
    bottom and right); only the output's part is shown, to sub-pixel precision.
    """
    width, height = output_size
    visible = (0.0, 0.0, width / VAE_SCALE, height / VAE_SCALE)
    return latents_to_rgb(latents).resize(preview_size(output_size), Image.Resampling.BILINEAR, box=visible)


class StepPreview:
    """A preview of one denoising step, made only when called, and only while its progress callback runs.

    It holds the step's estimate of the finished latent (a function over tensors the step made
    anyway) until `expire`, which runs as the callback returns, so that it never keeps device
    memory into the next step. Called after that, it raises `RuntimeError`.
    """

    def __init__(self, estimate: Callable[[], torch.Tensor], output_size: tuple[int, int]) -> None:
        self._estimate: Callable[[], torch.Tensor] | None = estimate
        self._output_size = output_size

    def __call__(self) -> Image.Image:
        """The RGB preview: see `preview_image` for what it shows and `preview_size` for its size."""
        if self._estimate is None:
            raise RuntimeError(
                "a preview can only be made while its progress callback runs (the step's tensors are released"
                " after it): call event.preview() inside the callback"
            )
        return preview_image(self._estimate(), self._output_size)

    def expire(self) -> None:
        """Drop the step's tensors; later calls raise."""
        self._estimate = None


@contextmanager
def step_preview(
    estimate: Callable[[], torch.Tensor] | None, output_size: tuple[int, int]
) -> Iterator[StepPreview | None]:
    """A `StepPreview` of `estimate` valid for the block (None when the step gave no estimate), expired after it."""
    if estimate is None:
        yield None
        return
    preview = StepPreview(estimate, output_size)
    try:
        yield preview
    finally:
        preview.expire()
