"""Image decoding and encoding at the edges of the engine, with Pillow.

Decoding is restricted to common formats (most Pillow CVEs are in rarely needed decoders),
refuses decompression bombs from the header before any pixel is decoded, applies EXIF
orientation, and splits the image into the RGB the model sees plus what must be restored
afterwards (alpha, grayscale).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clarity.errors import ParamError, echo

#: Decoders tried on untrusted input.
INPUT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


@dataclass(frozen=True)
class OutputFormat:
    """An encoder offered for results, by the name the OpenAI API, the CLI and result files use."""

    name: str
    #: Pillow's name for the encoder.
    pil_format: str
    #: The HTTP Content-Type of a result in this format.
    media_type: str
    #: Whether it takes a quality (OpenAI's `output_compression`, the CLI's `--quality`).
    lossy: bool
    #: Whether it keeps transparency; without it an image with alpha is flattened to RGB.
    alpha: bool


#: The one table of output formats.
OUTPUT_FORMATS: dict[str, OutputFormat] = {
    entry.name: entry
    for entry in (
        OutputFormat("png", "PNG", "image/png", lossy=False, alpha=True),
        OutputFormat("jpeg", "JPEG", "image/jpeg", lossy=True, alpha=False),
        OutputFormat("webp", "WEBP", "image/webp", lossy=True, alpha=True),
        OutputFormat("avif", "AVIF", "image/avif", lossy=True, alpha=True),
        OutputFormat("gif", "GIF", "image/gif", lossy=False, alpha=True),
    )
}
#: Other spellings accepted where a user names a format (a file extension, `--format`).
FORMAT_ALIASES: dict[str, str] = {"jpg": "jpeg"}
#: Refuse larger inputs (pixels) before decoding them; Pillow's own bomb limit is ~179 MP.
DEFAULT_MAX_INPUT_PIXELS = 64_000_000
#: Default cap on output pixels (4096 x 4096). Model activations are tiled, but the engine
#: still holds several float32 copies of the whole image, and time grows with its area.
DEFAULT_MAX_OUTPUT_PIXELS = 4096 * 4096

#: Largest relative difference between two aspect ratios still taken as the same shape (a
#: resized mask, a requested output size: rounding to whole pixels shifts ratios slightly).
ASPECT_TOLERANCE = 0.01

ImageSource = Image.Image | str | Path | bytes | BinaryIO


def output_size(size: tuple[int, int], scale_factor: float) -> tuple[int, int]:
    """The size of an upscale of `size` by `scale_factor`: round(side x scale_factor) for each side
    (halves round up), at least 1 pixel. The engine makes exactly this size; the API checks it."""
    return tuple(max(1, math.floor(side * scale_factor + 0.5)) for side in size)  # type: ignore[return-value]


def same_aspect_ratio(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether (width, height) `size` has `other`'s shape, within `ASPECT_TOLERANCE`."""
    ratio, other_ratio = size[0] / size[1], other[0] / other[1]
    return abs(ratio - other_ratio) / other_ratio <= ASPECT_TOLERANCE


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_INPUT_PIXELS, param: str = "image") -> Image.Image:
    """Open and fully decode an image from a path, bytes, a binary file or a PIL image.

    Raises `ParamError(param, ...)` for anything that is not a usable image: unknown or
    disallowed format, truncated or corrupt data, zero size, or more than `max_pixels` pixels
    (read from the header, before any pixel is decoded; Pillow's own limit of ~179 MP applies
    on top). Animated images give their first frame. A broken EXIF block is ignored rather
    than refused: phones and editors write plenty of them.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (str, Path)):
            try:
                source = io.BytesIO(Path(source).read_bytes())
            except OSError as error:
                raise ParamError(param, f"cannot read {source}: {error.strerror or error}") from None
        elif isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        try:
            with warnings.catch_warnings():
                # Pillow warns from ~89 MP; the size is checked against `max_pixels` below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(source, formats=list(INPUT_FORMATS))
        except UnidentifiedImageError:
            raise ParamError(param, f"not a supported image; accepted formats: {', '.join(INPUT_FORMATS)}") from None
        except Image.DecompressionBombError:
            limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
            raise ParamError(param, f"image is too large to decode safely; the limit is {limit:,} pixels") from None
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as error:
            # A header that starts like a known format and then breaks off or contradicts itself.
            raise ParamError(param, f"image data is truncated or corrupt: {error}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ParamError(param, f"image is empty ({width}x{height})")
    if width * height > max_pixels:
        raise ParamError(param, f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as error:
        raise ParamError(param, f"image data is truncated or corrupt: {error}") from None
    # Animated images: the first frame is the image (Image.open leaves frame 0 selected).
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, struct.error, KeyError, TypeError, ZeroDivisionError):
        return image


@dataclass(frozen=True)
class SplitImage:
    """The RGB the model works on, plus what must be put back afterwards."""

    rgb: Image.Image
    alpha: Image.Image | None
    grayscale: bool


def split_for_model(image: Image.Image) -> SplitImage:
    """Separate colour from transparency and convert any mode to 8-bit RGB.

    16-bit and 32-bit integer images are rescaled to 8 bits (Pillow's own conversion clips
    them to 255), float images are taken as 0..1, CMYK and palettes go through Pillow.
    """
    alpha = None
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = image.getchannel("A")
    grayscale = image.mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8))
    rgb = image.convert("RGB")
    if alpha is not None:
        rgb = fill_transparent(rgb, alpha)
    return SplitImage(rgb=rgb, alpha=alpha, grayscale=grayscale)


def fill_transparent(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    """`rgb` with the colour under fully transparent pixels replaced by that of the nearest visible ones.

    Files store arbitrary colour (often black) where alpha is 0. Resampling and diffusion spread
    it into the visible edge, which then "blooms" with a dark or foreign halo once alpha is put
    back. Filling it with the neighbouring visible colours keeps the edge's colour its own.
    Visible and partly transparent pixels keep their colour exactly.
    """
    weight = np.asarray(alpha, dtype=np.float32) / 255.0
    hidden = weight == 0
    if not hidden.any() or hidden.all():
        return rgb
    colour = np.asarray(rgb, dtype=np.float32)
    fill = _push_pull(colour * weight[..., None], weight)
    filled = np.where(hidden[..., None], fill, colour)
    return Image.fromarray(np.clip(filled + 0.5, 0, 255).astype(np.uint8))


def _push_pull(premultiplied: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Alpha-weighted mean colour of the nearest visible pixels, at every pixel.

    Hand-written push-pull (no library does alpha bleeding on arrays): halve the resolution,
    summing colour and alpha, until every pixel sees something visible; then come back up,
    each pixel taking its own level's mean where it has one, else its parent's. Linear in the
    pixel count, so it stays cheap on very large images.
    """
    height, width = weight.shape
    if height == 1 and width == 1:
        return premultiplied / max(float(weight[0, 0]), 1e-6)
    pad_h, pad_w = height % 2, width % 2
    colour_sum = np.pad(premultiplied, ((0, pad_h), (0, pad_w), (0, 0)))
    weight_sum = np.pad(weight, ((0, pad_h), (0, pad_w)))
    half_h, half_w = colour_sum.shape[0] // 2, colour_sum.shape[1] // 2
    coarse_colour = colour_sum.reshape(half_h, 2, half_w, 2, 3).sum((1, 3))
    coarse_weight = weight_sum.reshape(half_h, 2, half_w, 2).sum((1, 3))
    parent = _push_pull(coarse_colour, coarse_weight).repeat(2, 0).repeat(2, 1)[:height, :width]
    seen = weight > 1e-6
    own = premultiplied / np.where(seen, weight, 1.0)[..., None]
    return np.where(seen[..., None], own, parent)


