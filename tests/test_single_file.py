"""Single-file checkpoints (original SD key names): every format loads offline, exactly; bad files are clear errors."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from conftest import FAST, make_test_image
from safetensors.torch import load_file, save_file

from clarity.cli import main
from clarity.errors import WeightsError
from clarity.models import single_file, single_file_components
from clarity.models.clip_tokenizers import clip_tokenizer
from clarity.models.loading import ModelSource, check_source, load_components
from clarity.testing import ldm_writer
from clarity.testing.tiny import EXTRA_FILES, FORMATS, SINGLE_FILES, save_tiny_weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model written as single files (the same seed as the `tiny_weights` diffusers folder)."""
    return save_tiny_weights(tmp_path_factory.mktemp("single") / "tiny", formats=("single-file",))


@pytest.fixture(scope="module")
def reference(tiny_weights):
    return load_components(tiny_weights, device="cpu")


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection, and list the attempts (a hub lookup would be one)."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test forbids network access (to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == [], f"network connections were attempted: {attempts}"


def _sources(files):
    return {
        "safetensors": ModelSource(
            base=files / SINGLE_FILES["checkpoint"], controlnet=files / SINGLE_FILES["controlnet"]
        ),
        "pickles": ModelSource(
            base=files / SINGLE_FILES["checkpoint_pickle"], controlnet=files / SINGLE_FILES["controlnet_pickle"]
        ),
    }


def _assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


@pytest.mark.parametrize("kind", ["safetensors", "pickles"])
def test_every_single_file_format_loads_offline_to_the_same_model(files, reference, kind, no_network):
    loaded = load_components(_sources(files)[kind], device="cpu")
    for part in ("unet", "controlnet", "vae", "text_encoder"):
        _assert_same_weights(getattr(loaded, part), getattr(reference, part))
    assert loaded.vae.config.scaling_factor == reference.vae.config.scaling_factor
    assert loaded.tokenizer("a cat, 4k").input_ids == reference.tokenizer("a cat, 4k").input_ids
    assert loaded.is_tiny
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset"):
        assert loaded.scheduler_config[key] == reference.scheduler_config[key]


@pytest.mark.parametrize("kind", ["safetensors", "pickles"])
def test_single_file_model_upscales_exactly_like_the_diffusers_folder(files, upscaler, kind, no_network):
    from clarity import Upscaler

    image = make_test_image(48, 40)
    ours = Upscaler.from_pretrained(_sources(files)[kind], device="cpu").upscale(image, seed=3, **FAST).image
    theirs = upscaler.upscale(image, seed=3, **FAST).image
    assert ours.size == theirs.size == (96, 80)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_overrides_mix_folders_and_single_files(files, tiny_weights, reference, tmp_path, no_network):
    """A diffusers base with a single-file ControlNet and VAE, and a single-file base with a VAE override."""
    mixed = load_components(
        ModelSource(base=tiny_weights, controlnet=files / SINGLE_FILES["controlnet_pickle"],
                    vae=files / SINGLE_FILES["vae"]),
        device="cpu",
    )
    _assert_same_weights(mixed.controlnet, reference.controlnet)
    _assert_same_weights(mixed.vae, reference.vae)
    # A VAE override with the "first_stage_model." prefix, as some VAE files have it.
    prefixed = tmp_path / "vae-prefixed.safetensors"
    vae = load_file(files / SINGLE_FILES["vae"])
    save_file({single_file.VAE_PREFIX + key: value for key, value in vae.items()}, prefixed,
              metadata={single_file.SCALING_FACTOR_KEY: str(reference.vae.config.scaling_factor)})
    loaded = load_components(
        ModelSource(base=files / SINGLE_FILES["checkpoint"], controlnet=tiny_weights / "controlnet", vae=prefixed),
        device="cpu",
    )
    _assert_same_weights(loaded.vae, reference.vae)


