"""The API's description: an OpenAPI schema of the public API only, and the pages that show it offline.

A runtime calls `install_docs` on its app once every route is added. It replaces FastAPI's default
`/docs`, `/redoc` and `/openapi.json` (whose pages load Swagger UI and ReDoc from a CDN, blank on an
offline machine, and whose schema lists every route, internal ones included) with:

- `/openapi.json`: titled Clarity, describing only `PUBLIC_OPERATIONS` (the edits form, streamed
  or not, jobs, models, result files, health), with an HTTP bearer scheme on the routes that need the key;
- `/docs` (Swagger UI, with "Authorize" for trying calls) and `/redoc`, whose scripts and styles
  are served from `/docs/assets/`: the files the `fastapi-offline` package ships.

Plain FastAPI/Starlette: no runtime. Which of these routes need the key is `http.OPEN_PATHS`'s to say.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from clarity import __version__
from clarity.api import wire
from clarity.api.http import DOCS_ASSETS_PATH, DOCS_PATH, HEALTH_PATH, MODELS_PATH, OPENAPI_PATH, REDOC_PATH, is_open
from clarity.api.job_routes import JOBS_PATH, MAX_PAGE
from clarity.api.results import FILES_ROUTE

#: Swagger UI's and ReDoc's built files, as fastapi-offline ships them (its `static` package data).
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
SWAGGER_JS, SWAGGER_CSS = "swagger-ui-bundle.js", "swagger-ui.css"
REDOC_JS, FAVICON = "redoc.standalone.js", "favicon.png"
PAGE_TITLE = "Clarity API"
#: The name of the bearer scheme in the schema (what Swagger UI's "Authorize" fills in).
BEARER = "bearerAuth"

DESCRIPTION = """\
Clarity is a self-hosted creative image upscaler (Stable Diffusion 1.5 with ControlNet-tile, tiled img2img)
behind an OpenAI-compatible API: an app using an official OpenAI SDK changes only `base_url`, and
`client.images.edit(...)` upscales the image, with Clarity's own parameters as extra form fields.

**Auth**: a server started with `--api-key` (or `$CLARITY_API_KEY`) wants `Authorization: Bearer <key>` on
the routes marked with a lock (use "Authorize" above to try them); `/health`, the result files and these docs
are open.

**Errors** have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with `Retry-After` where a
retry may succeed and `x-should-retry: false` where it would fail again.

