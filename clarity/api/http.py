"""What every HTTP front end of the API shares: checks before the route, error reshaping, and the
routes that are not the edits endpoint (models, result files).

Plain Starlette/FastAPI, no runtime: a runtime adds the edits route itself (it decides where the
work runs), puts `GuardMiddleware` outermost, and calls `install_error_handlers`,
`add_public_routes` and, last, `docs.install_docs` on its app.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clarity.api import wire
from clarity.api.errors import (
    APIError,
    error_body,
    model_not_found,
    retry_headers,
    shutting_down,
    storage_unavailable,
)
from clarity.api.results import FILES_ROUTE, ResultStore, StorageUnavailable, media_type

logger = logging.getLogger(__name__)

#: The route load balancers probe: 200 while the server takes edits.
HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
#: The API's description (OpenAPI), and the pages that show it, with their scripts and styles.
OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
DOCS_ASSETS_PATH = "/docs/assets"
#: The playground page (api/playground.py), and its scripts, styles and parameter description.
PLAYGROUND_PATH = "/"
PLAYGROUND_ASSETS_PATH = "/playground"
#: Routes anyone may call; an entry ending in "/" opens every path under it (the root excepted: it
#: is the page alone). Load balancers probe /health without credentials; the docs and the
#: playground hold nothing of the deployment and are opened in a browser (which cannot send the key)
#: before trying calls with it; the result files' unguessable names are their credential.
#: Everything else (`/info`, which names paths of the deployment, and every call the pages make)
#: needs the key.
OPEN_PATHS = frozenset({
    HEALTH_PATH, OPENAPI_PATH, DOCS_PATH, REDOC_PATH, DOCS_ASSETS_PATH + "/", FILES_ROUTE + "/",
    PLAYGROUND_PATH, PLAYGROUND_ASSETS_PATH + "/",
})
#: What a new edit (and /health) hears while the server stops.
NO_NEW_WORK = "The server is shutting down and takes no new requests; retry shortly."


class ForwardedHeaders:
    """How a client reached the server: the request's own scheme and `Host`, or, from a trusted reverse
    proxy, its `X-Forwarded-Proto` and `X-Forwarded-Host`.

    `trusted` holds addresses, networks or "*" (uvicorn's `--forwarded-allow-ips`). Hand-written
    because uvicorn's own proxy middleware reads the protocol but not the host.
    """

    def __init__(self, trusted: Iterable[str] = ()) -> None:
        entries = tuple(trusted)
        self.trust_all = "*" in entries
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in entries if entry != "*"]

    def base_url(self, scope: Scope) -> str:
        """`scheme://host` as the client used it, for result URLs that client can open."""
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        scheme, host = scope.get("scheme", "http"), headers.get("host")
        if self._trusts(scope.get("client")):
            scheme = _first(headers.get("x-forwarded-proto")) or scheme
            host = _first(headers.get("x-forwarded-host")) or host
        if not host:  # HTTP/1.0 without a Host: the address the request arrived at
            address, port = scope.get("server") or ("localhost", None)
            host = f"{address}:{port}" if port else address
        return f"{scheme}://{host}"

    def _trusts(self, client: tuple[str, int] | None) -> bool:
        if self.trust_all:
            return True
        try:
            address = ipaddress.ip_address(client[0]) if client else None
        except ValueError:  # not an IP (a unix socket, a test client)
            return False
        return address is not None and any(address in network for network in self.networks)


def _first(value: str | None) -> str | None:
    """The first of a proxy chain's comma-separated values (the one the client's side set)."""
    return value.split(",")[0].strip() or None if value else None


def is_open(path: str, open_paths: Collection[str] = OPEN_PATHS) -> bool:
    """Whether `path` (a request path, or a route's path template) is served without the key: it is one
    of `open_paths`, or lies under one that ends with "/" (other than the root, which opens only itself)."""
    prefixes = (entry for entry in open_paths if entry.endswith("/") and entry != "/")
    return path in open_paths or any(path.startswith(entry) for entry in prefixes)


def json_error(error: APIError) -> Response:
    return JSONResponse(error.body, status_code=error.status, headers=error.headers)


def early_error(error: HTTPException) -> Response:
    """The answer to an HTTP error raised in a middleware, before any route (where the app's error handlers
    do not reach): the guard's limits raise them from its `receive` with OpenAI's shape as the detail."""
    detail = error.detail if isinstance(error.detail, dict) else error_body(error.status_code, str(error.detail))
    return JSONResponse(detail, status_code=error.status_code, headers=error.headers)


#: RFC 2046's boundary: 1-70 of these characters, not ending in a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def multipart_boundary(content_type: bytes) -> bytes | None:
    """The boundary of a `multipart/form-data` Content-Type, or None if it is another type, or has
    no boundary, or an invalid one (python-multipart parses the header, quotes included)."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind.lower() != b"multipart/form-data" or not boundary or not _BOUNDARY.fullmatch(boundary):
        return None
    return boundary


def text_field(body: bytes, boundary: bytes, name: str, max_chars: int = 64) -> str | None:
    """The first text field `name` of a multipart body (its first `max_chars` bytes), or None if it has none.

    python-multipart reads the parts; only the part's name is looked at, so the image parts cost a scan,
    not a copy.
    """
    part: dict[str, Any] = {"header": b"", "value": b"", "name": None}
    found: list[str] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["header"] = data[start:end].lower()

    def on_header_value(data: bytes, start: int, end: int) -> None:
        if part["header"] == b"content-disposition":
            _, options = parse_options_header(data[start:end])
            part["name"] = options.get(b"name", b"").decode("latin-1")
            part["file"] = b"filename" in options

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part["name"] == name and not part.get("file") and len(part["value"]) < max_chars:
            part["value"] += data[start:end]

    def on_part_end() -> None:
        if part["name"] == name and not part.get("file") and not found:
            found.append(part["value"][:max_chars].decode("utf-8", "replace"))
        part.update(header=b"", value=b"", name=None, file=False)

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except Exception:  # a malformed body: the form parser that reads it in earnest reports it
        logger.debug("multipart body not readable while looking for %s", name, exc_info=True)
    return found[0] if found else None


def body_ended(message: Message) -> bool:
    """Whether `message`, from an ASGI `receive`, is the last of the request's body (or a disconnect)."""
    return message["type"] != "http.request" or not message.get("more_body", False)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first.

    A runtime reads it before the form parser to know whether the edit is streamed
    (`job_routes.asks_for_stream`); the form parser would hold it in memory all the same.
    """
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if body_ended(message):
            return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app behind: the body read already, then what the client sends next (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class GuardMiddleware:
    """Auth, body size and upload time limits, readiness and content type, checked before any route.

    A plain ASGI middleware, so that it runs before any form is parsed: an oversized or slow
    upload is refused as it arrives, not after it has been buffered. The key is checked on
    every route but `open_paths` (default `OPEN_PATHS`; see `is_open`). `ready()` says whether
    a worker can take edits yet (else 503 with Retry-After). `stopping()` says whether the server
    is shutting down: then new edits and `/health` get a 503 `shutting_down` (so load balancers
    move on), while result files and the other routes are still served to the clients that were
    given them.
    """

    def __init__(
        self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, upload_timeout: float,
        ready: Callable[[], bool], stopping: Callable[[], bool] = lambda: False,
        open_paths: Collection[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.open_paths = frozenset(open_paths)
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.upload_timeout = upload_timeout
        self.ready = ready
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        boundary = multipart_boundary(dict(scope["headers"]).get(b"content-type", b""))
        refusal = self._refusal(scope, boundary)
        if refusal is not None:
            await json_error(refusal)(scope, receive, send)
            return
        await self.app(scope, self._limited(receive, boundary), send)

    def _refusal(self, scope: Scope, boundary: bytes | None) -> APIError | None:
        """The answer to send at once, from the path and headers alone (`boundary`: the multipart
        body's, None if it is not one); None to go on."""
        path = scope["path"]
        headers = {name.decode("latin-1").lower(): value for name, value in scope["headers"]}
        if self._key and not is_open(path, self.open_paths):
            rejection = self._check_key(headers.get("authorization"))
            if rejection:
                return APIError(401, rejection, code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        if path in (wire.EDITS_PATH, HEALTH_PATH) and self.stopping():
            return shutting_down(NO_NEW_WORK)
        if path != wire.EDITS_PATH:
            return None
        if not self.ready():
            return APIError(503, "The model is still loading; retry shortly.")
        if boundary is None:
            # A JSON body cannot carry the image file, and neither can a urlencoded form.
            message = "Send the request body as multipart/form-data with a valid boundary, and the image as a file,"
            return APIError(400, message + " as the OpenAI SDKs do.", code="invalid_content_type")
        return None

    def _limited(self, receive: Receive, boundary: bytes | None) -> Receive:
        """`receive` bounded in bytes (chunked uploads carry no Content-Length) and in time (a
        trickling upload would hold its place for as long as its client likes); a multipart body
        must end with its closing boundary (the form parser would drop a cut-off last part)."""
        received = 0
        body_done = False
        tail = b""
        deadline = asyncio.get_running_loop().time() + self.upload_timeout

        async def limited_receive() -> Message:
            nonlocal received, body_done, tail
            if body_done:
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.0))
            except TimeoutError:
                message = f"The request body did not arrive within {self.upload_timeout:g} s."
                raise HTTPException(408, detail=error_body(408, message, code="upload_timeout")) from None
            body_done = body_ended(message)
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                # FastAPI's subclass: endpoints that re-raise HTTP errors do so with this one, as it is.
                raise HTTPException(413, detail=self._too_large().body)
            if boundary is not None:
                tail = (tail + chunk)[-(len(boundary) + 8):]
                if body_done and not tail.rstrip(b"\r\n\t ").endswith(b"--" + boundary + b"--"):
                    message = "The multipart body ends without its closing boundary (a cut-off upload?); send it whole."
                    raise HTTPException(400, detail=error_body(400, message, code="invalid_body"))
            return message

        return limited_receive

    def _check_key(self, authorization: bytes | None) -> str | None:
        """None if the bearer key is right, else the message to send (which never echoes the key)."""
        if not authorization:
            return "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            return "Incorrect API key provided."
        return None

    def _too_large(self) -> APIError:
        limit = self.max_body_bytes / 1e6
        return APIError(413, f"The request body is larger than this server's limit of {limit:g} MB.")


def install_error_handlers(app: FastAPI, plain_errors: dict[int, APIError] | None = None) -> None:
    """Answer every error in OpenAI's shape with the SDKs' retry advice.

    `plain_errors` replaces the plain-text details a runtime's own checks raise, by status
    (LitServe's queue deadline is a bare 504).
    """
    plain_errors = plain_errors or {}

    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        cause = error.__cause__
        if error.status_code == 500 and isinstance(cause, StarletteHTTPException) and cause.status_code < 500:
            # A 4xx from the form parser (a malformed multipart body) that a runtime wrapped in a 500.
            return await http_error(request, cause)
        detail = error.detail
        if isinstance(detail, dict) and "error" in detail:
            body = detail
        elif error.status_code in plain_errors:
            body = plain_errors[error.status_code].body
        else:
            message = detail if isinstance(detail, str) else "Request failed."
            if error.status_code == 404:
                message = f"Unknown route {request.method} {request.url.path}."
            body = error_body(error.status_code, message)
        headers = {**(error.headers or {}), **retry_headers(error.status_code, body["error"].get("code"))}
        return JSONResponse(body, status_code=error.status_code, headers=headers)

    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) or None
        return JSONResponse(error_body(422, first.get("msg", "Invalid request."), param=param), status_code=422)

    async def unhandled_error(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return json_error(APIError(500, "Internal server error."))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unhandled_error)


def add_public_routes(app: FastAPI, models: Collection[str], results: ResultStore) -> None:
    """`GET /v1/models`, `GET /v1/models/{id}` and the url-mode result files."""

    @app.get(MODELS_PATH)
    async def list_models() -> dict[str, Any]:
        return wire.models_list(models)

    @app.get(MODELS_PATH + "/{model_id}")
    async def get_model(model_id: str) -> Response:
        if model_id not in models:
            return json_error(model_not_found(model_id, models))
        return JSONResponse(wire.model_object(model_id))

    @app.get(FILES_ROUTE + "/{name}")
    async def get_file(name: str) -> Response:
        # Streamed from whichever store keeps them (a folder, a bucket every replica shares); the store's
        # calls block, so they run in the thread pool.
        try:
            found = await run_in_threadpool(results.find, name)
        except StorageUnavailable as error:
            logger.error("GET %s: the result store is unavailable: %s", name, error)
            return json_error(storage_unavailable())
        if found is None:
            message = "No such file; result URLs expire after an hour."
            return json_error(APIError(404, message, code="file_not_found"))
        return StreamingResponse(found.chunks(), media_type=media_type(name),
                                 headers={"Content-Length": str(found.size)})

