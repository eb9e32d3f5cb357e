"""The weights catalogue: one model folder or a root of several, what `clarity weights list` reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_test_image
from safetensors.torch import save_file

from clarity.cli import main
from clarity.errors import ParamError, WeightsError
from clarity.models.catalogue import Catalogue, upscaler_kwargs
from clarity.models.inspection import inspect_weights
from clarity.models.loading import ModelSource

#: The parts of a model folder that are the checkpoint itself (no ControlNet, no VAE).
CHECKPOINT_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture(scope="module")
def root(tiny_weights, tmp_path_factory):
    """A root: the tiny model linked in twice, a bare checkpoint using the shared parts, a LoRA."""
    root = tmp_path_factory.mktemp("root")
    models = root / "models"
    models.mkdir()
    (models / "clarity-upscaler").symlink_to(tiny_weights)
    (models / "b").symlink_to(tiny_weights)
    (models / "shared").mkdir()
    for part in CHECKPOINT_PARTS:
        (models / "shared" / part).symlink_to(tiny_weights / part)
    (root / "controlnet").symlink_to(tiny_weights / "controlnet")
    (root / "vae").symlink_to(tiny_weights / "vae")
    (root / "loras").mkdir()
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, root / "loras" / "more_details.safetensors")
    return root


def copy_model(tiny_weights, path):
    """A real copy of the tiny model (not a link), safe to break."""
    shutil.copytree(tiny_weights, path)
    return path


def test_a_model_folder_is_one_model_named_clarity_upscaler(tiny_weights):
    catalogue = Catalogue.discover(tiny_weights)
    assert catalogue.single_model
    assert catalogue.models == {"clarity-upscaler": ModelSource(base=tiny_weights)}
    assert catalogue.default_model == "clarity-upscaler"
    assert catalogue.loras is None and catalogue.upscalers is None
    assert upscaler_kwargs(catalogue, "clarity-upscaler")["path"] == ModelSource(base=tiny_weights)


def test_a_model_folder_may_hold_its_extras(tiny_weights, tmp_path):
    """`clarity weights tiny --format extras` puts a LoRA, an embedding, an ESRGAN and a checker beside the model."""
    from clarity.testing.tiny import save_tiny_weights

    folder = copy_model(tiny_weights, tmp_path / "tiny")
    save_tiny_weights(folder, formats=("extras",))
    kwargs = upscaler_kwargs(Catalogue.discover(folder), "clarity-upscaler")
    assert kwargs["lora_dir"] == folder / "loras" and kwargs["upscalers_dir"] == folder / "upscalers"
    assert kwargs["embeddings_dir"] == folder / "embeddings"
    assert kwargs["safety_checker_dir"] == folder / "safety_checker"
    entries = inspect_weights(Catalogue.discover(folder))
    assert {entry.kind for entry in entries} >= {"model", "lora", "embedding", "upscaler"}
    assert all(entry.ok for entry in entries), [entry.problem for entry in entries]


def test_a_root_lists_every_model_with_the_shared_parts(root):
    catalogue = Catalogue.discover(root)
    assert list(catalogue.models) == ["b", "clarity-upscaler", "shared"]
    assert catalogue.default_model == "clarity-upscaler"
    # A model folder's own ControlNet wins; the shared VAE replaces every model's own.
    assert catalogue.source("b") == ModelSource(base=root / "models" / "b", vae=root / "vae")
    assert catalogue.source("shared") == ModelSource(base=root / "models" / "shared", controlnet=root / "controlnet",
                                                     vae=root / "vae")
    assert catalogue.loras == root / "loras" and catalogue.embeddings is None


def test_models_and_default_model_select(root):
    only = Catalogue.discover(root, models=["shared", "b"])
    assert list(only.models) == ["shared", "b"] and only.default_model == "shared"
    assert Catalogue.discover(root, default_model="b").default_model == "b"
    with pytest.raises(ParamError, match="models: no model 'nope'.*available: b, clarity-upscaler, shared"):
        Catalogue.discover(root, models=["nope"])
    with pytest.raises(ParamError, match="default_model"):
        Catalogue.discover(root, models=["b"], default_model="shared")
    with pytest.raises(ParamError, match="model: no model 'x'"):
        Catalogue.discover(root).model_id("x")


def test_without_clarity_upscaler_the_first_model_is_the_default(tiny_weights, tmp_path):
    (tmp_path / "models").mkdir()
    for name in ("zeta", "alpha"):
        (tmp_path / "models" / name).symlink_to(tiny_weights)
    assert Catalogue.discover(tmp_path).default_model == "alpha"


@pytest.mark.parametrize(("name", "suggestion"), [("Juggernaut Reborn.safetensors", "juggernaut-reborn.safetensors"),
                                                  ("_epic", "epic")])
def test_badly_named_models_are_refused_with_a_valid_name(tmp_path, name, suggestion):
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / name
    path.write_bytes(b"") if path.suffix else path.mkdir()
    with pytest.raises(WeightsError, match=f"rename the (file|folder) to {suggestion}"):
        Catalogue.discover(tmp_path)


def test_missing_and_empty_weights_say_what_to_do(tiny_weights, tmp_path):
    with pytest.raises(WeightsError, match="clarity weights tiny"):
        Catalogue.discover(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="clarity weights download"):
        Catalogue.discover(tmp_path)
    # The layout before roots: a model folder directly inside.
    (tmp_path / "clarity-upscaler").symlink_to(tiny_weights)
    with pytest.raises(WeightsError, match=f"pass --weights {tmp_path / 'clarity-upscaler'}, or move it"):
        Catalogue.discover(tmp_path)


def test_weights_list_shows_everything_usable(root, capsys):
    assert main(["weights", "list", "--weights", str(root)]) == 0
    out = capsys.readouterr().out
    for row in ("model  clarity-upscaler", "controlnet  controlnet", "lora  loras/more_details.safetensors"):
        assert " ".join(row.split()) in " ".join(out.split())
    assert "ok (default, tiny test model)" in out


def test_weights_list_reports_broken_files_and_fails(tiny_weights, tmp_path, capsys):
    (tmp_path / "models").mkdir()
    bad_header = copy_model(tiny_weights, tmp_path / "models" / "bad-header")
    (bad_header / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08not a safetensors file")
    wrong_file = copy_model(tiny_weights, tmp_path / "models" / "wrong-file")
    shutil.copy(tiny_weights / "vae" / "diffusion_pytorch_model.safetensors",
                wrong_file / "controlnet" / "diffusion_pytorch_model.safetensors")
    no_tokenizer = copy_model(tiny_weights, tmp_path / "models" / "no-tokenizer")
    (no_tokenizer / "tokenizer" / "tokenizer.json").unlink()
    (tmp_path / "loras").mkdir()
    save_file({"unet.conv_in.weight": torch.zeros(1)}, tmp_path / "loras" / "not-a-lora.safetensors")

    entries = {entry.name: entry for entry in inspect_weights(Catalogue.discover(tmp_path))}
    assert "not a readable safetensors file" in entries["bad-header"].problem
    assert "does not look like a controlnet" in entries["wrong-file"].problem
    assert "tokenizer" in entries["no-tokenizer"].problem
    assert "no LoRA tensors" in entries["loras/not-a-lora.safetensors"].problem
    assert main(["weights", "list", "--weights", str(tmp_path)]) == 1
    assert "bad-header" in capsys.readouterr().err


def test_check_loads_what_headers_cannot_tell(tiny_weights, tmp_path):
    """A config that does not fit its weights passes the cheap checks; only loading finds it."""
    model = copy_model(tiny_weights, tmp_path / "models" / "misfit")
    config_path = model / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    config_path.write_text(json.dumps(config))
    catalogue = Catalogue.discover(tmp_path)
    assert inspect_weights(catalogue)[0].ok
    checked = inspect_weights(catalogue, load=True)[0]
    assert not checked.ok and "could not load unet" in checked.problem
    assert main(["weights", "list", "--weights", str(tmp_path), "--check"]) == 1


def test_single_file_checkpoints_are_listed(root, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "controlnet").symlink_to(root / "controlnet")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
              tmp_path / "models" / "juggernaut.safetensors")
    (tmp_path / "models" / "corrupt.safetensors").write_bytes(b"junk")
    (tmp_path / "models" / "epicrealism.ckpt").write_bytes(b"pickle")
    catalogue = Catalogue.discover(tmp_path)
    assert list(catalogue.models) == ["corrupt", "epicrealism", "juggernaut"]
    assert catalogue.source("juggernaut") == ModelSource(base=tmp_path / "models" / "juggernaut.safetensors",
                                                         controlnet=tmp_path / "controlnet")
    entries = {entry.name: entry for entry in inspect_weights(catalogue)}
    # One tensor with a checkpoint's name is no checkpoint: the loader's own check says so.
    assert "juggernaut.safetensors" in entries["juggernaut"].problem
    assert "not a readable safetensors file" in entries["corrupt"].problem


def test_upscale_picks_the_model_by_id(root, tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(16, 16).save(source)
    common = ["upscale", str(source), "-o", str(tmp_path / "out.png"), "--weights", str(root), "--steps", "2",
              "--creativity", "0.5"]
    assert main([*common, "--model", "shared"]) == 0
    assert (tmp_path / "out.png").exists()
    assert main([*common, "--model", "juggernaut"]) == 2
    assert "model: no model 'juggernaut'" in capsys.readouterr().err


def test_extras_beside_a_model_reach_the_engine(tiny_weights, tmp_path):
    """The catalogue's folders are the ones prompts, `upscaler` and the safety checker use."""
    from clarity import Upscaler
    from clarity.testing.tiny import save_tiny_weights

    folder = copy_model(tiny_weights, tmp_path / "tiny")
    save_tiny_weights(folder, formats=("extras",))
    upscaler = Upscaler.from_pretrained(**upscaler_kwargs(Catalogue.discover(folder), "clarity-upscaler"),
                                        device="cpu")
    image = make_test_image(24, 16)
    settings = {"num_inference_steps": 2, "creativity": 0.5}
    plain = upscaler.upscale(image, **settings)
    extras = upscaler.upscale(image, prompt="<lora:tiny-detail:1>", negative_prompt="tiny-negative",
                              upscaler="tiny-esrgan-4x", enable_safety_checker=True, **settings)
    assert extras.stats.passes[0].loras and extras.stats.passes[0].embeddings
    assert extras.stats.pre_upscaler == "tiny-esrgan-4x"
    assert np.abs(np.asarray(plain.image, float) - np.asarray(extras.image, float)).mean() > 1
