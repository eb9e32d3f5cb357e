"""Every upscaling parameter, defined once: name, type, default, range and meaning.

The CLI, the HTTP form parser and the docs derive from `UpscaleParams`' fields and their
metadata, so a parameter is added, renamed or re-ranged here and nowhere else. Defaults
follow the original Clarity Upscaler (see the README's parameter table).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from clarity.errors import ParamError, echo
from clarity.options import option

#: Scheduler names users know from A1111 and the original Clarity; see engine/schedulers.py.
SCHEDULER_NAMES: tuple[str, ...] = (
    "DPM++ 3M SDE Karras",
    "DPM++ 2M SDE Karras",
    "DPM++ 2M Karras",
    "Euler a",
    "Euler",
    "DDIM",
)

#: How a pass's colours are tied to its input; see engine/postprocess.py.
COLOR_FIX_METHODS: tuple[str, ...] = ("wavelet", "adain", "none")

#: The parameters most upscales change; front ends that show few at first (the playground) keep
#: the others under "advanced".
COMMON_PARAMS: tuple[str, ...] = ("prompt", "scale_factor", "creativity", "resemblance", "dynamic", "sharpen", "seed")

DEFAULT_PROMPT = "masterpiece, best quality, highres"
# The original's, in A1111 weighting syntax (weight 2), which engine/prompts.py reads. The
# original also adds LoRA tags and a negative embedding, which are files users supply.
DEFAULT_NEGATIVE_PROMPT = "(worst quality, low quality, normal quality:2)"


@dataclass(frozen=True)
class UpscaleParams:
    """What one upscale should do. Validated on construction; invalid values raise `ParamError`."""

    prompt: str = option(DEFAULT_PROMPT, "What the added detail should look like.")
    negative_prompt: str = option(DEFAULT_NEGATIVE_PROMPT, "What the added detail should avoid.")
    scale_factor: float = option(
        2.0, "Output size / input size. Above 2 it runs as chained passes of at most 2x.", min=1.0, max=16.0,
        aliases=("--scale",),
    )
    creativity: float = option(
        0.35, "Denoising strength: how much new detail is invented. 0 returns the pre-upscaled image.",
        min=0.0, max=1.0,
    )
    resemblance: float = option(
        0.6, "ControlNet-tile weight: how closely the output follows the input's structure.", min=0.0, max=3.0
    )
    dynamic: float = option(
        6.0, "Classifier-free guidance scale (the original's 'HDR'). 1 disables guidance.", min=1.0, max=50.0
    )
    num_inference_steps: int = option(
        18, "Scheduler steps for a full denoise; only int(steps x creativity) of them run.", min=1, max=100,
        aliases=("--steps",),
    )
    seed: int | None = option(
        1337, "Random seed; the same seed, image and parameters give the same output. None = random.",
        min=0, max=2**32 - 1,
    )
    scheduler: str = option("DPM++ 3M SDE Karras", "Sampler.", choices=SCHEDULER_NAMES)
    tiling_width: int = option(
        112, "Largest tile width in latent pixels (x8 = image pixels). Smaller tiles invent more detail.",
        min=16, max=256,
    )
    tiling_height: int = option(144, "Largest tile height in latent pixels (x8 = image pixels).", min=16, max=256)
    tile_overlap: int = option(8, "Least overlap between neighbouring tiles, in latent pixels.", min=4, max=64)
    tile_batch_size: int = option(8, "Tiles sent through the UNet and ControlNet in one call.", min=1, max=64)
    vae_tile_size: int = option(
        1024, "Largest VAE tile side in pixels (a multiple of 64), not counting the 32 px neighbouring tiles"
        " share; larger images are encoded and decoded in tiles, so memory follows this size, not the image's.",
        min=128, max=8192,
    )
    multistep_factor: float = option(
        0.8, "Each chained pass after the first multiplies creativity by this.", min=0.0, max=2.0
    )
    controlnet_decay: float = option(
        0.825, "ControlNet residual i of n is scaled by resemblance x decay^(n-1-i); 1 = uniform.",
        min=0.0, max=1.0,
    )
    color_fix: str = option(
        "wavelet", "Keep the input's colours: wavelet (coarse layers from the input), adain (channel mean/std)"
        " or none.", choices=COLOR_FIX_METHODS,
    )
    sharpen: float = option(0.0, "Sharpen the result with the original's 3x3 kernel; 0 = off.", min=0.0, max=10.0)
    downscaling: bool = option(False, "Shrink the input first so its longest side is downscaling_resolution.")
    downscaling_resolution: int = option(
        768, "Longest side, in pixels, the input is shrunk to when downscaling is on.", min=64, max=8192
    )
    pattern: bool = option(
        False,
        "Seamless, tileable output: opposite edges continue each other, so copies laid side by side"
        " show no seam. An input that does not tile already has its mismatched borders cross-faded first.",
    )
    upscaler: str = option(
        "lanczos", "Pre-upscaler that brings each pass to its output size before diffusion: lanczos, or the"
        " name (file stem) of an ESRGAN-family model in weights/upscalers/, e.g. 4x-UltraSharp.",
    )
    enable_safety_checker: bool = option(
        False, "Check outputs with the Stable Diffusion safety checker (installed in weights/safety_checker/);"
        " a flagged output fails the request.",
    )

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _check_field(f, hints[f.name], value))
        if self.vae_tile_size % 64:
            raise ParamError("vae_tile_size", f"must be a multiple of 64, got {self.vae_tile_size}")
        if self.tile_overlap * 2 > min(self.tiling_width, self.tiling_height):
            raise ParamError(
                "tile_overlap",
                f"must be at most half the smaller tile side ({min(self.tiling_width, self.tiling_height) // 2}),"
                f" got {self.tile_overlap}",
            )

    def replace(self, **changes: Any) -> UpscaleParams:
        """A copy with some fields changed (validated like a new instance)."""
        unknown_fields(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_strings(cls, values: Mapping[str, str | None]) -> UpscaleParams:
        """Build from text values, as they arrive from a form or a command line.

        Unknown names raise `ParamError` with the closest known name as a suggestion; numbers
        and booleans are parsed by the field's type; None and "" mean "use the default"
        (except for prompts, where "" is a legitimate empty prompt).
        """
        unknown_fields(values)
        hints = get_type_hints(cls)
        parsed: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values or values[f.name] is None:
                continue
            text = values[f.name]
            if text == "" and hints[f.name] is not str:
                continue
            parsed[f.name] = _parse_text(f.name, hints[f.name], text)
        return cls(**parsed)


def param_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of `UpscaleParams`, each with `.metadata` help, min, max and choices."""
    return fields(UpscaleParams)


