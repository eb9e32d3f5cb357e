"""The OpenAI images API as Clarity speaks it: field names, request parsing and response shapes.

`POST /v1/images/edits` takes the multipart form the official SDKs send for
`client.images.edit(...)`, plus every `UpscaleParams` field as an extra form field (what
`extra_body={...}` adds). OpenAI's standard fields are handled as follows:

- `image` (required): exactly one file. Lists (`image[]`) or several files are refused.
- `model`: a model id this server serves (`GET /v1/models`); absent means the server's default
  model; any other name is a 404 `model_not_found` listing the served ids. `sd_model`, the
  original Clarity's name for it, is accepted as an alias; the two must not disagree.
- `prompt`: the engine's `prompt` (OpenAI requires it; an empty string is a valid prompt);
  at most `MAX_PROMPT_CHARS` characters, as is `negative_prompt`.
- `n`: 1-4 variants, using seeds seed, seed+1, ...
- `size`: `WxH` is a box the output fits in: the output is the largest upscale of the image
  whose sides both fit within W and H (scale = min(W/w, H/h), at most the largest scale factor),
  so any photo works with any of the sizes the typed SDKs offer; a box smaller than the image is
  a 400. Sent with `scale_factor`, that output must fit in the box, else 400. `auto` or absent
  keeps the default scale. The response's `size` is the real output size.
- `response_format`: `url` (default) or `b64_json`.
- `output_format`: png (default), jpeg, webp, avif or gif.
- `output_compression`: 0-100, used as the encoder's quality for jpeg, webp and avif
  (OpenAI's default of 100 means "least compression", which is the same scale).
- `mask`: one image file with the input's aspect ratio, marking what to keep as it is:
  opaque areas when it has an alpha channel (OpenAI's convention: transparent = edit), else
  white areas (the original Clarity's).
- `stream=true`: the answer is Server-Sent Events, as OpenAI streams an image edit (`sse`):
  `partial_images` (0-3) previews while it runs, then one `image_edit.completed` event per image;
  `response_format` then defaults to `b64_json`.
- Accepted and ignored: `background` (input transparency is always preserved),
  `input_fidelity` (use `resemblance`), `quality` (use `num_inference_steps`), `user`,
  `safety_identifier`.

Nothing here knows about tiles or latents: engine fields come from `clarity.params`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, get_args, get_type_hints

from PIL import Image

from clarity.api.errors import invalid, model_not_found
from clarity.errors import echo
from clarity.imageio import OUTPUT_FORMATS, load_image, output_size
from clarity.params import UpscaleParams, check_range, did_you_mean, param_fields, parse_bool, parse_int

#: Where the SDKs post `images.edit` (relative to the host; base_url ends in /v1).
EDITS_PATH = "/v1/images/edits"
#: When a model entry says it was created (a fixed date, like OpenAI's model list).
MODEL_CREATED = 1_735_689_600  # 2025-01-01T00:00:00Z

MAX_VARIANTS = 4
#: OpenAI's limit on `partial_images`.
MAX_PARTIAL_IMAGES = 3
RESPONSE_FORMATS = ("url", "b64_json")
#: Longest `prompt` / `negative_prompt` accepted, in characters. The text encoder reads 77
#: tokens, so this only bounds the work and memory a hostile request can cause.
MAX_PROMPT_CHARS = 4000

#: OpenAI's own form fields for `images.edit`, with what Clarity does with them.
OPENAI_FIELDS: dict[str, str] = {
    "image": "the image to upscale (one file)",
    "mask": "image file: opaque (or, without alpha, white) areas keep the pre-upscaled input",
    "model": "a model id from GET /v1/models (default: the server's default model)",
    "prompt": "what the added detail should look like",
    "n": f"number of variants, 1-{MAX_VARIANTS}",
    "size": "WxH: a box the output fits in (the largest upscale that fits), or auto",
    "response_format": "url or b64_json",
    "output_format": " or ".join(OUTPUT_FORMATS),
    "output_compression": "0-100, quality of lossy formats",
    "background": "ignored: transparency of the input is preserved",
    "input_fidelity": "ignored: use resemblance",
    "quality": "ignored: use num_inference_steps",
    "stream": "true: answer with Server-Sent Events (progress, previews, then the images)",
    "partial_images": f"with stream=true, previews sent while it runs, 0-{MAX_PARTIAL_IMAGES}",
    "user": "ignored",
    "safety_identifier": "ignored",
}
#: Clarity's own form fields that are not engine parameters.
CLARITY_FIELDS: dict[str, str] = {
    "sd_model": "alias of model (the original Clarity's name for it)",
}
#: `size`: a box WIDTHxHEIGHT, in plain ASCII digits.
_SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")
#: The largest scale factor, which a large `size` box is held to.
MAX_SCALE_FACTOR: float = next(f for f in param_fields() if f.name == "scale_factor").metadata["max"]
#: The SDK names a list of images `image[]`.
_IMAGE_FIELDS = ("image", "image[]")


def known_fields() -> list[str]:
    """Every form field name the edits endpoint accepts: OpenAI's, Clarity's, then the engine's."""
    return [*OPENAI_FIELDS, *CLARITY_FIELDS, *(f.name for f in param_fields() if f.name not in OPENAI_FIELDS)]