def test_written_files_use_the_original_key_names(files):
    checkpoint = load_file(files / SINGLE_FILES["checkpoint"])
    # Key names diffusers itself uses to recognise an SD1.5 checkpoint and its parts.
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in checkpoint
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in checkpoint
    # LDM's VAE attention projections are 1x1 convolutions, diffusers' linear layers.
    assert checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    controlnet = torch.load(files / SINGLE_FILES["controlnet_pickle"], weights_only=True)
    assert "control_model.input_hint_block.14.weight" in controlnet
    assert "control_model.zero_convs.11.0.weight" in controlnet
    assert "control_model.middle_block_out.0.weight" in controlnet


def _meta_model(name: str):
    """A full-size SD1.5 part built from the shipped config on the meta device: real shapes, no memory."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = single_file_components.shipped_config(name)
    with torch.device("meta"):
        if name == "text_encoder":
            return CLIPTextModel(CLIPTextConfig(**config))
        return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "controlnet": ControlNetModel}[name].from_config(
            config
        )


def test_real_sd15_shapes_give_back_the_shipped_configs():
    """The shape-derived fields reproduce SD1.5's own configs, so real checkpoints get SD1.5's models."""
    shipped = single_file_components.shipped_config
    unet = ldm_writer.unet_to_ldm(_meta_model("unet"))
    derived = single_file_components.unet_config(
        {key.removeprefix(single_file.UNET_PREFIX): value for key, value in unet.items()}
    )
    assert {key: derived[key] for key in shipped("unet")} == shipped("unet")
    controlnet = ldm_writer.controlnet_to_ldm(_meta_model("controlnet"))
    derived = single_file_components.controlnet_config(
        {key.removeprefix(single_file.CONTROLNET_PREFIX): value for key, value in controlnet.items()}
    )
    assert {key: derived[key] for key in shipped("controlnet")} == shipped("controlnet")
    derived = single_file_components.vae_config(ldm_writer.vae_to_ldm(_meta_model("vae")), metadata={})
    assert {key: derived[key] for key in shipped("vae")} == shipped("vae")
    text = ldm_writer.text_encoder_to_ldm(_meta_model("text_encoder"))
    derived = single_file_components.text_encoder_config(
        {key.removeprefix(single_file.TEXT_PREFIX): value for key, value in text.items()}, clip_tokenizer()
    )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings"):
        assert derived[key] == shipped("text_encoder")[key]


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        # Published ids of OpenAI's CLIP tokenizer (Bumblebee's test suite, the zer0int/CLIP-tokenizer README).
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("a photo of a dog", [49406, 320, 1125, 539, 320, 1929, 49407]),
        ("a painting of a cat", [49406, 320, 3086, 539, 320, 2368, 49407]),
        ("bozuman", [49406, 647, 4091, 786, 49407]),
    ],
)
def test_shipped_clip_tokenizer_gives_the_real_token_ids(text, ids):
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer(text).input_ids == ids


# --- Errors ------------------------------------------------------------------------------------


def _controlnet(files):
    return files / SINGLE_FILES["controlnet"]


def test_missing_file_is_named(files, tmp_path):
    missing = tmp_path / "juggernaut_reborn.safetensors"
    with pytest.raises(WeightsError, match="juggernaut_reborn.safetensors"):
        load_components(ModelSource(base=missing, controlnet=_controlnet(files)))
    with pytest.raises(WeightsError, match="control_v11f1e_sd15_tile.pth"):
        load_components(ModelSource(base=files / SINGLE_FILES["checkpoint"],
                                    controlnet=tmp_path / "control_v11f1e_sd15_tile.pth"))


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_truncated_file_is_a_clear_error(files, tmp_path, name):
    whole = files / SINGLE_FILES["checkpoint" if name.endswith("safetensors") else "checkpoint_pickle"]
    truncated = tmp_path / name
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(WeightsError, match=rf"{name}.*(truncated or corrupt)"):
        load_components(ModelSource(base=truncated, controlnet=_controlnet(files)), device="cpu")


def test_corrupt_override_is_caught_before_loading(tiny_weights, tmp_path):
    """The server's start-up check reads safetensors headers, so a bad VAE file stops it at once."""
    corrupt = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WeightsError, match="vae-ft-mse-840000-ema-pruned.safetensors is not a readable safetensors"):
        check_source(ModelSource(base=tiny_weights, vae=corrupt))


