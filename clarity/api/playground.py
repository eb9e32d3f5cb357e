"""The playground: a web page at `/` that upscales an image through the public API and compares
before and after.

The page is static files in `web/` (HTML, one script, one stylesheet: no framework, no build step,
nothing loaded from elsewhere), plus `params.json`, which describes every `UpscaleParams` field
(name, type, default, range, choices, meaning, whether it is advanced) and the output formats: the
page builds its form from it, so the parameters stay defined once, in `clarity/params.py`.

All of it is open (`http.OPEN_PATHS`): it holds nothing of the deployment. The page sends the key
the user types with every API call it makes (`GET /v1/models`, the streamed `POST /v1/images/edits`).
Plain FastAPI/Starlette, no runtime: a runtime calls `install_playground` on its app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_type_hints

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from clarity.api.http import PLAYGROUND_ASSETS_PATH, PLAYGROUND_PATH
from clarity.api.wire import MAX_PROMPT_CHARS
from clarity.imageio import INPUT_FORMATS, OUTPUT_FORMATS
from clarity.params import COMMON_PARAMS, UpscaleParams, param_fields

#: The page's files, shipped as package data.
WEB_DIR = Path(__file__).parent / "web"
PAGE = WEB_DIR / "index.html"
#: Where the page reads the description of the parameters from.
PARAMS_JSON_PATH = PLAYGROUND_ASSETS_PATH + "/params.json"
#: The page loads nothing from elsewhere and cannot be framed; the browser enforces it.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)
#: The JSON type of each Python type a parameter may have.
_JSON_TYPES: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def describe_parameter(name: str, hint: Any, default: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """What the page needs to render one parameter: its JSON type, whether it may be none (sent as
    "none": the server chooses, as a random seed), default, limits, choices, meaning and group."""
    nullable = type(None) in get_args(hint)
    base = next(arg for arg in get_args(hint) if arg is not type(None)) if nullable else hint
    entry: dict[str, Any] = {
        "name": name, "type": _JSON_TYPES[base], "nullable": nullable, "default": default,
        "min": metadata["min"], "max": metadata["max"], "choices": list(metadata["choices"] or ()),
        "help": metadata["help"], "advanced": name not in COMMON_PARAMS,
    }
    if base is str and name.endswith("prompt"):  # the edits form's limit on prompts (api/wire.py)
        entry["max_length"] = MAX_PROMPT_CHARS
    return entry


def page_description() -> dict[str, Any]:
    """The page's `params.json`: every parameter in `UpscaleParams`' order, the output formats (name,
    media type, whether lossy) and the input formats the server decodes."""
    hints = get_type_hints(UpscaleParams)
    return {
        "parameters": [describe_parameter(f.name, hints[f.name], f.default, dict(f.metadata))
                       for f in param_fields()],
        "output_formats": [{"name": name, "media_type": entry.media_type, "lossy": entry.lossy}
                           for name, entry in OUTPUT_FORMATS.items()],
        "input_formats": list(INPUT_FORMATS),
    }


def install_playground(app: FastAPI) -> None:
    """Serve the page at `/` (in place of any route there, such as a runtime's own greeting), its
    parameter description and its static files under `/playground/`."""
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) != PLAYGROUND_PATH]
    description = page_description()

    @app.get(PLAYGROUND_PATH, include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html", headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.get(PARAMS_JSON_PATH, include_in_schema=False)
    async def parameters() -> JSONResponse:
        return JSONResponse(description)

    # After the route above: the first route that matches a path answers it.
    app.mount(PLAYGROUND_ASSETS_PATH, StaticFiles(directory=WEB_DIR), name="playground")