def edit_form_schema() -> dict[str, Any]:
    """The OpenAPI `requestBody` of the edits endpoint: every accepted field, with its limits.

    LitServe's route takes a raw request, so without this `/docs` and schema-driven clients
    would see no fields at all.
    """
    properties: dict[str, Any] = {
        name: {"type": "string", "description": meaning}
        for name, meaning in {**OPENAI_FIELDS, **CLARITY_FIELDS}.items()
    }
    properties["image"] = {"type": "string", "format": "binary", "description": OPENAI_FIELDS["image"]}
    properties["mask"] = {"type": "string", "format": "binary", "description": OPENAI_FIELDS["mask"]}
    properties["prompt"]["maxLength"] = MAX_PROMPT_CHARS
    properties["n"] = {"type": "integer", "minimum": 1, "maximum": MAX_VARIANTS, "description": OPENAI_FIELDS["n"]}
    properties["response_format"]["enum"] = list(RESPONSE_FORMATS)
    properties["output_format"]["enum"] = list(OUTPUT_FORMATS)
    properties["output_compression"] = {"type": "integer", "minimum": 0, "maximum": 100,
                                        "description": OPENAI_FIELDS["output_compression"]}
    hints = get_type_hints(UpscaleParams)
    for f in param_fields():
        if f.name in OPENAI_FIELDS:
            continue
        hint = hints[f.name]
        json_type = "integer" if int in (hint, *get_args(hint)) else "number" if hint is float else "string"
        entry: dict[str, Any] = {"type": json_type, "description": f.metadata["help"]}
        if f.metadata.get("min") is not None:
            entry["minimum"] = f.metadata["min"]
        if f.metadata.get("max") is not None:
            entry["maximum"] = f.metadata["max"]
        if f.metadata.get("choices"):
            entry["enum"] = list(f.metadata["choices"])
        if json_type == "string" and f.name.endswith("prompt"):
            entry["maxLength"] = MAX_PROMPT_CHARS
        properties[f.name] = entry
    schema = {"type": "object", "properties": properties, "required": ["image"]}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


# --- requests ------------------------------------------------------------------------------------


@dataclass
class EditRequest:
    """A validated `/v1/images/edits` request, ready for the engine."""

    image: Image.Image
    params: UpscaleParams
    n: int = 1
    response_format: str = "url"
    output_format: str = "png"
    output_compression: int | None = None
    mask: Image.Image | None = None
    #: The model id asked for; None means the server's default model.
    model: str | None = None
    #: The server's own id for the HTTP request (returned as `x-request-id`); None outside a server.
    request_id: str | None = None
    #: How the client reached the server (`scheme://host`), for result URLs it can open.
    base_url: str | None = None
    #: Whether the client asked for Server-Sent Events, and how many previews it wants in them.
    stream: bool = False
    partial_images: int = 0
    #: The job this request runs (`jobs.py`), which hears its progress; None for a plain edit.
    job_id: str | None = None


def _is_file(value: Any) -> bool:
    # Starlette's UploadFile; duck-typed so this module does not depend on the web framework.
    return hasattr(value, "filename") and hasattr(value, "file")


def _read_file(value: Any) -> bytes:
    value.file.seek(0)
    return value.file.read()