More in the README: "The OpenAI-compatible server" (options, limits, auth, routes) and "Parameters" (every
upscaling parameter, its default and range).
"""

#: Every error the edits endpoint answers, and when.
EDIT_ERRORS: dict[int, str] = {
    400: "A field is invalid (`error.param` names it; an image or output over the size limits too), the body "
         "is not a multipart form with one image, or the safety checker flagged an output "
         "(`content_policy_violation`).",
    401: "The API key is missing or wrong (`invalid_api_key`).",
    404: "No such model (`model_not_found`, listing the served ids).",
    408: "The body did not arrive within `--upload-timeout` (`upload_timeout`).",
    413: "The body is over `--max-payload-mb`.",
    429: "The queue is full (`queue_full`); retry later.",
    500: "The upscale failed on the server (details in its log).",
    503: "The workers are loading or restarting, the server is shutting down, or url mode's result storage is "
         "unreachable (`storage_unavailable`); retry after `Retry-After`.",
    504: "The request waited too long for a worker (`queue_timeout`, retry later), or its upscale ran over the "
         "compute limit (`compute_timeout`, which a retry would repeat).",
    507: "url mode, and the result storage is full (`storage_full`).",
}
#: What the job routes answer besides the job.
JOB_ERRORS: dict[int, str] = {
    404: "No such job (`job_not_found`): never submitted, deleted, or expired.",
    409: "The job's state does not allow it: cancelling a finished job (`job_finished`), deleting an unfinished"
         " one (`job_not_finished`).",
}

#: Response shapes, as `#/components/schemas/...`.
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
        }}},
    },
    "ImagesResponse": {
        "type": "object", "description": "OpenAI's ImagesResponse, with Clarity's accounting in `clarity_usage`.",
        "properties": {
            "created": {"type": "integer"},
            "data": {"type": "array", "items": {"type": "object", "properties": {
                "url": {"type": "string", "description": "url mode: where to fetch the image (expires)"},
                "b64_json": {"type": "string", "description": "b64_json mode: the image, base64"},
                "revised_prompt": {"type": "string"}, "seed": {"type": "integer"},
            }}},
            "output_format": {"type": "string"},
            "size": {"type": "string", "description": "WxH of the output"},
            "clarity_usage": {"type": "object", "properties": {
                "output_megapixels": {"type": "number"}, "seconds": {"type": "number"},
                "retries": {"type": "array", "items": {"type": "string"},
                            "description": "present when the result was made with smaller settings after running "
                                           "out of memory"},
            }},
        },
    },
    "Job": {
        "type": "object", "description": "An async job: an edit run in the background.",
        "properties": {
            "id": {"type": "string"}, "object": {"const": "job"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "model": {"type": "string"},
            "created_at": {"type": "integer"}, "started_at": {"type": ["integer", "null"]},
            "finished_at": {"type": ["integer", "null"]},
            "expires_at": {"type": ["integer", "null"], "description": "when a finished job and its result go"},
            "queue_position": {"type": ["integer", "null"], "description": "queued: jobs that run before it"},
            "progress": {"type": "number", "description": "share of the denoising work done, 0-1"},
            "eta_seconds": {"type": ["number", "null"], "description": "running: seconds left, estimated"},
            "attempts": {"type": "integer", "description": "runs started (a restart runs a job again)"},
            "cancel_requested": {"type": "boolean"},
            "result": {"oneOf": [{"$ref": "#/components/schemas/ImagesResponse"}, {"type": "null"}],
                       "description": "succeeded: what the edit would have answered"},
            "error": {"type": ["object", "null"], "description": "failed or cancelled: OpenAI's error object"},
            "webhook": {"type": ["object", "null"]},
        },
    },
    "JobList": {
        "type": "object",
        "properties": {"object": {"const": "list"}, "has_more": {"type": "boolean"},
                       "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
                       "data": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}},
    },
    "Model": {
        "type": "object",
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}},
    },
    "ModelList": {
        "type": "object",
        "properties": {"object": {"const": "list"},
                       "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}},
    },
}


def _json(description: str, shape: str) -> dict[str, Any]:
    """A JSON response of one of `SCHEMAS`."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}}}


def _errors(statuses: dict[int, str]) -> dict[str, Any]:
    """Error responses in OpenAI's shape, by status."""
    return {str(status): _json(description, "Error") for status, description in statuses.items()}


_JOB_FORM = copy.deepcopy(wire.edit_form_schema())
_JOB_FORM["content"]["multipart/form-data"]["schema"]["properties"].update({
    "webhook_url": {"type": "string", "description": "where to POST the job's events (Standard Webhooks, signed);"
                                                     " must be on the server's --webhook-allow list"},
    "webhook_events": {"type": "string", "description": "comma-separated: started, progress, completed"
                                                        " (default: completed)"},
})
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"},
                "description": "Makes a submission safe to retry: the same key and form return the same job; the"
                               " same key with another form is a 409 `idempotency_conflict`."}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}

