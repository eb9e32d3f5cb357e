"""UpscaleParams: the original's defaults, validation that names the field, text parsing."""

from __future__ import annotations

import pytest

from clarity.errors import ParamError
from clarity.params import UpscaleParams, param_fields


def test_defaults_follow_the_original_clarity_upscaler():
    params = UpscaleParams()
    assert (params.scale_factor, params.creativity, params.resemblance, params.dynamic) == (2.0, 0.35, 0.6, 6.0)
    assert (params.num_inference_steps, params.seed, params.scheduler) == (18, 1337, "DPM++ 3M SDE Karras")
    assert (params.tiling_width, params.tiling_height, params.multistep_factor) == (112, 144, 0.8)
    assert params.controlnet_decay == 0.825


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("creativity", 1.5),
        ("creativity", -0.1),
        ("resemblance", 3.5),
        ("dynamic", 0.5),
        ("scale_factor", 17),
        ("scale_factor", 0.5),
        ("num_inference_steps", 0),
        ("num_inference_steps", 2.5),
        ("seed", -1),
        ("tiling_width", 8),
        ("scheduler", "DPM++ 9M"),
        ("scale_factor", True),
        ("creativity", "0.5"),
        ("prompt", 3),
        ("creativity", float("nan")),
        ("scale_factor", None),
    ],
)
def test_invalid_values_raise_an_error_naming_the_field(field, value):
    with pytest.raises(ParamError) as caught:
        UpscaleParams(**{field: value})
    assert caught.value.param == field
    assert field in str(caught.value)


def test_overlap_must_leave_room_in_the_tile():
    with pytest.raises(ParamError) as caught:
        UpscaleParams(tiling_width=16, tiling_height=16, tile_overlap=12)
    assert caught.value.param == "tile_overlap"


def test_integers_are_accepted_for_float_fields_and_normalised():
    params = UpscaleParams(scale_factor=4, dynamic=7)
    assert params.scale_factor == 4.0 and isinstance(params.scale_factor, float)


def test_from_strings_parses_form_text():
    params = UpscaleParams.from_strings(
        {"scale_factor": "3", "creativity": "0.5", "num_inference_steps": "10", "seed": "42", "prompt": ""}
    )
    assert (params.scale_factor, params.creativity, params.num_inference_steps, params.seed) == (3.0, 0.5, 10, 42)
    assert params.prompt == ""
    assert UpscaleParams.from_strings({"seed": "random"}).seed is None
    assert UpscaleParams.from_strings({"creativity": ""}).creativity == 0.35


@pytest.mark.parametrize(
    ("values", "field", "text"),
    [
        ({"creativty": "0.5"}, "creativty", "did you mean 'creativity'"),
        ({"num_inference_steps": "ten"}, "num_inference_steps", "expected an integer"),
        ({"num_inference_steps": "2.5"}, "num_inference_steps", "expected an integer"),
        ({"creativity": "lots"}, "creativity", "expected a number"),
    ],
)
def test_from_strings_errors_name_the_field(values, field, text):
    with pytest.raises(ParamError) as caught:
        UpscaleParams.from_strings(values)
    assert caught.value.param == field
    assert text in str(caught.value)


@pytest.mark.parametrize("text", ["\u0663", "1_000", "nan", "inf", "1e3", "0x10", " "])
def test_numbers_must_be_plain_ascii_decimals(text):
    for name in ("seed", "num_inference_steps", "creativity"):
        with pytest.raises(ParamError) as caught:
            UpscaleParams.from_strings({name: text})
        assert caught.value.param == name


def test_limits_and_values_print_as_people_write_them():
    with pytest.raises(ParamError, match=r"must be <= 4294967295, got 9{40}\.\.\. \(60 digits\)"):
        UpscaleParams.from_strings({"seed": "9" * 60})
    with pytest.raises(ParamError, match=r"must be <= 1, got 1\.5$"):
        UpscaleParams(creativity=1.5)


def test_replace_validates_and_rejects_unknown_names():
    assert UpscaleParams().replace(creativity=0.1).creativity == 0.1
    with pytest.raises(ParamError, match="creativity"):
        UpscaleParams().replace(creativity=9)
    with pytest.raises(ParamError, match="did you mean 'seed'"):
        UpscaleParams().replace(seeds=3)


def test_every_field_documents_itself():
    for f in param_fields():
        assert f.metadata["help"], f.name
