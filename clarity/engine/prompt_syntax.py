"""The prompt syntax of AUTOMATIC1111 and the original Clarity Upscaler, read into plain data.

- **Weighting**: `(word:1.3)`, `(word)` = x1.1, `[word]` = /1.1, nested (weights multiply),
  `\\(` `\\)` `\\[` `\\]` for literal brackets, and `BREAK` to start a new 75-token window.
  A weight that is not a number, `(word:abc)`, is read as A1111 reads it: the colon and the
  text are literal and the brackets emphasise by 1.1. A malformed number such as `(word:1.2.3)`
  is a `ParamError`, and so is a weight that is not finite (`nan`, `inf`, `1e999`) or, written
  or multiplied out by nesting, beyond +-`MAX_WEIGHT`: it would be encoded into NaN or
  overflowing embeddings, and the upscale would fail or come out as noise.
  Exponents (`(word:2e-1)`) are read as numbers, as Python and LoRA tags read them.
- **LoRA tags**: `<lora:name>`, `<lora:name:weight>` or `<lora:name:text_encoder_weight:unet_weight>`;
  other `<kind:...>` extra-network tags are refused.

Only text is handled here, no models: `PromptEncoder` (prompts.py) loads what the tags name
and encodes the weighted fragments.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from clarity.errors import ParamError, echo

#: A1111's extra-network tag, `<kind:arguments>`; only the `lora` kind is supported here.
_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")

# A1111's weighting syntax, tokenised. compel has no A1111 reader, and rewriting A1111 text
# into compel's own syntax would mean escaping compel's operators (`+`, `-`, `.and()`, quotes)
# in ordinary words, so this small reader produces (text, weight) fragments and compel
# encodes them. Alternatives in order: an escaped bracket or backslash, a lone backslash,
# an opening bracket, a `:weight)` closing, a closing bracket, plain text, a lone colon. A
# weight is A1111's digits and dots (ASCII digits, as in every numeric field), or what else
# Python reads as a float (an exponent, nan, inf): `(cat:nan)` is then refused, not quietly
# taken as the text "cat:nan".
_WEIGHTING_TOKEN = re.compile(
    r"\\[\\()\[\]]|\\|[(\[]|:\s*([+-]?(?:[.0-9]+(?:[eE][+-]?[0-9]+)?|(?i:nan|inf(?:inity)?)))\s*\)|[)\]]"
    r"|[^\\()\[\]:]+|:"
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
#: Multiplier of `(text)`; `[text]` divides by it. A1111's values.
EMPHASIS = 1.1
#: Largest magnitude of a weight, written or multiplied out by nested brackets, and of a LoRA
#: tag's weights. Useful weights lie within about -2 to 3; far beyond, embeddings leave
#: anything the model was trained on, and by 1e30 even float32 attention overflows into NaN.
MAX_WEIGHT = 100.0

#: Prompt text as (text, weight) pieces, in order.
Fragments = list[tuple[str, float]]


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:name:...>` tag: the file stem and its weights on the text encoder and the UNet."""

    name: str
    text_encoder_weight: float = 1.0
    unet_weight: float = 1.0


def split_lora_tags(text: str, param: str) -> tuple[str, list[LoraTag]]:
    """`text` without its `<lora:...>` tags, and the tags. Other `<kind:...>` tags are refused."""
    tags = []
    for match in _EXTRA_NETWORK_TAG.finditer(text):
        kind, arguments = match.group(1), match.group(2)
        if kind != "lora":
            raise ParamError(param, f"{match.group(0)}: <{kind}:...> tags are not supported, only <lora:name:weight>")
        name, *weights = (part.strip() for part in arguments.split(":"))
        if not name:
            raise ParamError(param, f"{match.group(0)}: the LoRA name is missing")
        if len(weights) > 2:
            raise ParamError(param, f"{match.group(0)}: expected <lora:name>, <lora:name:weight> or"
                                    " <lora:name:text_encoder_weight:unet_weight>")
        numbers = [_number(weight, param, match.group(0)) for weight in weights] or [1.0]
        tags.append(LoraTag(name, numbers[0], numbers[-1]))
    return _EXTRA_NETWORK_TAG.sub("", text), tags


def parse_weighting(text: str, param: str) -> list[Fragments]:
    """A1111 weighting: the text as segments (split at `BREAK`) of (text, weight) fragments.

    Adjacent fragments of equal weight are merged and empty ones dropped; there is always at
    least one segment.
    """
    pieces: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _WEIGHTING_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            pieces.append([token[1], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _number(weight, param, "(text:weight)"))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), 1 / EMPHASIS)
        else:  # text, or a bracket that closes nothing: literal, as in A1111
            pieces.append([token, 1.0])
    # Unclosed brackets weight everything after them, as in A1111.
    for start in open_round:
        scale_from(start, EMPHASIS)
    for start in open_square:
        scale_from(start, 1 / EMPHASIS)
    _check_multiplied_weights(pieces, param)

    segments: list[Fragments] = [[]]
    for piece_text, piece_weight in pieces:
        for index, part in enumerate(_BREAK.split(piece_text)):
            if index > 0:
                segments.append([])
            segment = segments[-1]
            if not part:
                continue
            if segment and segment[-1][1] == piece_weight:
                segment[-1] = (segment[-1][0] + part, piece_weight)
            else:
                segment.append((part, piece_weight))
    kept = [segment for segment in segments if any(t.strip() for t, _ in segment)]
    return kept or [[("", 1.0)]]


def _number(text: str, param: str, where: str) -> float:
    """`text` as a weight; `ParamError` naming `param` (and `where`) unless it is a number within +-`MAX_WEIGHT`."""
    try:
        if not text.isascii() or "_" in text:  # float() also reads other scripts' digits and 1_000
            raise ValueError
        value = float(text)
    except ValueError:
        raise ParamError(param, f"{where}: the weight {echo(text)} is not a number") from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise ParamError(param, f"{where}: the weight must be a number from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g},"
                                f" got {echo(text)}")
    return value


def _check_multiplied_weights(pieces: list[list], param: str) -> None:
    """`ParamError` naming `param` when nested brackets multiply a piece's weight beyond +-`MAX_WEIGHT`.

    Each written weight is within the limit, but their product need not be: `((cat:90):90)`.
    """
    for text, weight in pieces:
        if abs(weight) > MAX_WEIGHT:
            raise ParamError(param, f"nested brackets multiply the weight of {echo(text.strip())} to {weight:.3g};"
                                    f" weights must be from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