def test_checkpoint_needing_full_unpickling_is_refused(files, tmp_path):
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "optimizer": np.dtype("float32")}, unsafe)  # an object weights_only refuses
    with pytest.raises(WeightsError, match=r"unsafe.ckpt needs full unpickling.*\.safetensors"):
        load_components(ModelSource(base=unsafe, controlnet=_controlnet(files)), device="cpu")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (8, 4),
          "model.diffusion_model.label_emb.0.0.weight": (4, 4)}, "SDXL"),
        ({"cond_stage_model.model.token_embedding.weight": (8, 4)}, "SD2"),
        ({"some.random.tensor": (3,)}, "not an SD1.5 checkpoint"),
    ],
)
def test_foreign_checkpoint_is_recognised_from_its_keys(files, tmp_path, keys, message):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, path)
    with pytest.raises(WeightsError, match=rf"other.safetensors.*{message}"):
        check_source(ModelSource(base=path, controlnet=_controlnet(files)))


def test_unet_only_checkpoint_says_what_to_add(files, tmp_path):
    checkpoint = load_file(files / SINGLE_FILES["checkpoint"])
    no_vae = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in checkpoint.items() if not k.startswith(single_file.VAE_PREFIX)}, no_vae)
    with pytest.raises(WeightsError, match="no-vae.safetensors has no VAE.*override"):
        load_components(ModelSource(base=no_vae, controlnet=_controlnet(files)))
    # With the VAE override it suggests, it loads.
    load_components(ModelSource(base=no_vae, controlnet=_controlnet(files), vae=files / SINGLE_FILES["vae"]),
                    device="cpu")
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in checkpoint.items() if k.startswith(single_file.UNET_PREFIX)}, unet_only)
    with pytest.raises(WeightsError, match="unet-only.safetensors has no CLIP text encoder"):
        load_components(ModelSource(base=unet_only, controlnet=_controlnet(files), vae=files / SINGLE_FILES["vae"]))


def test_wrong_part_or_damaged_structure_is_named(files, tmp_path):
    with pytest.raises(WeightsError, match="ControlNet"):
        load_components(ModelSource(base=files / SINGLE_FILES["checkpoint"]))
    with pytest.raises(WeightsError, match="tiny-vae.safetensors is not an SD1.5 ControlNet"):
        load_components(ModelSource(base=files / SINGLE_FILES["checkpoint"], controlnet=files / SINGLE_FILES["vae"]))
    checkpoint = load_file(files / SINGLE_FILES["checkpoint"])
    del checkpoint["model.diffusion_model.middle_block.1.proj_out.weight"]
    damaged = tmp_path / "damaged.safetensors"
    save_file(checkpoint, damaged)
    with pytest.raises(WeightsError, match="damaged.safetensors: its UNet does not have SD1.5's structure"):
        load_components(ModelSource(base=damaged, controlnet=_controlnet(files)), device="cpu")


def test_weights_tiny_command_writes_every_format(tmp_path):
    assert main(["weights", "tiny", str(tmp_path / "tiny"), "--format", "all"]) == 0
    for name in SINGLE_FILES.values():
        assert (tmp_path / "tiny" / name).is_file()
    assert (tmp_path / "tiny" / "unet" / "config.json").is_file()
    for name in EXTRA_FILES.values():
        assert (tmp_path / "tiny" / name).exists()
    assert set(FORMATS) == {"diffusers", "single-file", "extras"}
