"""Building and running the OpenAI-compatible server: LitServer plus limits, auth and error shapes.

    clarity serve --weights weights --api-key "$KEY"

then, with the official SDK, only `base_url` changes:

    client = OpenAI(base_url="http://localhost:8000/v1", api_key=KEY)
    client.images.edit(model="clarity-upscaler", image=open("in.png", "rb"), prompt="...",
                       extra_body={"scale_factor": 4, "creativity": 0.35})

Around LitServe's `/v1/images/edits` this adds what an OpenAI client expects: bearer-key auth
(on every route but `/health`), a body size limit checked before the form is parsed, a 503
while workers load, every error reshaped to `{"error": {...}}`, `GET /v1/models` (every model
of the weights catalogue, chosen per request by `model`), and the url-mode file route. And
what a shared server needs: a bounded queue (429 `queue_full` with `Retry-After` when full),
a deadline on time spent queued (504 `queue_timeout`), crashed workers restarted with their
running request answered 503 at once, and on SIGTERM a drain of accepted work before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clarity.errors import ParamError, WeightsError
from clarity.imageio import DEFAULT_MAX_INPUT_PIXELS, DEFAULT_MAX_OUTPUT_PIXELS
from clarity.serving import openai
from clarity.serving.cancellation import CancelRegistry, tag_request
from clarity.serving.files import DEFAULT_TTL_SECONDS, FILES_ROUTE, FileStore
from clarity.serving.logs import DEFAULT_PROGRESS_SECONDS, LOG_LEVELS, configure_logging

if TYPE_CHECKING:
    from clarity.engine.acceleration import SpeedOptions

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000
DEFAULT_MAX_PAYLOAD_MB = 50
#: Seconds a request may wait in the queue for a free worker before a 504.
DEFAULT_QUEUE_TIMEOUT = 600
#: Edit requests one HTTP process holds at once (reading, queued or running) before a 429.
DEFAULT_MAX_QUEUE = 16
#: Seconds a client is told to wait before retrying a full queue.
QUEUE_FULL_RETRY_AFTER = 10
#: Seconds SIGTERM waits for accepted requests to finish before the workers are stopped.
DEFAULT_SHUTDOWN_TIMEOUT = 30
#: Seconds a client may take to send its whole request body; a slower upload gets a 408 and
#: frees the queue slot it held (50 MB at this limit is about 3.5 Mbit/s).
DEFAULT_UPLOAD_TIMEOUT = 120
#: Seconds between LitServe's checks for dead inference workers (its default is 2).
WORKER_MONITOR_INTERVAL = 0.5
#: Routes anyone may call: load balancers probe /health without credentials.
OPEN_PATHS = frozenset({"/health"})


# --- middleware ----------------------------------------------------------------------------------


def _json_error(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(openai.error_body(status, message, code=code), status_code=status, headers=headers)


def _is_multipart(content_type: str) -> bool:
    kind, _, parameters = content_type.partition(";")
    return kind.strip() == "multipart/form-data" and "boundary=" in parameters


class GuardMiddleware:
    """Auth, body size limit, readiness and queue bound, checked before any route or form parsing.

    A plain ASGI middleware (not LitAPI.authorize, which LitServe also puts on /health).
    Edit requests are tagged so that a client's disconnect cancels its work (see
    serving/cancellation.py). `max_queue` bounds the edit requests this process holds at once,
    from the first byte of the body to the answer, so a retry storm is refused before its
    uploads are buffered.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        workers_ready: Callable[[], bool],
        cancellations: CancelRegistry,
        max_queue: int = DEFAULT_MAX_QUEUE,
        upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT,
    ) -> None:
        self.app = app
        self.cancellations = cancellations
        self.upload_timeout = upload_timeout
        self._key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.workers_ready = workers_ready
        self.max_queue = max_queue
        self.pending = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {name.decode("latin-1").lower(): value for name, value in scope["headers"]}
        # File URLs are capabilities: the 256-bit random name is the credential, as in OpenAI's
        # own signed image URLs, so that a browser or <img> can fetch them without a header.
        if self._key and path not in OPEN_PATHS and not path.startswith(FILES_ROUTE + "/"):
            rejection = self._check_key(headers.get("authorization"))
            if rejection:
                await _json_error(401, rejection, code="invalid_api_key")(scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large()(scope, receive, send)
            return
        if path == openai.EDITS_PATH and not self.workers_ready():
            await _json_error(503, "The model is still loading; retry shortly.", headers={"Retry-After": "5"})(
                scope, receive, send
            )
            return
        content_type = headers.get("content-type", b"").decode("latin-1").lower()
        if path == openai.EDITS_PATH and not _is_multipart(content_type):
            # LitServe would hand a JSON body to decode_request as a dict (a 500), and an image
            # cannot travel in a urlencoded form anyway.
            message = "Send the request as multipart/form-data (with a boundary) and the image as a file,"
            message += " as the OpenAI SDKs do."
            await _json_error(400, message, code="invalid_content_type")(scope, receive, send)
            return
        if path == openai.EDITS_PATH and self.pending >= self.max_queue:
            message = f"The server is busy: {self.pending} requests are already queued or running; retry later."
            headers = {"Retry-After": str(QUEUE_FULL_RETRY_AFTER)}
            await _json_error(429, message, code="queue_full", headers=headers)(scope, receive, send)
            return

        received = 0
        body_done = False
        upload_deadline = asyncio.get_running_loop().time() + self.upload_timeout

        async def limited_receive() -> Message:
            # Chunked uploads carry no Content-Length: count as they arrive. A trickling upload
            # would hold a queue slot for as long as its client likes: bound its time too.
            nonlocal received, body_done
            if body_done:
                return await receive()
            remaining = upload_deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.0))
            except TimeoutError:
                message = f"The request body did not arrive within {self.upload_timeout:g} s."
                raise HTTPException(408, detail=openai.error_body(408, message, code="upload_timeout")) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                # FastAPI's subclass: LitServe's endpoint re-raises only that one, as it is.
                raise HTTPException(413, detail=self._too_large_body())
            return message

        if path != openai.EDITS_PATH:
            await self.app(scope, limited_receive, send)
            return
        # Single-threaded event loop: the check above and this increment cannot interleave.
        self.pending += 1
        try:
            async with tag_request(scope, limited_receive, send, self.cancellations) as tagged:
                await self.app(*tagged)
        finally:
            self.pending -= 1

    def _check_key(self, authorization: bytes | None) -> str | None:
        """None if the bearer key is right, else the message to send (which never echoes the key)."""
        if not authorization:
            return "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            return "Incorrect API key provided."
        return None

    def _too_large_body(self) -> dict[str, Any]:
        limit = self.max_body_bytes / 1e6
        return openai.error_body(413, f"The request body is larger than this server's limit of {limit:g} MB.")

    def _too_large(self) -> Response:
        return JSONResponse(self._too_large_body(), status_code=413)


