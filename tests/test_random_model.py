"""The full-size random model (clarity/testing/random_sd15.py): SD1.5's real topology, and marked as meaningless.

Its weights are ~5.5 GB and take minutes to write, so they are never materialised here: each
component is built on the `meta` device (shapes, no storage) and checked against SD1.5's known
sizes. That it writes, loads and runs is checked by hand (see the random-model branch's report).
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from clarity.models.markers import RANDOM_MARKER, TINY_MARKER
from clarity.testing import random_sd15

#: SD1.5's published parameter counts: UNet, ControlNet (v1.1 tile), VAE, CLIP ViT-L/14 text encoder.
SD15_PARAMETERS = {"unet": 859.52e6, "controlnet": 361.28e6, "vae": 83.65e6, "text_encoder": 123.06e6}


def build_on_meta(name: str) -> torch.nn.Module:
    """Component `name` of the random model, built without allocating its weights."""
    build, _ = random_sd15.COMPONENTS[name]
    with torch.device("meta"):
        return build(0)


@pytest.mark.parametrize("name", sorted(SD15_PARAMETERS))
def test_each_component_has_sd15s_parameter_count(name):
    parameters = sum(parameter.numel() for parameter in build_on_meta(name).parameters())
    assert parameters == pytest.approx(SD15_PARAMETERS[name], rel=0.01)


def test_the_widths_are_sd15s():
    assert list(build_on_meta("unet").config.block_out_channels) == [320, 640, 1280, 1280]
    assert list(build_on_meta("controlnet").config.block_out_channels) == [320, 640, 1280, 1280]
    assert list(build_on_meta("vae").config.block_out_channels) == [128, 256, 512, 512]
    text_config = build_on_meta("text_encoder").config
    assert (text_config.hidden_size, text_config.num_hidden_layers, text_config.vocab_size) == (768, 12, 49408)


def test_a_model_with_the_random_marker_is_named_as_such(tiny_weights, tmp_path, caplog):
    """Checked on a copy of the tiny model marked as the random one: the marker is all that is read."""
    from clarity import Upscaler
    from clarity.models.catalogue import Catalogue
    from clarity.models.inspection import inspect_weights

    marked = shutil.copytree(tiny_weights, tmp_path / "random")
    (marked / TINY_MARKER).unlink()
    (marked / RANDOM_MARKER).write_text(random_sd15.MARKER_TEXT)
    catalogue = Catalogue.discover(marked)
    assert catalogue.is_random(catalogue.default_model) and not catalogue.is_tiny(catalogue.default_model)
    assert "full-size random model" in inspect_weights(catalogue)[0].notes
    with caplog.at_level(logging.WARNING, logger="clarity.engine.upscaler"):
        Upscaler.from_pretrained(marked, device="cpu", name="random-test")
    warnings = [record.getMessage() for record in caplog.records if record.name == "clarity.engine.upscaler"]
    assert warnings == [
        "model random-test is a full-size random model: its outputs have no meaningful detail (for benchmarks)"
    ]