def unknown_fields(names: Mapping[str, Any] | list[str]) -> None:
    """Raise `ParamError` for the first name that is not a parameter, suggesting the closest one."""
    known = [f.name for f in fields(UpscaleParams)]
    for name in names:
        if name not in known:
            raise ParamError(name, f"unknown parameter{did_you_mean(name, known)}")


# --- text parsing, shared by every front end (UpscaleParams.from_strings, the HTTP form, the CLI) ---


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`; did you mean 'x'?` naming the known name closest to `name`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
#: Numbers as people type them: ASCII digits, an optional sign and decimal point. Python's own
#: `int()` and `float()` also take other scripts' digits, `1_000`, `nan` and `inf`, which a
#: form field or a flag should not.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def parse_bool(name: str, text: str) -> bool:
    """true/1/yes/on or false/0/no/off (any case), else `ParamError` naming `name`."""
    word = text.strip().lower()
    if word not in _TRUE + _FALSE:
        raise ParamError(name, f"expected true or false, got {echo(text)}")
    return word in _TRUE


def parse_int(name: str, text: str) -> int:
    """A whole number written in plain ASCII decimal ("3", "-2", "3.0"), else `ParamError` naming `name`."""
    text = text.strip()
    try:
        if not _DECIMAL.fullmatch(text):
            raise ValueError
        if "." not in text:
            return int(text)  # exact, however long (Python refuses over 4300 digits: a ValueError)
        if not float(text).is_integer():
            raise ValueError
        return int(float(text))
    except ValueError:
        raise ParamError(name, f"expected an integer, got {echo(text)}") from None


def parse_float(name: str, text: str) -> float:
    """A number written in plain ASCII decimal ("0.35", "-1", ".5"), else `ParamError` naming `name`."""
    if not _DECIMAL.fullmatch(text.strip()):
        raise ParamError(name, f"expected a number, got {echo(text)}")
    return float(text)


def check_range(name: str, value: float, low: float | None, high: float | None) -> Any:
    """`value` if it lies within [low, high] (None: unbounded), else `ParamError` naming `name`."""
    if low is not None and value < low:
        raise ParamError(name, f"must be >= {format_number(low)}, got {format_number(value)}")
    if high is not None and value > high:
        raise ParamError(name, f"must be <= {format_number(high)}, got {format_number(value)}")
    return value


def _parse_text(name: str, hint: Any, text: str) -> Any:
    base = _base_type(hint)
    if base is str:
        return text
    if base is bool:
        return parse_bool(name, text)
    if hint == int | None and text.strip().lower() in ("none", "null", "random"):
        return None
    return parse_int(name, text) if base is int else parse_float(name, text)


def _base_type(hint: Any) -> type:
    if hint in (bool, int, float, str):
        return hint
    if hint == int | None:
        return int
    raise TypeError(f"unsupported parameter type {hint}")


def _check_field(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """Type-check, normalise (int -> float where a float is expected) and range-check a value."""
    name, meta = f.name, f.metadata
    base = _base_type(hint)
    if value is None:
        if hint == int | None:
            return None
        raise ParamError(name, "is required")
    if base is bool:
        if not isinstance(value, bool):
            raise ParamError(name, f"expected true or false, got {type(value).__name__}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise ParamError(name, f"expected a string, got {type(value).__name__}")
        if meta["choices"] and value not in meta["choices"]:
            raise ParamError(name, f"must be one of {', '.join(meta['choices'])}; got {echo(value)}")
        return value
    # bool is an int subclass in Python; True as a scale factor is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"expected a number, got {type(value).__name__}")
    if base is int:
        if isinstance(value, float) and not value.is_integer():
            raise ParamError(name, f"expected an integer, got {value}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ParamError(name, f"must be a finite number, got {value}")
    return check_range(name, value, meta["min"], meta["max"])


def format_number(number: float) -> str:
    """A limit or value as people write it: 4294967295, not 4.29497e+09; 0.35, not 0.35000000000000003;
    cut short if it is hostile."""
    if isinstance(number, int) or (math.isfinite(number) and float(number).is_integer()):
        text = str(int(number))
        return text if len(text) <= 40 else f"{text[:40]}... ({len(text):,} digits)"
    return f"{number:.6g}"