# --- error reshaping -----------------------------------------------------------------------------


async def _http_exception_handler(request: Request, error: StarletteHTTPException) -> Response:
    """FastAPI's `{"detail": ...}` -> OpenAI's `{"error": {...}}` (worker errors already are)."""
    cause = error.__cause__
    if error.status_code == 500 and isinstance(cause, StarletteHTTPException) and cause.status_code < 500:
        # Starlette's 400 for a malformed multipart body, which LitServe (expecting FastAPI's
        # subclass) turned into a 500.
        return await _http_exception_handler(request, cause)
    detail = error.detail
    if isinstance(detail, dict) and "error" in detail:
        body = detail
    else:
        message = detail if isinstance(detail, str) else "Request failed."
        if error.status_code == 404:
            message = f"Unknown route {request.method} {request.url.path}."
        body = openai.error_body(error.status_code, message)
    headers = dict(error.headers or {})
    if error.status_code == 504 and not isinstance(detail, dict):
        # LitServe's own check, made when a worker takes an expired request off the queue.
        body = openai.error_body(504, "The request waited too long for a free worker; retry later.",
                                 code="queue_timeout")
    if error.status_code >= 500:
        # The SDK retries 5xx twice: worth it for a busy or restarting server, not for an upscale
        # that failed or ran over the compute limit (it would again, at the same cost).
        retryable = error.status_code in (503, 504) and body["error"].get("code") != "compute_timeout"
        headers.update({"Retry-After": "5"} if retryable else {"x-should-retry": "false"})
    return JSONResponse(body, status_code=error.status_code, headers=headers)


async def _validation_handler(request: Request, error: RequestValidationError) -> Response:
    first = error.errors()[0] if error.errors() else {}
    param = str(first.get("loc", ["", ""])[-1]) or None
    body = openai.error_body(422, first.get("msg", "Invalid request."), param=param)
    return JSONResponse(body, status_code=422)