def _choice(name: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise invalid(name, f"{name} must be one of {', '.join(choices)}; got {echo(value)}")
    return value


def _integer(name: str, text: str, low: int, high: int) -> int:
    return check_range(name, parse_int(name, text), low, high)


def parse_size(size: str) -> tuple[int, int] | None:
    """The box a `size` of "WxH" names, or None for "auto" (or nothing)."""
    text = size.strip().lower()
    if text in ("", "auto"):
        return None
    match = _SIZE.fullmatch(text)
    if match is None or 0 in (box := (int(match[1]), int(match[2]))):
        raise invalid("size", f"size must be WIDTHxHEIGHT (e.g. 1024x1024) or auto; got {echo(size)}")
    return box


def scale_to_fit(box: tuple[int, int], image_size: tuple[int, int]) -> float:
    """The scale factor of the largest upscale of `image_size` that fits in `box`, at most the largest
    scale factor; a box smaller than the image is refused (an upscale never shrinks)."""
    scale = min(box[0] / image_size[0], box[1] / image_size[1])
    if scale < 1:
        raise invalid(
            "size", f"size {box[0]}x{box[1]} is smaller than the image ({image_size[0]}x{image_size[1]}); the output"
            f" fits in that box, so it must be at least as large, e.g. {2 * image_size[0]}x{2 * image_size[1]}",
        )
    return min(scale, MAX_SCALE_FACTOR)


def parse_edit_form(
    items: Iterable[tuple[str, Any]], models: Collection[str], max_input_pixels: int | None = None
) -> EditRequest:
    """Validate an edits form (as (name, value) pairs) into an `EditRequest`.

    `models` are the ids the server serves; `model` (or its alias `sd_model`) must be one of them.
    Raises `APIError` or `ParamError` naming the field. Values are strings, except files. Checks
    run in order of cost, so a bad field is reported before the image is decoded.
    """
    fields, image_file = _collect_fields(items)
    mask_file = fields.pop("mask", None)
    for name in ("prompt", "negative_prompt"):
        if len(fields.get(name, "")) > MAX_PROMPT_CHARS:
            raise invalid(name, f"{name} is {len(fields[name]):,} characters long; the limit is {MAX_PROMPT_CHARS:,}")
    model = _model_field(fields, models)
    stream = parse_bool("stream", fields.get("stream") or "false")
    partial_images = _integer("partial_images", fields.get("partial_images") or "0", 0, MAX_PARTIAL_IMAGES)

    n = _integer("n", fields.get("n", "1"), 1, MAX_VARIANTS)
    default_format = "b64_json" if stream else "url"  # OpenAI's streamed events carry the image
    response_format = _choice("response_format", fields.get("response_format") or default_format, RESPONSE_FORMATS)
    output_format = _choice("output_format", (fields.get("output_format") or "png").lower(), OUTPUT_FORMATS)
    compression = fields.get("output_compression")
    output_compression = _integer("output_compression", compression, 0, 100) if compression else None
    engine_names = {f.name for f in param_fields()}
    params = UpscaleParams.from_strings({name: value for name, value in fields.items() if name in engine_names})

    # Decoding last: it is the expensive check.
    load_options = {"max_pixels": max_input_pixels} if max_input_pixels else {}
    image = load_image(_read_file(image_file), param="image", **load_options)
    mask = load_image(_read_file(mask_file), param="mask", **load_options) if mask_file is not None else None
    if fields.get("size"):
        params = _apply_size(fields["size"], image.size, params, scale_factor_sent="scale_factor" in fields)
    return EditRequest(image, params, n, response_format, output_format, output_compression, mask, model,
                       stream=stream, partial_images=partial_images)


def _collect_fields(items: Iterable[tuple[str, Any]]) -> tuple[dict[str, Any], Any]:
    """The form's text fields by name (plus the `mask` file) and its one image file.

    Unknown names, repeated fields, several images and files where text belongs are refused.
    """
    files: list[Any] = []
    fields: dict[str, Any] = {}
    known = known_fields()
    for name, value in items:
        if name in _IMAGE_FIELDS:
            files.append(value)
            continue
        if name not in known:
            raise invalid(name, f"unknown parameter '{name}'{did_you_mean(name, known)}", code="unknown_parameter")
        if name in fields:
            raise invalid(name, f"{name} was given more than once")
        fields[name] = value
    if "mask" in fields and not _is_file(fields["mask"]):
        raise invalid("mask", "mask must be an image file upload, not a text field")
    for name, value in fields.items():
        if name != "mask" and _is_file(value):
            raise invalid(name, f"{name} must be a text field, not a file")
    if not files:
        raise invalid("image", "image is required: send one image file in the `image` field")
    if len(files) > 1:
        raise invalid("image", f"send one image per request; got {len(files)}")
    if not _is_file(files[0]):
        raise invalid("image", "image must be a file upload, not a text field")
    return fields, files[0]


def _apply_size(
    size: str, image_size: tuple[int, int], params: UpscaleParams, scale_factor_sent: bool
) -> UpscaleParams:
    """`params` with the scale factor the box `size` asks for; with `scale_factor` also sent, its output
    must fit in the box (an SDK may always send a size), and the box never silently wins."""
    box = parse_size(size)
    if box is None:
        return params
    if not scale_factor_sent:
        return params.replace(scale_factor=scale_to_fit(box, image_size))
    width, height = output_size(image_size, params.scale_factor)
    if width > box[0] or height > box[1]:
        raise invalid(
            "size", f"scale_factor {params.scale_factor:g} makes a {width}x{height} output, which does not fit in"
            f" size {box[0]}x{box[1]}; send one of them, or a box the output fits in",
        )
    return params


def _model_field(fields: dict[str, Any], models: Collection[str]) -> str | None:
    """The model id the form asks for (via `model` or its alias `sd_model`), None for the default."""
    model, alias = fields.get("model"), fields.get("sd_model")
    if model is not None and alias is not None and model != alias:
        raise invalid("sd_model", f"sd_model ({echo(alias)}) and model ({echo(model)}) name different models; send one")
    param, name = ("model", model) if model is not None else ("sd_model", alias)
    if name is not None and name not in models:
        raise model_not_found(name, models, param=param)
    return name


# --- responses -----------------------------------------------------------------------------------


def images_response(
    data: list[dict[str, Any]],
    output_format: str,
    size: tuple[int, int],
    megapixels: float,
    seconds: float,
    retries: list[str] | None = None,
) -> dict[str, Any]:
    """The `ImagesResponse` body.

    OpenAI's `usage` counts tokens, which mean nothing here; it is left out (the SDK's model
    requires token fields) and Clarity's own accounting goes under `clarity_usage`, an extra
    key the SDKs keep but do not need.
    """
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": output_format,
        "size": f"{size[0]}x{size[1]}",
        "clarity_usage": {
            "output_megapixels": round(megapixels, 4),
            "seconds": round(seconds, 3),
            # Never silent: a result made with smaller settings after running out of memory says so.
            **({"retries": retries} if retries else {}),
        },
    }


