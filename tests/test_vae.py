"""Tiled VAE: matches the untiled VAE, has no tone steps at tile borders, and bounds memory.

These run on the tiny model's VAE, which is trained (see clarity/testing/train_tiny_vae.py):
a random VAE is no autoencoder, and tiling statements about it would mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, make_test_image

from clarity.engine import vae as vae_ops
from clarity.engine.images import pil_to_tensor

#: Mean absolute difference (0-1 pixel scale) allowed between tiled and untiled decoding. What
#: remains is mid-block attention seeing one tile instead of the image, and GroupNorm
#: statistics estimated on a shrunk copy rather than measured on the full image.
TILED_DECODE_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def vae(upscaler):
    return upscaler.pipeline.vae


@pytest.fixture(scope="module")
def photo_latents(vae):
    image = pil_to_tensor(make_test_image(512, 384))
    with torch.no_grad():
        return vae_ops.encode(vae, image, torch.Generator().manual_seed(0))


def _low_frequencies(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 32)


@torch.no_grad()
def test_images_that_fit_one_tile_take_the_exact_path(vae):
    image = pil_to_tensor(make_test_image(128, 96))
    untiled = vae_ops.encode(vae, image, torch.Generator().manual_seed(1))
    tiled = vae_ops.encode(vae, image, torch.Generator().manual_seed(1), tile_size=128)
    assert torch.equal(untiled, tiled)
    assert torch.equal(vae_ops.decode(vae, untiled), vae_ops.decode(vae, untiled, tile_size=128))


@torch.no_grad()
def test_tiled_decode_matches_untiled(vae, photo_latents):
    untiled = vae_ops.decode(vae, photo_latents)
    tiled = vae_ops.decode(vae, photo_latents, tile_size=128)  # 4 x 3 tiles of at most 16 + 4 latent px
    assert len(vae_ops.tile_plan(*photo_latents.shape[-2:], 128).tiles) == 12
    assert (tiled - untiled).abs().mean() < TILED_DECODE_TOLERANCE


@torch.no_grad()
def test_shared_statistics_beat_per_tile_group_norm(vae_variants, photo_latents):
    # diffusers' own tiling normalises each tile by its own statistics: tone shifts per tile.
    # An fp32 VAE: diffusers' decode feeds it float32 (a bf16 VAE, the default on CPUs with
    # native bf16, would refuse that).
    vae = vae_variants["fp32", "off"]
    untiled = vae_ops.decode(vae, photo_latents)
    ours = vae_ops.decode(vae, photo_latents, tile_size=128)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 128, 16
    try:
        per_tile = (vae.decode(photo_latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    finally:
        vae.disable_tiling()
    ours_tone_error = (_low_frequencies(ours) - _low_frequencies(untiled)).abs().mean()
    per_tile_tone_error = (_low_frequencies(per_tile) - _low_frequencies(untiled)).abs().mean()
    assert ours_tone_error < 0.7 * per_tile_tone_error


@torch.no_grad()
def test_no_tone_step_at_tile_borders(vae):
    # A smooth horizontal gradient: any tone shift between tiles shows as a jump in the
    # column means where tiles meet.
    gradient = torch.linspace(0.2, 0.8, 512)[None, None, None, :].expand(1, 3, 256, 512).contiguous()
    latents = vae_ops.encode(vae, gradient, torch.Generator().manual_seed(0))
    decoded = vae_ops.decode(vae, latents, tile_size=128)
    steps = decoded.mean((0, 1, 2)).diff().abs()
    borders = torch.zeros_like(steps, dtype=torch.bool)
    lefts = {tile.left for tile in vae_ops.tile_plan(latents.shape[-2], latents.shape[-1], 128).tiles} - {0}
    for left in lefts:
        start = left * vae_ops.VAE_SCALE
        borders[start - 2:start + vae_ops.BLEND_OVERLAP * vae_ops.VAE_SCALE + 2] = True
    # The VAE's own image edges (first and last 8 px) step more than anything else; leave them out.
    borders, steps = borders[8:-8], steps[8:-8]
    assert steps[borders].max() <= steps[~borders].max() * 1.5


@torch.no_grad()
def test_tiled_encode_matches_untiled(vae):
    image = pil_to_tensor(make_test_image(512, 384))
    untiled = vae_ops.encode(vae, image, torch.Generator().manual_seed(0))
    tiled = vae_ops.encode(vae, image, torch.Generator().manual_seed(0), tile_size=128)
    assert (tiled - untiled).abs().mean() < 0.1 * untiled.std()


@torch.no_grad()
@pytest.mark.parametrize("size", [(1024, 16), (24, 1024), (1024, 64), (2048, 96)])
def test_thin_strips_encode_and_decode_in_tiles_like_untiled(vae, size):
    # Shrunk evenly to fit one 128 px tile, a strip's copy for the GroupNorm statistics was 2 to
    # 8 px thin: too thin for the encoder to run (a crash), or all zero padding (latents of noise).
    image = pil_to_tensor(make_test_image(*size))
    untiled = vae_ops.encode(vae, image, torch.Generator().manual_seed(0))
    tiled = vae_ops.encode(vae, image, torch.Generator().manual_seed(0), tile_size=128)
    assert (tiled - untiled).abs().mean() < 0.1 * untiled.std()
    decoded = vae_ops.decode(vae, untiled)
    assert (vae_ops.decode(vae, untiled, tile_size=128) - decoded).abs().mean() < TILED_DECODE_TOLERANCE


def test_engine_tiles_the_vae_above_the_tile_size(upscaler):
    result = upscaler.upscale(make_test_image(96, 72), vae_tile_size=128, **FAST)
    assert result.image.size == (192, 144)
    # 192 px is two 128 px tiles across; 144 px is within one tile and the 32 px tiles share.
    assert result.stats.passes[0].vae_tiles == 2


def test_an_image_k_tiles_wide_takes_k_tiles():
    # 2048 px in the default 1024 px tiles: 2 x 2 (the 32 px the tiles share is not counted
    # against the tile), where 3 x 3 smaller tiles would repeat more context margin.
    assert len(vae_ops.tile_plan(256, 256, 1024).tiles) == 4
    assert len(vae_ops.tile_plan(256, 261, 1024).tiles) == 6  # 261 > 2 x 132 - 4: three across
    assert vae_ops.tile_plan(128 + vae_ops.BLEND_OVERLAP, 100, 1024) is None  # one tile: the exact path


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_group_norm_is_the_group_norm_of_its_recorded_input(dtype):
    # Replayed on the very input they were recorded from, the statistics must give what the
    # GroupNorm itself gives: the replay (a fused inference BatchNorm) is the same map.
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    norm = norm.to(dtype)
    x = (torch.randn(1, 32, 24, 40) * 3 + 1).to(dtype).to(memory_format=torch.channels_last)
    statistics = vae_ops.GroupNormStatistics(norm)
    with statistics.recording():
        expected = norm(x)
    with statistics.frozen():
        replayed = norm(x)
    assert replayed.dtype == dtype and replayed.is_contiguous(memory_format=torch.channels_last)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(replayed.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(norm(x), expected)  # the GroupNorm's own forward is back after the block


_PEAK_RSS_SCRIPT = """
import json, resource, sys, torch
from clarity.models.loading import load_components
from clarity.engine import vae as vae_ops
vae = load_components(sys.argv[1], device="cpu").vae
tile = None if sys.argv[2] == "none" else int(sys.argv[2])
latents = torch.randn(1, 4, 320, 320)  # a 2560 x 2560 px (6.6 MP) output
with torch.no_grad():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vae_ops.decode(vae, latents, tile)
print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _decode_peak_mb(weights, tile: str) -> float:
    output = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(weights), tile],
        capture_output=True, text=True, check=True, timeout=300,
    )
    rss = json.loads(output.stdout.strip().splitlines()[-1])
    return (rss["peak"] - rss["before"]) / 1024  # ru_maxrss is in KiB on Linux


