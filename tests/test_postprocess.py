"""Colour fix, sharpening and downscaling, as a user of the engine sees them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, make_test_image
from PIL import Image

from clarity import ParamError, UpscaleParams
from clarity.engine.images import pil_to_tensor
from clarity.engine.postprocess import color_fix, sharpen


def channel_means(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))


def coarse(image: Image.Image) -> torch.Tensor:
    return F.avg_pool2d(pil_to_tensor(image), 16)


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_colour_fix_removes_a_colour_cast_and_keeps_the_detail(method):
    reference = pil_to_tensor(make_test_image(96, 64))
    detail = 0.05 * torch.sin(torch.arange(96.0))[None, None, None, :]  # 1-px-scale texture
    cast = torch.tensor([0.12, -0.08, 0.05])[None, :, None, None]  # a washed-out, tinted result
    fixed = color_fix((reference + detail + cast).clamp(0, 1), reference, method)
    # The cast is gone: channel means are back to the reference's.
    assert (fixed.mean((-2, -1)) - reference.mean((-2, -1))).abs().max() < 0.01
    if method == "wavelet":
        # And the texture diffusion "added" survives the fix.
        texture = (fixed - reference).mean((0, 1, 2))
        assert torch.corrcoef(torch.stack([texture, detail.flatten()]))[0, 1] > 0.8


def test_wavelet_fix_is_output_detail_plus_reference_coarse_layers():
    """StableSR's definition, with its dilated 3x3 convolutions, which the engine computes more cheaply."""
    kernel = (torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16).expand(3, 1, 3, 3)

    def split(image):
        blurred = image
        for level in range(5):
            padded = F.pad(blurred, (2**level,) * 4, mode="replicate")
            blurred = F.conv2d(padded, kernel, dilation=2**level, groups=3)
        return image - blurred, blurred

    output, reference = (pil_to_tensor(make_test_image(75, 53, seed=seed)) for seed in (1, 2))
    expected = (split(output)[0] + split(reference)[1]).clamp(0, 1)
    assert (color_fix(output, reference, "wavelet") - expected).abs().max() < 1e-5


@pytest.mark.parametrize("wrap", [False, True])
def test_wavelet_fix_in_stripes_equals_the_whole_image_at_once(monkeypatch, wrap):
    from clarity.engine import postprocess

    output, reference = (pil_to_tensor(make_test_image(64, 150, seed=seed)) for seed in (3, 4))
    whole = color_fix(output, reference, "wavelet", wrap=wrap)  # 150 rows: one stripe
    monkeypatch.setattr(postprocess, "COLOR_FIX_STRIPE", 40)  # 4 stripes, one shorter than its context
    assert (color_fix(output, reference, "wavelet", wrap=wrap) - whole).abs().max() < 1e-6


def test_engine_applies_the_colour_fix(upscaler, image):
    pre_upscaled = image.resize((80, 64), Image.Resampling.LANCZOS)
    strong = {"num_inference_steps": 10, "creativity": 0.9}
    drifted = upscaler.upscale(image, color_fix="none", **strong).image
    wavelet = upscaler.upscale(image, color_fix="wavelet", **strong).image
    # The coarse layout (local colours) follows the input. Channel means are not compared: the
    # tiny model's "detail" is strong noise, which clipping to [0, 1] biases.
    wavelet_error = (coarse(wavelet) - coarse(pre_upscaled)).abs().mean()
    assert wavelet_error < 0.5 * (coarse(drifted) - coarse(pre_upscaled)).abs().mean()


def test_colour_fix_keeps_the_added_detail(upscaler, image):
    pre_upscaled = pil_to_tensor(image.resize((80, 64), Image.Resampling.LANCZOS))
    fixed = pil_to_tensor(upscaler.upscale(image, color_fix="wavelet", **FAST).image)
    assert (fixed - pre_upscaled).abs().mean() > 0.01  # not simply the input again