async def _unhandled_handler(request: Request, error: Exception) -> Response:
    logger.exception("unhandled error on %s", request.url.path)
    return _json_error(500, "Internal server error.", headers={"x-should-retry": "false"})


# --- server --------------------------------------------------------------------------------------


def build_server(
    weights: str | Path,
    *,
    models: list[str] | None = None,
    default_model: str | None = None,
    api_key: str | None = None,
    output_dir: str | Path | None = None,
    public_url: str = f"http://localhost:{DEFAULT_PORT}",
    accelerator: str = "auto",
    devices: int | str = "auto",
    workers_per_device: int = 1,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_MB * 1_000_000,
    file_ttl_seconds: float = DEFAULT_TTL_SECONDS,
    timeout: float = DEFAULT_QUEUE_TIMEOUT,
    max_queue: int = DEFAULT_MAX_QUEUE,
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT,
    max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
    max_output_pixels: int | None = None,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    max_compute_seconds: float | None = None,
    speed: SpeedOptions | None = None,
    log_level: str = "info",
    progress_log_seconds: float = DEFAULT_PROGRESS_SECONDS,
) -> Any:
    """A ready-to-run `litserve.LitServer` for the models in `weights` (a weights root or one model folder).

    It serves `models` (default: all of them), `default_model` answering requests that name
    none (see `Catalogue.discover`); every served model is loaded in every worker.
    `public_url` is the base URL clients reach this server at; url-mode results are returned
    as `{public_url}/v1/files/<token>.<ext>` and kept in `output_dir` (a new temporary folder
    by default) for `file_ttl_seconds`. A request waits at most `timeout` seconds for a worker
    to start it; each HTTP process holds at most `max_queue` edit requests, whose bodies must
    arrive within `upload_timeout` seconds; on shutdown,
    accepted requests get `shutdown_timeout` seconds to finish. `speed` (`SpeedOptions`) sets
    how each worker runs the models. Workers log at `log_level`, with a progress line every
    `progress_log_seconds` while a request runs.
    """
    # Imported here so that `clarity --help` does not pay for the web stack.
    from litserve.utils import WorkerSetupStatus

    from clarity.models.catalogue import Catalogue
    from clarity.serving.api import UpscaleAPI
    from clarity.serving.supervision import RequestWatchdog, SupervisedLitServer, TrackedBuffer

    catalogue = Catalogue.discover(weights, models=models, default_model=default_model)
    output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="clarity-outputs-"))
    cancellations = CancelRegistry(tempfile.mkdtemp(prefix="clarity-cancelled-"))
    limits = {"max_output_pixels": max_output_pixels} if max_output_pixels else {}
    api = UpscaleAPI(
        catalogue, output_dir, public_url, file_ttl_seconds, max_input_pixels=max_input_pixels,
        max_compute_seconds=max_compute_seconds, speed=speed, cancellations=cancellations,
        log_level=log_level, progress_log_seconds=progress_log_seconds, **limits,
    )
    server = SupervisedLitServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers_per_device,
        timeout=timeout,  # also checked by the worker, so an expired request is never run
        max_payload_size=max_payload_bytes,
        model_metadata={"models": list(catalogue.models), "default_model": catalogue.default_model,
                        "weights": str(weights)},
        restart_workers=True,
    )
    server.monitor_internal = WORKER_MONITOR_INTERVAL
    server.uvicorn_graceful_timeout = shutdown_timeout
    # Replaced before the HTTP processes fork from this one: each gets its own, tracked copy.
    server.response_buffer = TrackedBuffer()
    app = server.app

    def worker_status() -> dict[str, str]:
        status = getattr(server, "workers_setup_status", None)  # a manager dict, made by run()
        return status.copy() if status is not None else {}

    def workers_ready() -> bool:
        # One ready worker is enough to queue for; the others may be restarting.
        return any(value == WorkerSetupStatus.READY for value in worker_status().values())

    endpoint = openai.EDITS_PATH.rsplit("/", 1)[-1]  # LitServe keys worker statuses by it
    watchdog = RequestWatchdog(server.response_buffer, timeout, worker_status, endpoint)
    litserve_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[None]:
        async with litserve_lifespan(app_):
            task = asyncio.create_task(watchdog.run(), name="clarity-request-watchdog")
            try:
                yield
            finally:
                task.cancel()

    app.router.lifespan_context = lifespan

    # Added after LitServe's own middleware, so it runs first (outermost).
    app.add_middleware(
        GuardMiddleware,
        api_key=api_key,
        max_body_bytes=max_payload_bytes,
        workers_ready=workers_ready,
        cancellations=cancellations,
        max_queue=max_queue,
        upload_timeout=upload_timeout,
    )
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(Exception, _unhandled_handler)

    litserve_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = litserve_openapi()  # built once and cached by FastAPI; patching it is idempotent
        schema["paths"][openai.EDITS_PATH]["post"]["requestBody"] = openai.edit_form_schema()
        return schema

    app.openapi = openapi

    files = FileStore(output_dir, file_ttl_seconds)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return openai.models_list(catalogue.models)

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> Response:
        if model_id not in catalogue.models:
            error = openai.model_not_found(model_id, catalogue.models)
            return JSONResponse(error.body, status_code=error.status)
        return JSONResponse(openai.model_object(model_id))

    @app.get(FILES_ROUTE + "/{name}")
    async def get_file(name: str) -> Response:
        path = files.find(name)
        if path is None:
            return _json_error(404, "No such file; result URLs expire after an hour.", code="file_not_found")
        return FileResponse(path, media_type=files.media_type(name))

    return server