def test_tiled_decode_bounds_peak_memory(tiny_weights):
    untiled = _decode_peak_mb(tiny_weights, "none")
    tiled = _decode_peak_mb(tiny_weights, "512")
    # The output itself (2560^2 x 3 float32 = 79 MB, plus its blend weights) is unavoidable;
    # the activations of a whole-image decode are not.
    assert tiled < 400, f"tiled decode grew RSS by {tiled:.0f} MB"
    assert tiled < untiled / 2.5, f"tiled {tiled:.0f} MB vs untiled {untiled:.0f} MB"


@torch.no_grad()
@pytest.mark.parametrize("tile_size", [None, 128])
def test_wrapped_decode_has_no_special_border(vae, tile_size):
    """With wrap, decoding commutes with shifting the pattern: the image border is like any other place."""
    z = vae_ops.encode(vae, pil_to_tensor(make_test_image(256, 192)), torch.Generator().manual_seed(0))

    def shift_error(wrap: bool) -> float:
        """Largest difference between decoding a shifted pattern and shifting the decoded one."""
        shifted_first = vae_ops.decode(vae, z.roll((7, 11), (-2, -1)), tile_size, wrap=wrap)
        shifted_after = vae_ops.decode(vae, z, tile_size, wrap=wrap).roll((56, 88), (-2, -1))
        return float((shifted_first - shifted_after).abs().max())

    # Measured: 0.075 untiled and 0.044 tiled with wrap; 0.46 without (the borders decode differently).
    assert shift_error(wrap=True) < 0.15
    assert shift_error(wrap=False) > 0.3


