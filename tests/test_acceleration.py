"""Speed options: what runs on the CPU is checked for the same image; GPU-only paths skip without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from clarity import Upscaler
from clarity.cli import main
from clarity.engine.acceleration import (
    SpeedOptions,
    native_bf16,
    resolve_device,
    resolve_dtype,
    resolve_vae_channels_last,
    resolve_vae_dtype,
)
from clarity.errors import ParamError
from tests.conftest import FAST, make_test_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given when CUDA is missing")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


@pytest.fixture(scope="module")
def reference(upscaler):
    image = make_test_image(64, 64)
    return image, pixels(upscaler.upscale(image, **FAST).image)


def test_sdpa_attention_is_in_use_and_reported(upscaler):
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in (upscaler.pipeline.unet, upscaler.pipeline.controlnet, upscaler.pipeline.vae):
        assert model.attn_processors and all(isinstance(p, AttnProcessor2_0) for p in model.attn_processors.values())
    stats = upscaler.upscale(make_test_image(32, 32), **FAST).stats
    assert stats.acceleration["attention"] == {
        "unet": "AttnProcessor2_0", "controlnet": "AttnProcessor2_0", "vae": "AttnProcessor2_0"
    }
    assert stats.acceleration["dtype"] == "float32"
    # The session's engine runs the defaults: the VAE's dtype is what `auto` resolves to here.
    expected_vae = "bfloat16" if native_bf16(torch.device("cpu")) else "float32"
    assert stats.acceleration["vae_dtype"] == expected_vae and stats.acceleration["vae_channels_last"] is True


def test_channels_last_gives_the_same_image(tiny_weights):
    # Both with an fp32 VAE: a bf16 VAE (the default on CPUs with native bf16) rounds to 8 bits,
    # so a float32 rounding difference in the UNet can move a pixel by 2 levels after it.
    image = make_test_image(64, 64)
    plain = Upscaler.from_pretrained(tiny_weights, device="cpu", speed=SpeedOptions(vae_dtype="fp32"))
    expected = pixels(plain.upscale(image, **FAST).image)
    fast_speed = SpeedOptions(channels_last=True, vae_dtype="fp32")
    fast = Upscaler.from_pretrained(tiny_weights, device="cpu", speed=fast_speed)
    conv = fast.pipeline.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    result = fast.upscale(image, **FAST)
    assert result.stats.acceleration["channels_last"] is True
    assert np.abs(pixels(result.image) - expected).max() <= 1  # float rounding at most


def test_bf16_on_the_cpu_runs_the_unet_in_bf16_and_the_vae_as_vae_dtype_says(tiny_weights, reference):
    image, expected = reference
    half = Upscaler.from_pretrained(tiny_weights, device="cpu", speed=SpeedOptions(dtype="bf16"))
    assert half.pipeline.unet.dtype == half.pipeline.controlnet.dtype == torch.bfloat16
    assert half.pipeline.vae.dtype == resolve_vae_dtype(SpeedOptions(), torch.device("cpu"))
    result = half.upscale(image, **FAST)
    assert result.stats.acceleration["dtype"] == "bfloat16"
    # bf16 keeps 8 bits of mantissa: a slightly different image, not a different one.
    difference = np.abs(pixels(result.image) - expected)
    assert difference.mean() < 1.0 and difference.max() <= 8


def test_fp16_on_the_cpu_is_refused_with_a_reason(tiny_weights):
    with pytest.raises(ParamError) as caught:
        Upscaler.from_pretrained(tiny_weights, device="cpu", speed=SpeedOptions(dtype="fp16"))
    assert caught.value.param == "dtype" and "--dtype fp16" in caught.value.message and "CPU" in caught.value.message


def test_cpu_offload_hooks_are_installed_and_give_the_same_image(tiny_weights, reference):
    image, expected = reference
    offloaded = Upscaler.from_pretrained(tiny_weights, device="cpu", speed=SpeedOptions(cpu_offload=True))
    for model in (offloaded.pipeline.unet, offloaded.pipeline.controlnet, offloaded.pipeline.text_encoder):
        assert hasattr(model, "_hf_hook")  # accelerate's CpuOffload hook
    assert offloaded.pipeline.execution_device == torch.device("cpu")
    result = offloaded.upscale(image, **FAST)
    assert result.stats.acceleration["cpu_offload"] is True
    assert np.array_equal(pixels(result.image), expected)


def test_compile_is_applied_to_the_unet_and_controlnet(tiny_weights):
    # Compiling happens at the first call, which takes ~10 minutes on two CPU cores (measured:
    # 613 s, then 0.6 s per upscale); test_compiled_output_matches runs it when asked to.
    compiled = Upscaler.from_pretrained(tiny_weights, device="cpu", speed=SpeedOptions(compile=True))
    assert compiled.acceleration.compiled == ["unet", "controlnet"]
    assert compiled.pipeline.unet._compiled_call_impl is not None
    assert compiled.pipeline.controlnet._compiled_call_impl is not None
    assert compiled.pipeline.unet.dtype == torch.float32  # attributes stay reachable (compiled in place)


@pytest.mark.skipif(
    not os.environ.get("CLARITY_SLOW_TESTS"),
    reason="torch.compile of the tiny UNet takes ~10 minutes on 2 CPU cores; set CLARITY_SLOW_TESTS=1 to run it",
)
def test_compiled_output_matches(tiny_weights, tmp_path):
    script = f"""