def join_from_model(rgb: Image.Image, original: SplitImage) -> Image.Image:
    """Put grayscale and transparency back on a model output of any size."""
    result = rgb.convert("L") if original.grayscale else rgb
    if original.alpha is not None:
        alpha = original.alpha.resize(rgb.size, Image.Resampling.LANCZOS)
        result = result.copy()
        result.putalpha(alpha)
    return result


def check_output_format(output_format: str, param: str = "output_format") -> str:
    """`output_format` in lower case if it names an output format or an alias (jpg), else `ParamError`."""
    name = output_format.lower()
    if name not in OUTPUT_FORMATS and name not in FORMAT_ALIASES:
        accepted = ", ".join([*OUTPUT_FORMATS, *FORMAT_ALIASES])
        raise ParamError(param, f"must be one of {accepted}; got {echo(output_format)}")
    return name


def output_format_of(name: str) -> OutputFormat:
    """The `OutputFormat` an accepted name (or alias) stands for."""
    name = check_output_format(name)
    return OUTPUT_FORMATS[FORMAT_ALIASES.get(name, name)]


def encode_image(image: Image.Image, output_format: str = "png", quality: int | None = None) -> bytes:
    """Encode to `output_format` (see `OUTPUT_FORMATS`); `quality` 0-100 for lossy formats."""
    encoder = output_format_of(output_format)
    if not encoder.alpha and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    options: dict = {}
    if quality is not None and encoder.lossy:
        options["quality"] = quality
    buffer = io.BytesIO()
    image.save(buffer, format=encoder.pil_format, **options)
    return buffer.getvalue()