# --- dtype and memory layout (--vae-dtype, --vae-channels-last) ---------------------------------------------


@pytest.fixture(scope="module")
def vae_variants(tiny_weights):
    """The tiny VAE in fp32 and bf16, NCHW and channels-last, prepared as the engine prepares its own."""
    import copy

    from clarity.engine.acceleration import SpeedOptions, prepare_vae
    from clarity.models.loading import load_components

    fp32 = load_components(tiny_weights, device="cpu").vae
    variants = {}
    for dtype in ("fp32", "bf16"):
        for layout in ("off", "on"):
            variants[dtype, layout] = copy.deepcopy(fp32)
            prepare_vae(variants[dtype, layout], SpeedOptions(vae_dtype=dtype, vae_channels_last=layout),
                        torch.device("cpu"))
    return variants


@torch.no_grad()
def test_bf16_vae_is_finite_and_close_to_fp32(vae_variants):
    # bf16 keeps 8 significant bits (each rounding moves a value by at most 0.2 %) and float32's
    # range. Measured on this model: latents differ by 0.0034 on average (0.4 % of their std),
    # 0.036 at most; decoded pixels by 0.0005 (0.13 levels of 255), 0.0064 (1.6 levels) at most.
    # The limits leave room for other CPUs' kernels; a wrong cast or layout errs by tenths.
    image = pil_to_tensor(make_test_image(256, 192))
    fp32, bf16 = vae_variants["fp32", "off"], vae_variants["bf16", "on"]
    assert bf16.dtype == torch.bfloat16
    latents = vae_ops.encode(fp32, image, torch.Generator().manual_seed(0))
    latents_bf16 = vae_ops.encode(bf16, image, torch.Generator().manual_seed(0))
    assert latents_bf16.dtype == torch.float32 and torch.isfinite(latents_bf16).all()
    assert (latents_bf16 - latents).abs().mean() < 0.02 * latents.std()
    assert (latents_bf16 - latents).abs().max() < 0.15
    decoded, decoded_bf16 = vae_ops.decode(fp32, latents), vae_ops.decode(bf16, latents)
    assert decoded_bf16.dtype == torch.float32 and decoded_bf16.is_contiguous() and torch.isfinite(decoded_bf16).all()
    assert (decoded_bf16 - decoded).abs().mean() < 2 / 255
    assert (decoded_bf16 - decoded).abs().max() < 8 / 255


@torch.no_grad()
@pytest.mark.parametrize("tile_size", [None, 128])
def test_channels_last_vae_gives_the_same_result(vae_variants, photo_latents, tile_size):
    # The same arithmetic in another order: float32 rounding only (measured: 2e-6 mean, 2e-5 at most).
    contiguous, channels_last = vae_variants["fp32", "off"], vae_variants["fp32", "on"]
    assert channels_last.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    expected = vae_ops.decode(contiguous, photo_latents, tile_size)
    assert (vae_ops.decode(channels_last, photo_latents, tile_size) - expected).abs().max() < 1e-4
    image = pil_to_tensor(make_test_image(256, 192))
    latents = vae_ops.encode(contiguous, image, torch.Generator().manual_seed(0), tile_size)
    again = vae_ops.encode(channels_last, image, torch.Generator().manual_seed(0), tile_size)
    assert (again - latents).abs().max() < 1e-3


@torch.no_grad()
def test_tiling_in_bf16_channels_last_is_as_close_to_untiled_as_in_fp32(vae_variants, photo_latents):
    # The shared GroupNorm statistics are recorded and replayed in float32 whatever the VAE's
    # dtype and layout; so bf16's tiles should match its own untiled result as well as fp32's do
    # (measured: 0.0080 mean for both when decoding, 0.027 for both when encoding).
    image = pil_to_tensor(make_test_image(512, 384))
    errors = {}
    for key in (("fp32", "off"), ("bf16", "on")):
        vae = vae_variants[key]
        decode_error = (vae_ops.decode(vae, photo_latents, 128) - vae_ops.decode(vae, photo_latents)).abs().mean()
        untiled = vae_ops.encode(vae, image, torch.Generator().manual_seed(0))
        tiled = vae_ops.encode(vae, image, torch.Generator().manual_seed(0), tile_size=128)
        errors[key] = (float(decode_error), float((tiled - untiled).abs().mean()))
    (fp32_decode, fp32_encode), (bf16_decode, bf16_encode) = errors["fp32", "off"], errors["bf16", "on"]
    assert bf16_decode < 1.2 * fp32_decode and bf16_encode < 1.2 * fp32_encode