def model_object(model_id: str) -> dict[str, Any]:
    """The entry for one served model in `GET /v1/models`."""
    return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "clarity"}


def models_list(model_ids: Iterable[str]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(model_id) for model_id in model_ids]}


def megapixels(sizes: Iterable[tuple[int, int]]) -> float:
    return math.fsum(w * h for w, h in sizes) / 1e6


# --- streamed edits: OpenAI's Server-Sent Events -------------------------------------------------

#: OpenAI's event names for a streamed image edit.
PARTIAL_IMAGE_EVENT = "image_edit.partial_image"
COMPLETED_EVENT = "image_edit.completed"
#: The SDKs need `usage` on a completed event; OpenAI counts tokens, which mean nothing here.
ZERO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
              "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Event: its name, and its data as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def sse_comment(text: str) -> bytes:
    """A comment line: clients ignore it, proxies and timers see traffic."""
    return f": {text}\n\n".encode()


def partial_image_event(preview: dict[str, Any]) -> dict[str, Any]:
    """`image_edit.partial_image` for a preview a worker recorded (`b64_json`, `partial_image_index`,
    `size`, `output_format`, and Clarity's `progress`, the share of the work done when it was taken)."""
    return {"type": PARTIAL_IMAGE_EVENT, "created_at": int(time.time()), "quality": "auto", "background": "auto",
            **preview}


def completed_events(response: dict[str, Any]) -> list[dict[str, Any]]:
    """One `image_edit.completed` per image of an `ImagesResponse` (`images_response`): the image as it
    was asked for (`b64_json`, or `url` with response_format=url), plus Clarity's `seed`,
    `revised_prompt` and `clarity_usage`."""
    return [
        {"type": COMPLETED_EVENT, "created_at": response["created"], "size": response["size"], "quality": "auto",
         "background": "auto", "output_format": response["output_format"], "usage": ZERO_USAGE,
         **item, "clarity_usage": response["clarity_usage"]}
        for item in response["data"]
    ]


def error_event(body: dict[str, Any]) -> dict[str, Any]:
    """The `error` event that ends a stream which failed after it started: OpenAI's error shape."""
    return {"type": "error", **body}
