"""Moving between pixels and SD latents with the VAE, in tiles when the image is large.

Tiling alone is not enough: every GroupNorm in the VAE normalises with the mean and variance
of whatever it sees, so tiles normalised on their own statistics come out in different tones
(diffusers' `enable_tiling` has exactly this flaw). Here the statistics are measured once, on
a copy of the whole image shrunk to one tile and matched to the full image's per-channel mean
and standard deviation, and then every tile is normalised with those same numbers. Tiles
overlap and are cross-faded, so there is no seam, and peak memory follows the tile size.
Images that fit in one tile take the exact, untiled path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from clarity.engine.seamless import crop_border, pad_periodic
from clarity.engine.tiling import Tile, TilePlan, plan_tiles, tile_weight

#: Pixels per latent pixel along each axis for SD-family VAEs.
VAE_SCALE = 8
#: Latent pixels of context each tile sees beyond its own area, cropped after the forward:
#: the convolutions' reach. (Mid-block attention still sees only its tile; the cross-fade and
#: the shared GroupNorm statistics keep that difference small.) A1111's Tiled VAE uses
#: 11 for the decoder and 32 px = 4 for the encoder.
DECODER_CONTEXT = 8
ENCODER_CONTEXT = 4
#: Pixels an input side is padded to before the encoder runs on it (see `encode`).
MIN_ENCODE_SIDE = 16
#: Latent pixels over which neighbouring tiles cross-fade.
BLEND_OVERLAP = 4
#: Aspect ratio beyond which an image counts as a thin strip when its GroupNorm statistics are
#: measured (see `_miniature_size`).
THIN_ASPECT = 8


class GroupNormStatistics:
    """Record the per-group mean and variance every GroupNorm of `module` sees, then replay them.

    Each GroupNorm of an SD VAE encoder or decoder runs once per forward, so one recorded
    forward gives one statistic per layer.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.stats: dict[torch.nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        def record(layer: torch.nn.GroupNorm, args: tuple[torch.Tensor, ...]) -> None:
            groups = args[0].float().reshape(args[0].shape[0], layer.num_groups, -1)
            self.stats[layer] = (groups.mean(-1), groups.var(-1, unbiased=False))

        handles = [layer.register_forward_pre_hook(record) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Within this block the GroupNorms use the recorded statistics instead of their input's."""
        missing = [layer for layer in self.layers if layer not in self.stats]
        if missing:
            raise RuntimeError(f"{len(missing)} GroupNorm layers have no recorded statistics")
        # Hooks such as accelerate's offloading may already have replaced a forward: restore
        # exactly what was there.
        previous = {layer: layer.__dict__.get("forward") for layer in self.layers}
        for layer in self.layers:
            layer.forward = partial(F.batch_norm, **_as_batch_norm(layer, *self.stats[layer]))
        try:
            yield
        finally:
            for layer, forward in previous.items():
                if forward is None:
                    del layer.forward  # back to the class's own forward
                else:
                    layer.forward = forward


def _as_batch_norm(layer: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> dict:
    """`F.batch_norm`'s arguments that make it `layer` with the recorded per-group `mean` and `var` (1, groups).

    With its statistics fixed, a GroupNorm is a per-channel affine map, which is what an
    inference-mode BatchNorm computes: torch's fused kernel does it in one pass over the input,
    keeps its memory layout (channels-last stays channels-last) and, fed a bf16 or fp16 input
    with these float32 statistics and weights, computes in float32. (Written out elementwise, the
    float32 round trip made three passes over every activation.)
    """
    if mean.shape[0] != 1:
        raise ValueError(f"GroupNorm statistics are recorded for a batch of one image, got {mean.shape[0]}")
    per_group = layer.num_channels // layer.num_groups
    float32 = {"device": mean.device, "dtype": torch.float32}
    return {
        "running_mean": mean[0].to(**float32).repeat_interleave(per_group),
        "running_var": var[0].to(**float32).repeat_interleave(per_group),
        "weight": layer.weight.to(**float32) if layer.affine else None,
        "bias": layer.bias.to(**float32) if layer.affine else None,
        "training": False,
        "eps": layer.eps,
    }


def _memory_format(module: torch.nn.Module) -> torch.memory_format:
    """channels_last when `module`'s first convolution's weight is (the VAE was set so), else contiguous."""
    conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    is_nhwc = conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    return torch.channels_last if is_nhwc else torch.contiguous_format


def encode(
    vae: AutoencoderKL,
    image: torch.Tensor,
    generator: torch.Generator,
    tile_size: int | None = None,
    wrap: bool = False,
) -> torch.Tensor:
    """Latents of `image` (1, 3, H, W in [0, 1], H and W multiples of 8), scaled for the UNet.

    Tiles of at most `tile_size` pixels when the image is larger (None: never tile). Samples
    the VAE's posterior with `generator` over the whole latent, as diffusers' img2img does, so
    an untiled run can be compared with theirs number for number. With `wrap` the image is one
    period of a repeating pattern: its borders see the opposite side as their neighbourhood.
    """
    pixels = (image * 2 - 1).to(device=vae.device, dtype=vae.dtype, memory_format=_memory_format(vae.encoder))
    if wrap:
        pixels = pad_periodic(pixels, ENCODER_CONTEXT * VAE_SCALE)

    def moments(x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # oneDNN's bf16 channels-last convolutions (torch 2.13, CPU) return NaN on feature maps 1 px wide,
        # which an 8 px thin input makes in the encoder's last block: thinner inputs are encoded
        # edge-padded to MIN_ENCODE_SIDE and their moments cropped back (tests/test_engine.py::test_tiny_images_work).
        padded = F.pad(x, (0, max(0, MIN_ENCODE_SIDE - width), 0, max(0, MIN_ENCODE_SIDE - height)), mode="replicate")
        encoded = vae.encoder(padded)
        encoded = vae.quant_conv(encoded) if vae.quant_conv is not None else encoded
        return encoded[..., : height // VAE_SCALE, : width // VAE_SCALE]

    plan = tile_plan(pixels.shape[-2] // VAE_SCALE, pixels.shape[-1] // VAE_SCALE, tile_size)
    if plan is None:
        stacked = moments(pixels)
    else:
        statistics = GroupNormStatistics(vae.encoder)
        with statistics.recording():
            moments(_matched_miniature(pixels, tile_size))
        with statistics.frozen():
            stacked = _blend_tiles(
                plan, lambda tile: _with_context(moments, pixels, tile, ENCODER_CONTEXT, VAE_SCALE, 1), 1
            )
    if wrap:
        stacked = crop_border(stacked, ENCODER_CONTEXT)
    # In float32 whatever the VAE's dtype: the posterior's noise is drawn as an fp32 VAE's would be.
    posterior = DiagonalGaussianDistribution(stacked.to(torch.float32, memory_format=torch.contiguous_format))
    return posterior.sample(generator) * vae.config.scaling_factor


def decode(
    vae: AutoencoderKL, latents: torch.Tensor, tile_size: int | None = None, wrap: bool = False
) -> torch.Tensor:
    """Pixels (1, 3, 8h, 8w in [0, 1], float32) of UNet-scaled `latents`, tiled above `tile_size` pixels.

    With `wrap`, `latents` are one period of a repeating pattern (see `encode`).
    """
    z = latents.to(device=vae.device, dtype=vae.dtype, memory_format=_memory_format(vae.decoder))
    z = z / vae.config.scaling_factor
    if wrap:
        z = pad_periodic(z, DECODER_CONTEXT)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    plan = tile_plan(z.shape[-2], z.shape[-1], tile_size)
    if plan is None:
        pixels = vae.decoder(z)
    else:
        statistics = GroupNormStatistics(vae.decoder)
        with statistics.recording():
            vae.decoder(_matched_miniature(z, tile_size // VAE_SCALE))
        with statistics.frozen():
            pixels = _blend_tiles(
                plan, lambda tile: _with_context(vae.decoder, z, tile, DECODER_CONTEXT, 1, VAE_SCALE), VAE_SCALE
            )
    if wrap:
        pixels = crop_border(pixels, DECODER_CONTEXT * VAE_SCALE)
    # In place: at 100 MP each full-size float32 temporary is 1.2 GB. (The tiled output is
    # already float32 NCHW, so `to` copies only the untiled, at most one-tile, output.)
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(0.5).add_(0.5).clamp_(0, 1)


def tile_plan(latent_height: int, latent_width: int, tile_size: int | None) -> TilePlan | None:
    """The tiles `encode` and `decode` use for a latent of this size; None for the exact untiled path.

    `tile_size` is in pixels, not counting the `BLEND_OVERLAP` neighbouring tiles share; None never tiles.
    """
    if tile_size is None:
        return None
    # The context margin already hides what border padding does to the convolutions; the
    # overlap only has to be wide enough for a smooth cross-fade. `tile_size` does not count
    # it, so that an image k tiles wide takes k tiles, not k + 1: 2048 px in 1024 px tiles is
    # 2 x 2 tiles of 1040 px rather than 3 x 3 of 704 px (whose context margins were 1.15x the
    # work), and an image up to one overlap larger than a tile is one tile.
    latent_tile = tile_size // VAE_SCALE + BLEND_OVERLAP
    plan = plan_tiles(latent_height, latent_width, latent_tile, latent_tile, BLEND_OVERLAP)
    return None if len(plan.tiles) == 1 else plan


def _with_context(
    run: Callable, x: torch.Tensor, tile: Tile, context: int, in_scale: int, out_scale: int
) -> torch.Tensor:
    """`run` on `tile` of `x` widened by `context` latent pixels (within the image), then cropped back.

    `x` is `in_scale` times the latent's size and `run`'s output `out_scale` times.
    """
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    top, left = max(0, tile.top - context), max(0, tile.left - context)
    bottom, right = min(height, tile.top + tile.height + context), min(width, tile.left + tile.width + context)
    output = run(x[..., top * in_scale:bottom * in_scale, left * in_scale:right * in_scale])
    row, col = (tile.top - top) * out_scale, (tile.left - left) * out_scale
    return output[..., row:row + tile.height * out_scale, col:col + tile.width * out_scale]


def _blend_tiles(plan: TilePlan, run: Callable, scale: int) -> torch.Tensor:
    """Run `run(tile)` on each latent tile of `plan` and cross-fade the outputs (`scale` x the tile's size)."""
    output: torch.Tensor | None = None
    total = torch.zeros(plan.height * scale, plan.width * scale)
    for tile in plan.tiles:
        result = run(tile).float().cpu()
        if output is None:
            output = torch.zeros(1, result.shape[1], plan.height * scale, plan.width * scale)
        weight = tile_weight(tile, plan)
        if scale > 1:
            weight = F.interpolate(weight[None, None], scale_factor=scale, mode="bilinear", align_corners=False)[0, 0]
        region = tile.pixel_slice(scale)
        output[(..., *region)] += result * weight
        total[region] += weight
    assert output is not None
    return output.div_(total)


def _matched_miniature(x: torch.Tensor, max_side: int) -> torch.Tensor:
    """`x` shrunk to about one tile (see `_miniature_size`), each channel's mean and std matched to the full `x`.

    Shrinking smooths the content and lowers its variance; matching the first moments keeps
    the statistics the VAE measures on the copy close to those of the whole image.
    """
    size = _miniature_size(x.shape[-2], x.shape[-1], max_side)
    if size == tuple(x.shape[-2:]):
        return x  # small enough as it is: the statistics are the whole image's own
    small = F.interpolate(x.float(), size=size, mode="area")
    full_mean, full_std = x.float().mean((-2, -1), keepdim=True), x.float().std((-2, -1), keepdim=True)
    small_mean, small_std = small.mean((-2, -1), keepdim=True), small.std((-2, -1), keepdim=True)
    return ((small - small_mean) / (small_std + 1e-6) * full_std + full_mean).to(x.dtype)


def _miniature_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The size of the copy of an image that GroupNorm statistics are measured on: about one tile.

    An image of ordinary shape is shrunk evenly to fit a `max_side` square. A thin strip (over
    `THIN_ASPECT`:1) keeps its short side, up to `max_side`, and only its long side is shrunk,
    to what a tile's area leaves: evenly shrunk, it would be only a few pixels thin (or too thin
    for the encoder to run on at all), and the zero padding along it would dominate every
    statistic, while the tiles see the strip's true thickness. (Measured on the tiny model's
    encoder: a 1024x64 strip in 128 px tiles gave noise; kept whole, the tiled latents are as
    close to the untiled ones as an ordinary image's.)
    """
    short, long = min(height, width), max(height, width)
    if long <= short * THIN_ASPECT:
        factor = long / max_side
        return max(1, math.ceil(height / factor)), max(1, math.ceil(width / factor))
    kept_short = min(short, max_side)
    shrunk_long = min(long, max(max_side, max_side**2 // kept_short))
    return (kept_short, shrunk_long) if height == short else (shrunk_long, kept_short)