#: The public API, by route path and method: what the schema says of each operation.
PUBLIC_OPERATIONS: dict[str, dict[str, dict[str, Any]]] = {
    wire.EDITS_PATH: {"post": {
        "operationId": "createImageEdit", "summary": "Upscale an image (the SDKs' images.edit)",
        "description": "A multipart form: OpenAI's `images.edit` fields plus every Clarity parameter as an extra "
                       "field. With `stream=true` the answer is Server-Sent Events as OpenAI streams an edit: "
                       "`image_edit.partial_image` previews (`partial_images`, 0-3), then one "
                       "`image_edit.completed` per image, or an `error` event.",
        "requestBody": wire.edit_form_schema(),
        "responses": {
            "200": {**_json("The upscaled image(s).", "ImagesResponse"),
                    "content": {**_json("", "ImagesResponse")["content"],
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(EDIT_ERRORS),
        },
    }},
    JOBS_PATH: {
        "post": {
            "operationId": "createJob", "summary": "Submit an edit as an async job",
            "description": "The edits form (not streamed), plus an optional webhook. Answered at once; poll the "
                           "job or receive its webhooks. A retry with the same Idempotency-Key returns the job "
                           "(200, `Idempotent-Replayed: true`).",
            "parameters": [_IDEMPOTENCY], "requestBody": _JOB_FORM,
            "responses": {"202": _json("The job, queued.", "Job"), "200": _json("The job of this key.", "Job"),
                          **_errors({400: EDIT_ERRORS[400], 404: EDIT_ERRORS[404],
                                     409: "The Idempotency-Key was used with another form.",
                                     429: "The job store is full (`too_many_jobs`; `param` names the limit)."})},
        },
        "get": {
            "operationId": "listJobs", "summary": "Jobs, newest first",
            "parameters": [
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 20}},
                {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "a job id: the page after it (`last_id` of the page before)"},
            ],
            "responses": {"200": _json("A page of jobs.", "JobList"), **_errors({400: "Bad limit or after."})},
        },
    },
    JOBS_PATH + "/{job_id}": {
        "get": {"operationId": "retrieveJob", "summary": "A job: status, progress, result",
                "parameters": [_JOB_ID],
                "responses": {"200": _json("The job.", "Job"), **_errors({404: JOB_ERRORS[404]})}},
        "delete": {"operationId": "deleteJob", "summary": "Delete a finished job and its result",
                   "parameters": [_JOB_ID],
                   "responses": {"200": {"description": "Deleted."}, **_errors(JOB_ERRORS)}},
    },
    JOBS_PATH + "/{job_id}/cancel": {"post": {
        "operationId": "cancelJob", "summary": "Cancel a queued or running job",
        "description": "A queued job is cancelled at once; a running one after its current denoising step.",
        "parameters": [_JOB_ID], "responses": {"200": _json("The job.", "Job"), **_errors(JOB_ERRORS)},
    }},
    MODELS_PATH: {"get": {
        "operationId": "listModels", "summary": "The served models",
        "responses": {"200": _json("Every model id `model` may name.", "ModelList")},
    }},
    MODELS_PATH + "/{model_id}": {"get": {
        "operationId": "retrieveModel", "summary": "One served model",
        "responses": {"200": _json("The model.", "Model"), **_errors({404: "Not a served model."})},
    }},
    FILES_ROUTE + "/{name}": {"get": {
        "operationId": "getFile", "summary": "A url-mode result",
        "description": "Open: the unguessable name is the credential. Results expire (an hour by default).",
        "responses": {
            "200": {"description": "The image, in the requested output format.",
                    "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
            **_errors({404: "No such file, or it expired (`file_not_found`)."}),
        },
    }},
    HEALTH_PATH: {"get": {
        "operationId": "health", "summary": "Whether the server takes edits (for load balancers)",
        "responses": {
            "200": {"description": "Ready.", "content": {"text/plain": {"schema": {"const": "ok"}}}},
            "503": {"description": "Workers still loading, or the server is shutting down."},
        },
    }},
}


def public_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema of `app`'s public API: `PUBLIC_OPERATIONS` only, never `/info` or other internals."""
    routes = [route for route in app.routes if isinstance(route, APIRoute) and route.path in PUBLIC_OPERATIONS]
    schema = get_openapi(title="Clarity", version=__version__, description=DESCRIPTION, routes=routes)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            operation.update(copy.deepcopy(PUBLIC_OPERATIONS[path][method]))
            if is_open(path):
                operation["security"] = []
            else:
                operation["security"] = [{BEARER: []}]
                operation["responses"].setdefault("401", _json(EDIT_ERRORS[401], "Error"))
    # FastAPI's own components describe its validation errors, which these routes never answer.
    schema["components"] = {
        "schemas": copy.deepcopy(SCHEMAS),
        "securitySchemes": {BEARER: {"type": "http", "scheme": "bearer",
                                     "description": "The server's API key (`--api-key`)."}},
    }
    return schema


def install_docs(app: FastAPI) -> None:
    """Serve the public schema and offline docs pages in place of FastAPI's defaults (see the module)."""
    replaced = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url} - {None, ""}
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in replaced]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # built once, on first use, when every route is in place
            app.openapi_schema = public_openapi(app)
        return app.openapi_schema

    app.openapi = openapi
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get(OPENAPI_PATH, include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_PATH, title=PAGE_TITLE,
            swagger_js_url=f"{DOCS_ASSETS_PATH}/{SWAGGER_JS}", swagger_css_url=f"{DOCS_ASSETS_PATH}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{DOCS_ASSETS_PATH}/{FAVICON}",
            # Swagger UI would otherwise fetch a validity badge from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=OPENAPI_PATH, title=PAGE_TITLE, redoc_js_url=f"{DOCS_ASSETS_PATH}/{REDOC_JS}",
            redoc_favicon_url=f"{DOCS_ASSETS_PATH}/{FAVICON}", with_google_fonts=False,
        )
