"""`clarity weights download`: the plan, checksums and resuming, without a network; offline, a fast clear failure."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clarity.cli import main
from clarity.models import download as dl

#: Files of the hub repositories as they are laid out (weights as LFS files, configs as plain git files).
REPOS: dict[str, dict[str, bytes]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {
        "model_index.json": b"{}",
        "v1-5-pruned-emaonly.safetensors": b"full checkpoint",
        "unet/config.json": b'{"unet": 1}',
        "unet/diffusion_pytorch_model.safetensors": b"unet fp32",
        "unet/diffusion_pytorch_model.fp16.safetensors": b"unet fp16",
        "unet/diffusion_pytorch_model.non_ema.safetensors": b"unet non-ema",
        "unet/diffusion_pytorch_model.bin": b"unet pickle",
        "text_encoder/config.json": b"{}",
        "text_encoder/model.safetensors": b"te fp32",
        "text_encoder/model.fp16.safetensors": b"te fp16",
        "tokenizer/merges.txt": b"merges",
        "tokenizer/vocab.json": b"{}",
        "tokenizer/tokenizer_config.json": b"{}",
        "tokenizer/special_tokens_map.json": b"{}",
        "scheduler/scheduler_config.json": b"{}",
        "vae/config.json": b"{}",
        "vae/diffusion_pytorch_model.safetensors": b"sd vae",
        "safety_checker/model.safetensors": b"checker",
        "feature_extractor/preprocessor_config.json": b"{}",
    },
    "lllyasviel/control_v11f1e_sd15_tile": {
        "README.md": b"# tile",
        "images/original.png": b"png",
        "config.json": b'{"controlnet": 1}',
        "diffusion_pytorch_model.safetensors": b"tile fp32",
        "diffusion_pytorch_model.fp16.safetensors": b"tile fp16",
        "diffusion_pytorch_model.bin": b"tile pickle",
    },
    "stabilityai/sd-vae-ft-mse": {
        "config.json": b'{"vae": 1}',
        "diffusion_pytorch_model.safetensors": b"mse vae",
        "diffusion_pytorch_model.bin": b"mse pickle",
    },
    "philz1337x/upscaler": {"4x-UltraSharp.pth": b"esrgan", "4x_foolhardy_Remacri.pth": b"other"},
    "philz1337x/loras": {"more_details.safetensors": b"lora", "SDXLrender_v2.0.safetensors": b"other"},
}


def hub_file(path: str, content: bytes) -> dl.HubFile:
    if path.endswith((".safetensors", ".bin", ".pth")):  # LFS: the hub lists a sha256
        return dl.HubFile(path, len(content), hashlib.sha256(content).hexdigest(), None)
    blob = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
    return dl.HubFile(path, len(content), None, blob)


#: The commit every fake repository is listed at.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_listing(component: dl.Component) -> dl.RepoListing:
    return dl.RepoListing(COMMIT, [hub_file(path, content) for path, content in REPOS[component.repo_id].items()])


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """hf_hub_download replaced by a local one serving REPOS (optionally corrupting one file); calls recorded."""
    calls: list[str] = []
    corrupt: set[str] = set()

    def hf_hub_download(repo_id, filename, *, revision, cache_dir):
        assert revision == COMMIT  # the listed commit, not a branch that may have moved since
        calls.append(f"{repo_id}/{filename}")
        blob = Path(cache_dir) / "blobs" / repo_id / filename
        blob.parent.mkdir(parents=True, exist_ok=True)
        content = REPOS[repo_id][filename]
        blob.write_bytes(content + b"!" if filename in corrupt else content)
        return str(blob)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls, corrupt


def test_the_plan_fetches_only_what_loading_needs(tmp_path):
    planned = dl.plan(tmp_path, dl.components(extras=True), fake_listing)
    where = {str(p.target.relative_to(tmp_path)): f"{p.repo_id}/{p.filename}" for p in planned}
    sd = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert where == {
        "models/clarity-upscaler/unet/config.json": f"{sd}/unet/config.json",
        # The fp16 copy, under the plain name the loader reads.
        "models/clarity-upscaler/unet/diffusion_pytorch_model.safetensors":
            f"{sd}/unet/diffusion_pytorch_model.fp16.safetensors",
        "models/clarity-upscaler/text_encoder/config.json": f"{sd}/text_encoder/config.json",
        "models/clarity-upscaler/text_encoder/model.safetensors": f"{sd}/text_encoder/model.fp16.safetensors",
        "models/clarity-upscaler/tokenizer/merges.txt": f"{sd}/tokenizer/merges.txt",
        "models/clarity-upscaler/tokenizer/vocab.json": f"{sd}/tokenizer/vocab.json",
        "models/clarity-upscaler/tokenizer/tokenizer_config.json": f"{sd}/tokenizer/tokenizer_config.json",
        "models/clarity-upscaler/tokenizer/special_tokens_map.json": f"{sd}/tokenizer/special_tokens_map.json",
        "models/clarity-upscaler/scheduler/scheduler_config.json": f"{sd}/scheduler/scheduler_config.json",
        "controlnet/config.json": "lllyasviel/control_v11f1e_sd15_tile/config.json",
        "controlnet/diffusion_pytorch_model.safetensors":
            "lllyasviel/control_v11f1e_sd15_tile/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json": "stabilityai/sd-vae-ft-mse/config.json",
        "vae/diffusion_pytorch_model.safetensors": "stabilityai/sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
        "upscalers/4x-UltraSharp.pth": "philz1337x/upscaler/4x-UltraSharp.pth",
        "loras/more_details.safetensors": "philz1337x/loras/more_details.safetensors",
    }
    assert all(p.sha256 or p.blob_id for p in planned)
    # No extras unless asked for.
    assert not any(p.target.parent.name in ("loras", "upscalers")
                   for p in dl.plan(tmp_path, dl.components(), fake_listing))


def test_a_folder_with_pickle_weights_only_is_refused(tmp_path):
    component = dl.Component("old", "someone/old", "main", "vae", folders=("",))
    listing = [hub_file("config.json", b"{}"), hub_file("diffusion_pytorch_model.bin", b"pickle")]
    with pytest.raises(FileNotFoundError, match="pickle weights only"):
        dl.plan(tmp_path, [component], lambda c: dl.RepoListing(COMMIT, listing))


def test_download_checks_checksums_places_files_and_skips_them_next_time(tmp_path, fake_hub):
    calls, _ = fake_hub
    wanted = dl.components(extras=True)
    planned = dl.download(tmp_path, wanted, list_files=fake_listing, out=open(tmp_path / "log", "w"))
    assert len(calls) == len(planned) == 15
    unet = tmp_path / "models" / "clarity-upscaler" / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.read_bytes() == b"unet fp16"
    assert (tmp_path / "upscalers" / "4x-UltraSharp.pth").read_bytes() == b"esrgan"
    calls.clear()
    dl.download(tmp_path, wanted, list_files=fake_listing, out=open(tmp_path / "log", "w"))
    assert calls == []  # everything in place with the right checksum: nothing fetched
    assert "already in place, checksum ok" in (tmp_path / "log").read_text()


def test_a_corrupt_download_is_deleted_and_reported(tmp_path, fake_hub):
    calls, corrupt = fake_hub
    corrupt.add("config.json")  # a plain git file: checked by its blob hash
    with pytest.raises(dl.ChecksumError, match="sd-vae-ft-mse/config.json does not match the hub's checksum"):
        dl.download(tmp_path, [dl.RECOMMENDED[2]], list_files=fake_listing, out=open(tmp_path / "log", "w"))
    assert not (tmp_path / "vae" / "config.json").exists()
    assert not list((tmp_path / ".cache").rglob("config.json"))


@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"},
                                     # Nothing listens on the discard port here: the connection is refused.
                                     {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "no network"])
def test_offline_it_fails_at_once_saying_what_to_copy_where(tmp_path, offline):
    """The command as a user runs it, start-up included (it must not wait for torch to import)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "clarity.cli", "weights", "download", "--weights", str(tmp_path),
                           "--extras"], env={**os.environ, **offline}, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 10
    assert done.returncode == 1
    assert "cannot download weights" in done.stderr
    for destination, source in [("models/clarity-upscaler", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                ("controlnet", "lllyasviel/control_v11f1e_sd15_tile"),
                                ("vae", "stabilityai/sd-vae-ft-mse"), ("loras", "philz1337x/loras"),
                                ("upscalers", "philz1337x/upscaler")]:
        assert f"{tmp_path / destination}/  <-  {source}" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_model_folder_is_not_a_download_target(tiny_weights, capsys):
    assert main(["weights", "download", "--weights", str(tiny_weights)]) == 1
    assert "is a model folder, not a weights root" in capsys.readouterr().err
