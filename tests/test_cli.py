"""The `clarity` command as a user runs it."""

from __future__ import annotations

from conftest import make_test_image
from PIL import Image

from clarity.cli import main


def test_upscale_writes_the_image_at_the_requested_scale(tiny_weights, tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(30, 20).save(source)
    target = tmp_path / "out" / "result.jpg"
    code = main(["upscale", str(source), "-o", str(target), "--weights", str(tiny_weights), "--scale", "3",
                 "--steps", "4", "--creativity", "0.5", "--seed", "9", "--quality", "80"])
    assert code == 0
    with Image.open(target) as result:
        assert (result.format, result.size) == ("JPEG", (90, 60))
    out = capsys.readouterr()
    assert "seed 9" in out.out and "2 pass(es)" in out.out
    assert "tiny test model" in out.err


def test_bad_parameter_is_reported_by_name(tiny_weights, tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(16, 16).save(source)
    code = main(["upscale", str(source), "-o", str(tmp_path / "o.png"), "--weights", str(tiny_weights),
                 "--creativity", "1.5"])
    assert code == 2
    assert "creativity: must be <= 1" in capsys.readouterr().err


def test_unknown_output_extension_fails_before_any_work(tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(16, 16).save(source)
    assert main(["upscale", str(source), "-o", str(tmp_path / "o.xyz"), "--weights", str(tmp_path)]) == 2
    assert "output" in capsys.readouterr().err


def test_missing_weights_point_to_the_fix(tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(16, 16).save(source)
    assert main(["upscale", str(source), "-o", str(tmp_path / "o.png"), "--weights", str(tmp_path / "none")]) == 1
    assert "clarity weights tiny" in capsys.readouterr().err


def test_weights_tiny_writes_a_loadable_model(tmp_path):
    assert main(["weights", "tiny", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "controlnet" / "config.json").exists()
    assert (tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_mask_option_keeps_the_white_area(tiny_weights, tmp_path):
    source, mask, target = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    image = make_test_image(24, 16)
    image.save(source)
    Image.new("L", (24, 16), 255).save(mask)
    assert main(["upscale", str(source), "-o", str(target), "--weights", str(tiny_weights),
                 "--mask", str(mask), "--steps", "4", "--creativity", "0.5"]) == 0
    with Image.open(target) as result:
        assert result.tobytes() == image.resize((48, 32), Image.Resampling.LANCZOS).tobytes()