# --- command line --------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` options, shared by `clarity serve` and `python server.py`."""
    from clarity.cli import DEFAULT_WEIGHTS, WEIGHTS_HELP, add_speed_arguments

    parser.add_argument("--weights", type=Path, default=Path(DEFAULT_WEIGHTS), help=WEIGHTS_HELP)
    parser.add_argument("--models", type=_model_ids, default=None, metavar="ID,ID",
                        help="Serve only these model ids of the weights root (default: all; each is loaded"
                             " in every worker).")
    parser.add_argument("--default-model", default=None, metavar="ID",
                        help="Model for requests that name none (default: clarity-upscaler if served, else the"
                             " first id).")
    parser.add_argument("--host", default="0.0.0.0", help="Address to listen on (default: 0.0.0.0).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default: {DEFAULT_PORT}).")
    parser.add_argument("--accelerator", choices=("auto", "cpu", "cuda"), default="auto",
                        help="Where models run (default: auto = CUDA if present).")
    parser.add_argument("--devices", default="auto", help="Number of GPUs to use, or auto (default).")
    parser.add_argument("--workers-per-device", type=int, default=1,
                        help="Model copies per device, each serving one request at a time (default: 1).")
    parser.add_argument("--api-key", default=None,
                        help="Require 'Authorization: Bearer <key>' (default: $CLARITY_API_KEY; none = open).")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="Where url-mode results are kept (default: a new temporary folder).")
    parser.add_argument("--public-url", default=None,
                        help="Base URL clients reach this server at, used in result URLs"
                             " (default: http://localhost:PORT).")
    parser.add_argument("--max-payload-mb", type=float, default=DEFAULT_MAX_PAYLOAD_MB,
                        help=f"Largest request body accepted, in MB (default: {DEFAULT_MAX_PAYLOAD_MB}).")
    default_mp = DEFAULT_MAX_OUTPUT_PIXELS / 1e6
    parser.add_argument("--max-output-mp", type=float, default=None,
                        help=f"Largest output accepted, in megapixels (default: {default_mp:.1f}).")
    parser.add_argument("--max-input-mp", type=float, default=DEFAULT_MAX_INPUT_PIXELS / 1e6,
                        help="Largest input accepted, in megapixels, checked from the file's header before"
                             f" decoding (default: {DEFAULT_MAX_INPUT_PIXELS / 1e6:g}).")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="Edit requests held at once (queued or running) per HTTP process before answering"
                             f" 429 queue_full (default: {DEFAULT_MAX_QUEUE}).")
    parser.add_argument("--upload-timeout", type=float, default=DEFAULT_UPLOAD_TIMEOUT,
                        help="Seconds a client may take to send its request body before a 408 upload_timeout"
                             f" (default: {DEFAULT_UPLOAD_TIMEOUT}).")
    parser.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT,
                        help="Seconds a request may wait for a free worker before a 504 queue_timeout"
                             f" (default: {DEFAULT_QUEUE_TIMEOUT}).")
    parser.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                        help="On SIGTERM, seconds accepted requests get to finish before the workers stop"
                             f" (default: {DEFAULT_SHUTDOWN_TIMEOUT}).")
    parser.add_argument("--max-compute-seconds", type=float, default=None,
                        help="Stop an upscale that has run this long and answer 504 compute_timeout"
                             " (default: no limit).")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="Server and worker log level (default: info: a line as each request starts"
                             " and ends, and progress while it runs).")
    parser.add_argument("--progress-log-seconds", type=float, default=DEFAULT_PROGRESS_SECONDS,
                        help="Seconds between progress lines of a running request"
                             f" (default: {DEFAULT_PROGRESS_SECONDS:g}).")
    add_speed_arguments(parser)