def test_wavelet_fix_of_an_image_with_itself_is_the_identity():
    image = pil_to_tensor(make_test_image(64, 48))
    assert torch.allclose(color_fix(image, image, "wavelet"), image, atol=1e-5)


def test_sharpen_applies_the_originals_kernel(upscaler, image):
    plain = upscaler.upscale(image, creativity=0.0).image
    sharpened = upscaler.upscale(image, creativity=0.0, sharpen=5).image
    # The kernel written out independently: off-centre -0.5, centre 1 + 8 * 0.5 = 5.
    source = np.asarray(plain, dtype=np.float64)
    padded = np.pad(source, ((1, 1), (1, 1), (0, 0)), mode="edge")
    expected = 5 * source
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                expected -= 0.5 * padded[1 + dy:1 + dy + source.shape[0], 1 + dx:1 + dx + source.shape[1]]
    expected = np.clip(np.round(expected), 0, 255)
    inner = (slice(1, -1), slice(1, -1))  # Pillow treats the one-pixel border its own way
    assert np.abs(np.asarray(sharpened, dtype=np.float64)[inner] - expected[inner]).max() <= 1
    assert sharpen(plain, 0) is plain


def test_downscaling_shrinks_large_inputs_first(upscaler):
    large = make_test_image(100, 50)
    result = upscaler.upscale(large, downscaling=True, downscaling_resolution=64, **FAST)
    assert result.image.size == (128, 64)
    assert result.stats.passes[0].input_size == (64, 32)
    small = upscaler.upscale(make_test_image(40, 20), downscaling=True, downscaling_resolution=64, **FAST)
    assert small.image.size == (80, 40)  # already small enough: untouched


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("1", True), ("no", False)])
def test_switches_parse_from_text(text, value):
    assert UpscaleParams.from_strings({"downscaling": text}).downscaling is value


def test_switch_rejects_other_values():
    with pytest.raises(ParamError, match="expected true or false") as caught:
        UpscaleParams.from_strings({"downscaling": "maybe"})
    assert caught.value.param == "downscaling"
    with pytest.raises(ParamError) as caught:
        UpscaleParams(downscaling=1)
    assert caught.value.param == "downscaling"


def _half_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # keep the left half
    return mask


def test_masked_pixels_equal_the_original(upscaler):
    image = make_test_image(64, 32)
    pre_upscaled = np.asarray(image.resize((128, 64), Image.Resampling.LANCZOS), dtype=np.int16)
    result = np.asarray(upscaler.upscale(image, mask=_half_mask((64, 32)), **FAST).image, dtype=np.int16)
    # Away from the softened edge (blur radius 5 around column 64), left is kept, right is new.
    assert np.array_equal(result[:, :48], pre_upscaled[:, :48])
    assert np.abs(result[:, 80:] - pre_upscaled[:, 80:]).mean() > 1


def test_mask_alpha_follows_openai_transparent_means_edit(upscaler):
    image = make_test_image(64, 32)
    rgba = Image.new("RGBA", (64, 32), (0, 0, 0, 0))
    rgba.putalpha(_half_mask((64, 32)))  # opaque left half: keep; transparent right: edit
    via_alpha = upscaler.upscale(image, mask=rgba, **FAST).image
    via_white = upscaler.upscale(image, mask=_half_mask((64, 32)), **FAST).image
    assert np.array_equal(np.asarray(via_alpha), np.asarray(via_white))


def test_mask_of_another_shape_is_refused(upscaler):
    with pytest.raises(ParamError, match="aspect ratio") as caught:
        upscaler.upscale(make_test_image(64, 32), mask=Image.new("L", (32, 32), 255), **FAST)
    assert caught.value.param == "mask"
    with pytest.raises(ParamError) as caught:
        upscaler.upscale(make_test_image(64, 32), mask=b"not an image", **FAST)
    assert caught.value.param == "mask"
