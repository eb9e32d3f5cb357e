"""ESRGAN-family pre-upscalers (RRDBNet): 4x-UltraSharp, Real-ESRGAN and their kin.

The network is written here by hand: spandrel, the library that knows these architectures,
imports torchvision, whose PyPI wheel does not load with the CPU build of torch this project
installs, so it cannot be a dependency. RRDBNet is small and stable (Wang et al., 2018;
Real-ESRGAN's `RRDBNet` is the same network with other parameter names), so one module
covers both checkpoint key layouts:

- "old" (original ESRGAN, e.g. 4x-UltraSharp.pth): `model.0.weight`,
  `model.1.sub.N.RDB1.conv1.0.weight`, ..., upsampling convs at `model.3`, `model.6`, ...
- "new" (Real-ESRGAN / BasicSR): `conv_first`, `body.N.rdb1.conv1`, `conv_body`,
  `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`, optionally under `params_ema` or `params`.

Scale, block count, feature widths and channels are read from the state dict. `.pth` files
are read with `torch.load(weights_only=True)`, which refuses to run pickled code.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clarity.errors import WeightsError

#: File types a pre-upscaler model may come in.
MODEL_SUFFIXES = (".pth", ".safetensors")
#: Input pixels per tile side, and pixels of context each tile sees beyond its own area
#: (cropped after the forward). Memory follows the tile; the context hides tile borders.
DEFAULT_TILE = 256
DEFAULT_TILE_CONTEXT = 16


@dataclass(frozen=True)
class RRDBNetShape:
    """The hyper-parameters of one RRDBNet, as read from a checkpoint."""

    in_channels: int
    out_channels: int
    features: int
    grow_channels: int
    blocks: int
    upsamplings: int
    #: Real-ESRGAN's 2x and 1x models fold the input with pixel-unshuffle by this factor first.
    unshuffle: int = 1

    @property
    def scale(self) -> int:
        return 2**self.upsamplings // self.unshuffle


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int, grow: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(features + grow, grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(features + 2 * grow, grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(features + 3 * grow, grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(features + 4 * grow, features, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.leaky_relu(self.conv1(x), 0.2)
        x2 = F.leaky_relu(self.conv2(torch.cat((x, x1), 1)), 0.2)
        x3 = F.leaky_relu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
        x4 = F.leaky_relu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, features: int, grow: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, grow)
        self.rdb2 = ResidualDenseBlock(features, grow)
        self.rdb3 = ResidualDenseBlock(features, grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator, parameter names as in Real-ESRGAN. Input and output RGB in [0, 1]."""

    def __init__(self, shape: RRDBNetShape) -> None:
        super().__init__()
        self.shape = shape
        features, grow = shape.features, shape.grow_channels
        self.conv_first = nn.Conv2d(shape.in_channels, features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(features, grow) for _ in range(shape.blocks)))
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        for index in range(1, shape.upsamplings + 1):
            self.add_module(f"conv_up{index}", nn.Conv2d(features, features, 3, 1, 1))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, shape.out_channels, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.shape.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.shape.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for index in range(1, self.shape.upsamplings + 1):
            up = getattr(self, f"conv_up{index}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


# --- checkpoints ---------------------------------------------------------------------------------

_OLD_BLOCK = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TRUNK = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")


def _old_to_new_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original-ESRGAN keys to Real-ESRGAN's; the networks are the same.

    The old layout is an `nn.Sequential`: 0 conv_first, 1 the RRDB trunk (its last entry the
    trunk conv), then per 2x upsampling (upsample, conv, activation), then conv_hr, activation,
    conv_last; so the upsampling convs sit at 3, 6, ... and the last two convs follow.
    """
    top = sorted({int(m.group(1)) for key in state if (m := _OLD_TOP.match(key))})
    blocks = {int(m.group(1)) for key in state if (m := _OLD_BLOCK.match(key))}
    if not top or top[0] != 0 or not blocks:
        raise ValueError("not an ESRGAN state dict (no model.0 / model.1.sub.N.RDBn keys)")
    upsamplings = (top[-1] - 4) // 3
    names = {0: "conv_first", 3 * upsamplings + 2: "conv_hr", 3 * upsamplings + 4: "conv_last"}
    names.update({3 * (k + 1): f"conv_up{k + 1}" for k in range(upsamplings)})
    trunk = max(blocks) + 1
    renamed = {}
    for key, tensor in state.items():
        if m := _OLD_BLOCK.match(key):
            block, rdb, conv, kind = m.groups()
            renamed[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = tensor
        elif (m := _OLD_TRUNK.match(key)) and int(m.group(1)) == trunk:
            renamed[f"conv_body.{m.group(2)}"] = tensor
        elif (m := _OLD_TOP.match(key)) and int(m.group(1)) in names:
            renamed[f"{names[int(m.group(1))]}.{m.group(2)}"] = tensor
        else:
            raise ValueError(f"unexpected key {key!r} for an ESRGAN state dict")
    return renamed


def _shape_of(state: dict[str, torch.Tensor]) -> RRDBNetShape:
    """Hyper-parameters read off the weight shapes of a Real-ESRGAN-named state dict."""
    first, last = state["conv_first.weight"], state["conv_last.weight"]
    in_channels, out_channels = first.shape[1], last.shape[0]
    unshuffle = math.isqrt(in_channels // out_channels) if in_channels != out_channels else 1
    if unshuffle**2 * out_channels != in_channels:
        raise ValueError(f"input channels {in_channels} do not fit output channels {out_channels}")
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("body.")}
    upsamplings = sum(1 for key in state if re.fullmatch(r"conv_up\d+\.weight", key))
    return RRDBNetShape(
        in_channels=in_channels,
        out_channels=out_channels,
        features=first.shape[0],
        grow_channels=state["body.0.rdb1.conv1.weight"].shape[0],
        blocks=len(blocks),
        upsamplings=upsamplings,
        unshuffle=unshuffle,
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a .pth is a pickle, and unpickling arbitrary files runs arbitrary code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("params_ema", "params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the file holds no state dict of tensors")
    return state


def load_esrgan(path: str | Path) -> RRDBNet:
    """Load an ESRGAN-family model (either key layout, `.pth` or `.safetensors`) on the CPU.

    Raises `WeightsError` naming the file when it is unreadable or not an RRDBNet.
    """
    path = Path(path)
    if path.suffix not in MODEL_SUFFIXES:
        raise WeightsError(f"{path}: pre-upscaler models must be {' or '.join(MODEL_SUFFIXES)} files")
    try:
        state = _read_state_dict(path)
        state = {key.removeprefix("module."): value for key, value in state.items()}
        if "model.0.weight" in state:
            state = _old_to_new_keys(state)
        if "conv_first.weight" not in state:
            raise ValueError("unknown architecture: neither ESRGAN nor Real-ESRGAN (RRDBNet) keys")
        shape = _shape_of(state)
        if shape.out_channels != 3:
            raise ValueError(f"the model has {shape.out_channels} colour channels; only RGB (3) models are supported")
        model = RRDBNet(shape)
        model.load_state_dict(state, strict=True)
    except Exception as error:  # noqa: BLE001 - whatever failed, the file is unusable; say which
        raise WeightsError(
            f"could not load the pre-upscaler {path}: {error}. Only ESRGAN-family (RRDBNet) models are"
            " supported, e.g. 4x-UltraSharp.pth or RealESRGAN_x4plus.pth (see weights/README.md)."
        ) from error
    return model.eval().requires_grad_(False)


# --- running it ----------------------------------------------------------------------------------


@dataclass
class ESRGANPreUpscaler:
    """A `PreUpscaler` running an RRDBNet in tiles, then resizing to the exact target size.

    Each tile of at most `tile` input pixels per side is run with `context` extra pixels on
    every side, and only its own area is kept, so memory follows the tile size and tile
    borders do not show. When the model's factor differs from the one asked for (a 4x model
    in a 2x pass), its output is resized with Lanczos to the exact size.
    """

    model: RRDBNet
    name: str
    tile: int = DEFAULT_TILE
    context: int = DEFAULT_TILE_CONTEXT

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        upscaled = self.run_model(image.convert("RGB"))
        if upscaled.size == tuple(size):
            return upscaled
        return upscaled.resize(size, Image.Resampling.LANCZOS)

    @torch.no_grad()
    def run_model(self, image: Image.Image) -> Image.Image:
        """The model's own output for `image` (its size times the model's scale), tile by tile."""
        scale = self.model.scale
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        height, width = pixels.shape[-2:]
        # The result is kept as 8-bit: a 4x model in a 2x pass makes an image 4x the target's
        # area, which is 4x smaller in uint8 than in float32.
        output = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
        # Pixel-unshuffle models need even inputs; tile edges are kept on the multiple.
        step = max(self.model.shape.unshuffle, 1)
        for top in range(0, height, self.tile):
            for left in range(0, width, self.tile):
                bottom, right = min(top + self.tile, height), min(left + self.tile, width)
                ctop, cleft = max(0, top - self.context), max(0, left - self.context)
                cbottom, cright = min(height, bottom + self.context), min(width, right + self.context)
                crop = pixels[..., ctop:cbottom, cleft:cright]
                pad_h, pad_w = -crop.shape[-2] % step, -crop.shape[-1] % step
                if pad_h or pad_w:
                    crop = F.pad(crop, (0, pad_w, 0, pad_h), mode="replicate")
                result = self.model(crop.to(self.device)).clamp_(0, 1)
                kept = result[0, :, (top - ctop) * scale:(bottom - ctop) * scale,
                              (left - cleft) * scale:(right - cleft) * scale]
                output[top * scale:bottom * scale, left * scale:right * scale] = (
                    (kept.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
                )
        return Image.fromarray(output)