import numpy as np
from clarity import Upscaler
from clarity.engine.acceleration import SpeedOptions
from tests.conftest import FAST, make_test_image
image = make_test_image(64, 64)
eager = Upscaler.from_pretrained({str(tiny_weights)!r}, device="cpu").upscale(image, **FAST).image
compiled = Upscaler.from_pretrained({str(tiny_weights)!r}, device="cpu", speed=SpeedOptions(compile=True))
result = compiled.upscale(image, **FAST).image
difference = np.abs(np.asarray(result, float) - np.asarray(eager, float)).max()
assert difference <= 1, difference
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, timeout=1800)


def test_vae_options_refuse_bad_values_naming_the_flag(tiny_weights, tmp_path, capsys):
    with pytest.raises(ParamError) as caught:
        SpeedOptions(vae_dtype="fp8")
    assert caught.value.param == "vae_dtype" and "--vae-dtype" in caught.value.message
    with pytest.raises(ParamError) as caught:
        SpeedOptions(vae_channels_last="yes")
    assert caught.value.param == "vae_channels_last" and "--vae-channels-last" in caught.value.message
    with pytest.raises(ParamError) as caught:
        resolve_dtype(SpeedOptions(vae_dtype="fp16"), torch.device("cpu"))  # checked before loading
    assert caught.value.param == "vae_dtype" and "--vae-dtype fp16 is refused on the CPU" in caught.value.message
    make_test_image(16, 16).save(tmp_path / "in.png")
    command = ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--weights", str(tiny_weights),
               "--device", "cpu"]
    with pytest.raises(SystemExit):
        main([*command, "--vae-dtype", "fp8"])
    assert "--vae-dtype" in capsys.readouterr().err
    assert main([*command, "--vae-dtype", "fp16"]) == 2
    assert "--vae-dtype fp16 is refused on the CPU" in capsys.readouterr().err


def test_cli_vae_flags_parse_into_speed_options():
    from clarity.cli import build_parser
    from clarity.cli.options import options_from_args

    flags = ["--vae-dtype", "bf16", "--vae-channels-last", "off"]
    args = build_parser().parse_args(["upscale", "in.png", "-o", "out.png", *flags])
    assert options_from_args(SpeedOptions, args) == SpeedOptions(vae_dtype="bf16", vae_channels_last="off")


def test_private_torch_api_for_native_bf16_is_still_there():
    # native_bf16 relies on it; if a torch upgrade removes it, this fails rather than `auto` erroring at load.
    assert isinstance(torch.cpu._is_avx512_bf16_supported(), bool)


def test_native_bf16_on_this_cpu_matches_its_flags():
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            flags = {word for line in cpuinfo if line.startswith("flags") for word in line.split()}
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    expected = "avx512_bf16" in flags and torch.backends.mkldnn.is_available()
    assert native_bf16(torch.device("cpu")) == expected


def test_auto_vae_options_resolve_as_documented():
    cpu = torch.device("cpu")
    assert resolve_vae_dtype(SpeedOptions(), cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert resolve_vae_dtype(SpeedOptions(vae_dtype="fp32"), cpu) == torch.float32
    assert resolve_vae_dtype(SpeedOptions(vae_dtype="bf16"), cpu) == torch.bfloat16
    assert resolve_vae_dtype(SpeedOptions(vae_dtype="fp16"), torch.device("cuda")) == torch.float16
    assert resolve_vae_channels_last(SpeedOptions(), cpu) is True
    assert resolve_vae_channels_last(SpeedOptions(vae_channels_last="off"), cpu) is False
    cuda = torch.device("cuda")  # only the device's type is read: no GPU needed
    assert resolve_vae_channels_last(SpeedOptions(), cuda) is False
    assert resolve_vae_channels_last(SpeedOptions(channels_last=True), cuda) is True


def test_vae_dtype_and_layout_reach_the_model_and_the_report(tiny_weights):
    bf16 = Upscaler.from_pretrained(tiny_weights, device="cpu", speed=SpeedOptions(vae_dtype="bf16"))
    conv = bf16.pipeline.vae.decoder.conv_in.weight
    assert bf16.pipeline.vae.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    assert bf16.acceleration.vae_dtype == "bfloat16" and bf16.acceleration.vae_channels_last is True
    plain = Upscaler.from_pretrained(tiny_weights, device="cpu",
                                     speed=SpeedOptions(vae_dtype="fp32", vae_channels_last="off"))
    assert plain.pipeline.vae.dtype == torch.float32 and plain.pipeline.vae.decoder.conv_in.weight.is_contiguous()
    assert plain.acceleration.vae_dtype == "float32" and plain.acceleration.vae_channels_last is False


def test_compile_and_offload_together_are_refused():
    with pytest.raises(ParamError, match="--compile and --cpu-offload"):
        SpeedOptions(compile=True, cpu_offload=True)


def test_unknown_dtype_and_device_are_refused_by_name():
    with pytest.raises(ParamError, match="--dtype"):
        SpeedOptions(dtype="fp8")
    for device in ("tpu", "cuda:x", "mps"):
        with pytest.raises(ParamError) as caught:
            resolve_device(device)
        assert caught.value.param == "device" and "--device" in caught.value.message


@no_cuda
def test_cuda_without_cuda_names_the_flag(tiny_weights, tmp_path, capsys):
    with pytest.raises(ParamError, match="--device cuda: CUDA is not available"):
        resolve_device("cuda")
    make_test_image(16, 16).save(tmp_path / "in.png")
    code = main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"),
                 "--weights", str(tiny_weights), "--device", "cuda:1"])
    assert code == 2 and "--device cuda:1: CUDA is not available" in capsys.readouterr().err