def check_speed_for_accelerator(speed: SpeedOptions, accelerator: str) -> None:
    """Raise `ParamError` naming the flag if `--accelerator` and the speed flags cannot work here."""
    import torch

    from clarity.engine.acceleration import resolve_dtype

    cuda = torch.cuda.is_available()
    if accelerator == "cuda" and not cuda:
        raise ParamError("accelerator", "--accelerator cuda: CUDA is not available here (no NVIDIA GPU or driver,"
                                        " or a CPU-only torch build); use --accelerator cpu")
    resolve_dtype(speed, torch.device("cuda" if accelerator != "cpu" and cuda else "cpu"))


def _model_ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; exit at once (1) if the weights are unusable."""
    from clarity.cli import speed_options
    from clarity.models.catalogue import Catalogue
    from clarity.models.loading import check_source

    configure_logging(args.log_level)
    try:
        catalogue = Catalogue.discover(args.weights, models=args.models, default_model=args.default_model)
        for source in catalogue.models.values():
            check_source(source)
    except (WeightsError, ParamError) as error:
        # Before LitServe starts: otherwise every worker would die loading, one traceback each.
        print(f"clarity: error: {error}", file=sys.stderr)
        return 1
    speed = speed_options(args)
    check_speed_for_accelerator(speed, args.accelerator)  # likewise: refused here, not in every worker
    api_key = args.api_key or os.environ.get("CLARITY_API_KEY") or None
    devices: int | str = int(args.devices) if str(args.devices).isdigit() else args.devices
    server = build_server(
        args.weights,
        models=args.models,
        default_model=args.default_model,
        api_key=api_key,
        output_dir=args.output_dir,
        public_url=args.public_url or f"http://localhost:{args.port}",
        accelerator=args.accelerator,
        devices=devices,
        workers_per_device=args.workers_per_device,
        max_payload_bytes=int(args.max_payload_mb * 1_000_000),
        timeout=args.queue_timeout,
        max_queue=args.max_queue,
        upload_timeout=args.upload_timeout,
        max_input_pixels=int(args.max_input_mp * 1_000_000),
        max_output_pixels=int(args.max_output_mp * 1_000_000) if args.max_output_mp else None,
        shutdown_timeout=args.shutdown_timeout,
        max_compute_seconds=args.max_compute_seconds,
        speed=speed,
        log_level=args.log_level,
        progress_log_seconds=args.progress_log_seconds,
    )
    logger.info("serving %s (default %s) from %s", ", ".join(catalogue.models), catalogue.default_model,
                args.weights)
    for model_id in catalogue.models:
        if catalogue.is_tiny(model_id):
            logger.warning("model %s is the tiny test model: its outputs have no meaningful detail", model_id)
    if not api_key:
        logger.warning("no API key set (--api-key or CLARITY_API_KEY): anyone who can reach the port can use it")
    # LitServe shuts its workers down on KeyboardInterrupt only; a plain SIGTERM (docker stop,
    # Kubernetes) would leave the inference workers running as orphans. Its shutdown then
    # sends SIGTERM to the HTTP process, where uvicorn stops listening and waits for the
    # accepted requests (the workers still run them) before the workers are stopped.
    main_pid = os.getpid()

    def on_sigterm(signum: int, frame: object) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        # A forked HTTP process (uvicorn re-raises the signal after its own graceful shutdown).
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    server.run(host=args.host, port=args.port, generate_client_file=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python server.py [options]`: the same as `clarity serve`."""
    parser = argparse.ArgumentParser(prog="server.py", description="Serve Clarity as an OpenAI-compatible API.")
    add_serve_arguments(parser)
    return serve(parser.parse_args(argv))
