"""ESRGAN-family pre-upscalers: both checkpoint layouts, tiling, exact sizes, clear errors, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clarity import Upscaler
from clarity.engine.esrgan import ESRGANPreUpscaler, RRDBNet, RRDBNetShape, load_esrgan
from clarity.engine.preupscale import PreUpscalerRegistry
from clarity.errors import ParamError, WeightsError
from clarity.testing.fixtures import save_tiny_esrgan
from tests.conftest import FAST, make_test_image


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize("scale", [2, 4])
def test_old_and_new_key_layouts_load_as_the_same_network(tmp_path, scale):
    old = load_esrgan(save_tiny_esrgan(tmp_path / "old.pth", scale=scale, layout="old"))
    new = load_esrgan(save_tiny_esrgan(tmp_path / "new.pth", scale=scale, layout="new"))  # under params_ema
    safetensors = load_esrgan(save_tiny_esrgan(tmp_path / "st.safetensors", scale=scale, layout="old"))
    assert old.scale == new.scale == safetensors.scale == scale
    assert old.shape.blocks == 1 and old.shape.features == 8 and old.shape.grow_channels == 4
    image = make_test_image(24, 20)
    outputs = [ESRGANPreUpscaler(model, "m").run_model(image) for model in (old, new, safetensors)]
    assert all(out.size == (24 * scale, 20 * scale) for out in outputs)
    # Same seed, same weights under other names: identical pixels.
    assert np.array_equal(_array(outputs[0]), _array(outputs[1]))
    assert np.array_equal(_array(outputs[0]), _array(outputs[2]))
    # And the output is an upscale of the input, not noise: shrunk back, it is close to it.
    shrunk = outputs[0].resize(image.size, Image.Resampling.BOX)
    assert np.abs(_array(shrunk) - _array(image)).mean() < 25


def test_real_esrgan_x2_pixel_unshuffle_layout(tmp_path):
    # RealESRGAN_x2plus: a 4x body on a pixel-unshuffled input (12 channels in).
    shape = RRDBNetShape(12, 3, features=8, grow_channels=4, blocks=2, upsamplings=2, unshuffle=2)
    torch.save({"params_ema": RRDBNet(shape).state_dict()}, tmp_path / "x2plus.pth")
    model = load_esrgan(tmp_path / "x2plus.pth")
    assert model.shape == shape and model.scale == 2
    assert ESRGANPreUpscaler(model, "x2", tile=16).run_model(make_test_image(33, 21)).size == (66, 42)


def test_tiled_matches_untiled(tmp_path):
    model = load_esrgan(save_tiny_esrgan(tmp_path / "m.pth", scale=4))
    image = make_test_image(90, 70)
    tiled = _array(ESRGANPreUpscaler(model, "m", tile=32, context=16).run_model(image))
    whole = _array(ESRGANPreUpscaler(model, "m", tile=4096).run_model(image))
    # 9 tiles of 32 px with 16 px of context: differences stay within 1 level of 255.
    assert np.abs(tiled - whole).max() <= 1
    assert np.abs(tiled - whole).mean() < 0.01
    # Without context the tile borders show: the context is what makes tiling invisible.
    seams = _array(ESRGANPreUpscaler(model, "m", tile=32, context=0).run_model(image))
    assert np.abs(seams - whole).max() > 1


@pytest.mark.parametrize("size", [(74, 46), (111, 69), (37, 23), (150, 93)])
def test_output_has_exactly_the_requested_size(tmp_path, size):
    model = load_esrgan(save_tiny_esrgan(tmp_path / "m.pth", scale=4))
    image = make_test_image(37, 23)
    assert ESRGANPreUpscaler(model, "m")(image, size).size == size


def test_a_4x_model_in_a_2x_pass_is_run_once_then_downscaled(tmp_path):
    pre = ESRGANPreUpscaler(load_esrgan(save_tiny_esrgan(tmp_path / "m.pth", scale=4)), "m")
    image = make_test_image(30, 20)
    expected = pre.run_model(image).resize((60, 40), Image.Resampling.LANCZOS)
    assert np.array_equal(_array(pre(image, (60, 40))), _array(expected))


def test_unknown_name_lists_what_is_available_and_names_the_parameter(tmp_path):
    save_tiny_esrgan(tmp_path / "4x-Tiny.pth")
    registry = PreUpscalerRegistry(tmp_path)
    assert registry.names() == ["lanczos", "4x-Tiny"]
    with pytest.raises(ParamError) as caught:
        registry.get("4x-UltraSharp")
    assert caught.value.param == "upscaler"
    assert "available: lanczos, 4x-Tiny" in str(caught.value)
    with pytest.raises(ParamError, match="no upscalers folder"):
        PreUpscalerRegistry(None).get("4x-Tiny")


def test_names_cannot_reach_outside_the_folder(tmp_path):
    folder = tmp_path / "upscalers"
    folder.mkdir()
    save_tiny_esrgan(tmp_path / "outside.pth")
    registry = PreUpscalerRegistry(folder)
    for name in ("../outside", str(tmp_path / "outside"), "../outside.pth"):
        with pytest.raises(ParamError):
            registry.get(name)


def test_models_are_loaded_once(tmp_path):
    save_tiny_esrgan(tmp_path / "m.pth")
    registry = PreUpscalerRegistry(tmp_path)
    assert registry.get("m") is registry.get("m")


def test_corrupt_and_foreign_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "foreign.pth")
    for name in ("garbage.pth", "garbage.safetensors", "foreign.pth"):
        with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
            load_esrgan(tmp_path / name)
    registry = PreUpscalerRegistry(tmp_path)
    with pytest.raises(WeightsError, match="foreign"):
        registry.get("foreign")


class _Payload:
    """Not a tensor: unpickling it would run code of the file's choosing."""


def test_pickled_objects_are_never_unpickled(tmp_path):
    torch.save({"model.0.weight": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"evil\.pth"):
        load_esrgan(tmp_path / "evil.pth")


def test_end_to_end_upscale_with_a_model_differs_from_lanczos(upscaler, tmp_path):
    save_tiny_esrgan(tmp_path / "4x-Tiny.pth")
    with_models = Upscaler(upscaler.pipeline, upscalers_dir=tmp_path)
    image = make_test_image(48, 40)
    # creativity 0 returns the pre-upscaled image itself: what the model made, exactly.
    plain = with_models.upscale(image, creativity=0.0)
    tiny = with_models.upscale(image, creativity=0.0, upscaler="4x-Tiny")
    expected = with_models.pre_upscalers.get("4x-Tiny")(image, (96, 80))
    assert tiny.image.size == plain.image.size == (96, 80)
    assert np.array_equal(_array(tiny.image), _array(expected))
    assert np.abs(_array(tiny.image) - _array(plain.image)).mean() > 1
    assert tiny.stats.pre_upscaler == "4x-Tiny" and plain.stats.pre_upscaler == "lanczos"
    # And through diffusion, the pre-upscaler still shows in the result.
    denoised = with_models.upscale(image, upscaler="4x-Tiny", **FAST)
    assert not np.array_equal(_array(denoised.image), _array(upscaler.upscale(image, **FAST).image))


def test_unknown_upscaler_fails_before_any_work(upscaler):
    with pytest.raises(ParamError) as caught:
        upscaler.upscale(make_test_image(32, 32), upscaler="4x-UltraSharp")
    assert caught.value.param == "upscaler"
    assert "available: lanczos" in caught.value.message