def test_cli_refuses_fp16_on_the_cpu(tiny_weights, tmp_path, capsys):
    make_test_image(16, 16).save(tmp_path / "in.png")
    code = main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"),
                 "--weights", str(tiny_weights), "--device", "cpu", "--dtype", "fp16"])
    assert code == 2 and "--dtype fp16 is refused on the CPU" in capsys.readouterr().err


def test_cli_speed_flags_reach_the_engine(tiny_weights, tmp_path, capsys):
    make_test_image(16, 16).save(tmp_path / "in.png")
    code = main(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--weights",
                 str(tiny_weights), "--device", "cpu", "--dtype", "bf16", "--channels-last", "--steps", "2"])
    assert code == 0 and (tmp_path / "out.png").exists()


def test_serve_checks_speed_flags_before_starting(tmp_path, tiny_weights, capsys):
    code = main(["serve", "--weights", str(tiny_weights), "--accelerator", "cpu", "--dtype", "fp16"])
    assert code == 2 and "--dtype fp16 is refused on the CPU" in capsys.readouterr().err
    if not torch.cuda.is_available():
        code = main(["serve", "--weights", str(tiny_weights), "--accelerator", "cuda"])
        assert code == 2 and "--accelerator cuda: CUDA is not available" in capsys.readouterr().err


def test_server_workers_get_the_speed_options(tiny_weights):
    from clarity.api.config import ServerConfig
    from clarity.serving.litserve.server import build_server

    speed = SpeedOptions(dtype="bf16", channels_last=True)
    server = build_server(ServerConfig(weights=tiny_weights, accelerator="cpu", speed=speed))
    assert server.lit_api.handler.config.speed == speed


class _ProducesNaN:
    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):  # everything but the call is the real pipeline's
        return getattr(self.inner, name)

    def __call__(self, image, settings, on_step=None):
        result, stats = self.inner(image, settings, on_step)
        return result * float("nan"), stats


def test_nan_output_fails_loudly_instead_of_writing_a_black_image(upscaler):
    with pytest.raises(RuntimeError, match="NaN or infinite pixels.*--dtype fp32"):
        Upscaler(_ProducesNaN(upscaler.pipeline)).upscale(make_test_image(32, 32), **FAST)


@needs_cuda
def test_auto_vae_dtype_on_cuda_is_bf16_from_ampere():
    device = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float32
    assert resolve_vae_dtype(SpeedOptions(), device) == expected


def test_auto_dtype_is_fp32_on_the_cpu_and_fp16_on_cuda():
    assert resolve_dtype(SpeedOptions(), torch.device("cpu")) == torch.float32
    assert resolve_dtype(SpeedOptions(), torch.device("cuda")) == torch.float16
    assert resolve_dtype(SpeedOptions(dtype="bf16"), torch.device("cuda")) == torch.bfloat16


# --- GPU only ------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_on_cuda_gives_no_nans(tiny_weights, dtype):
    speed = SpeedOptions(dtype=dtype, vae_dtype=dtype, channels_last=True)
    gpu = Upscaler.from_pretrained(tiny_weights, device="cuda", speed=speed)
    assert gpu.pipeline.vae.dtype == resolve_vae_dtype(speed, torch.device("cuda"))
    result = gpu.upscale(make_test_image(64, 64), **FAST)  # raises on NaN
    assert result.image.size == (128, 128) and result.stats.device.startswith("cuda")


@needs_cuda
def test_cpu_offload_on_cuda_leaves_the_denoisers_on_the_cpu(tiny_weights):
    gpu = Upscaler.from_pretrained(tiny_weights, device="cuda", speed=SpeedOptions(cpu_offload=True))
    result = gpu.upscale(make_test_image(64, 64), **FAST)
    assert result.image.size == (128, 128)
    assert gpu.pipeline.unet.device.type == "cpu" and gpu.pipeline.controlnet.device.type == "cpu"
    assert gpu.pipeline.vae.device.type == "cuda"


@needs_cuda
def test_a_cuda_index_beyond_the_devices_is_refused():
    with pytest.raises(ParamError, match="there are only"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
