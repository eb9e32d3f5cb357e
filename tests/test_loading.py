"""Loading weights from disk: the tiny model round-trips; broken folders are clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from clarity.errors import WeightsError
from clarity.models.loading import ModelSource, load_components
from clarity.testing.tiny import build_tiny_pipeline


def test_saved_tiny_model_loads_back_identically(tiny_weights):
    loaded = load_components(tiny_weights, device="cpu")
    built = build_tiny_pipeline()
    assert loaded.is_tiny
    torch.manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        ours = loaded.unet(latents, 10, encoder_hidden_states=text).sample
        theirs = built.unet(latents, 10, encoder_hidden_states=text).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert loaded.tokenizer("a cat").input_ids == built.tokenizer("a cat").input_ids
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"


def test_missing_folder_says_how_to_fix_it(tmp_path):
    with pytest.raises(WeightsError, match="clarity weights tiny"):
        load_components(tmp_path / "nowhere")


def test_incomplete_folder_names_the_missing_part(tiny_weights, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_weights, partial)
    shutil.rmtree(partial / "controlnet")
    with pytest.raises(WeightsError, match="controlnet/"):
        load_components(partial)


def test_corrupt_file_names_the_part(tiny_weights, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_weights, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="could not load vae"):
        load_components(broken)


def test_controlnet_and_vae_can_come_from_elsewhere(tiny_weights, tmp_path):
    """A ModelSource takes the ControlNet and VAE from other folders: the base then needs neither."""
    base = tmp_path / "base"
    shutil.copytree(tiny_weights, base, ignore=shutil.ignore_patterns("controlnet", "vae"))
    source = ModelSource(base=base, controlnet=tiny_weights / "controlnet", vae=tiny_weights / "vae")
    loaded = load_components(source, device="cpu")
    reference = load_components(tiny_weights, device="cpu")
    for name in ("controlnet", "vae"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(WeightsError, match="controlnet"):
        load_components(ModelSource(base=base), device="cpu")
