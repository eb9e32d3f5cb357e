"""The ingress deployment: the API core's HTTP side, as a FastAPI app behind Ray Serve's proxy.

Built in each replica (Serve's late-bound ingress: `__serve_build_asgi_app__`), in the order a
request meets it:

    HTTPMetricsMiddleware  every request counted by route template and status (api/metrics.py)
    GuardMiddleware     bearer key, body size and upload time limits, multipart checks (api/http.py)
    EditsRouter         at most --max-uploads bodies at once; an edit's body read whole; stream=true ->
                        StreamedEdits (a job relayed as SSE)
    routes              POST /v1/images/edits -> an upscaler replica (calls.call_upscaler);
                        GET /metrics -> the Clarity metrics of every node, merged (metrics.py);
                        /health, /v1/models, result files, /v1/jobs, /docs (the API core's routes)

It runs on the head node, beside Serve's controller and proxy: a worker node that dies takes its
upscaler replicas and their edits with it, never the ingress that answers them (503 worker_restarted).
"""

from __future__ import annotations

import secrets
import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from clarity.api import wire
from clarity.api.docs import install_docs
from clarity.api.errors import too_many_uploads
from clarity.api.handler import EditHandler
from clarity.api.http import (
    HEALTH_PATH,
    OPEN_PATHS,
    ForwardedHeaders,
    GuardMiddleware,
    add_public_routes,
    early_error,
    install_error_handlers,
    json_error,
    read_body,
    replay_body,
)
from clarity.api.job_routes import StreamedEdits, add_job_routes, asks_for_stream
from clarity.api.logs import configure_logging
from clarity.api.metrics import METRICS_PATH, HTTPMetricsMiddleware
from clarity.api.submit import JobSubmitter
from clarity.api.webhooks import WebhookSender
from clarity.serving.ray.calls import EditCall, call_upscaler
from clarity.serving.ray.jobs import RayJobStore
from clarity.serving.ray.metrics import cluster_exposition
from clarity.serving.ray.metrics import install as install_metrics

#: The header Ray Serve's proxy names each request with (the client's own, else one it makes up), and
#: returns in the response: the request's id in Clarity's logs too.
REQUEST_ID_HEADER = "x-request-id"


class EditsRouter:
    """ASGI middleware for `POST /v1/images/edits`: at most `max_uploads` bodies read at once (429
    `too_many_uploads` beyond, as on one machine), each read whole (the guard bounds it), then an edit whose
    form says `stream=true` handed to `streamed`, and any other to the app behind.

    Ray Serve's proxy hands a request to the ingress with its headers and relays the body as the client sends
    it, so a body being read here is one being received from its client."""

    def __init__(self, app: ASGIApp, *, streamed: ASGIApp, max_uploads: int) -> None:
        self.app = app
        self.streamed = streamed
        self.max_uploads = max_uploads
        self.uploading = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != wire.EDITS_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.uploading >= self.max_uploads:
            await json_error(too_many_uploads(self.uploading))(scope, receive, send)
            return
        self.uploading += 1  # one event loop: the check and the increment cannot interleave with another's
        try:
            body = await read_body(receive)
        except HTTPException as error:  # the guard's limits, raised from its receive: the detail is OpenAI's shape
            await early_error(error)(scope, receive, send)
            return
        finally:
            self.uploading -= 1
        if body is None:  # the client left during the upload
            return
        target = self.streamed if asks_for_stream(scope, body) else self.app
        await target(scope, replay_body(body, receive), send)


class Ingress:
    """The ingress of the Serve application: `handler` (nothing loaded; it validates job forms) and its
    stores, and `upscaler`, the deployment every edit is sent to."""

    def __init__(self, handler: EditHandler, upscaler: DeploymentHandle, jobs: RayJobStore) -> None:
        configure_logging(handler.config.log_level)
        install_metrics()
        self.handler = handler
        self.upscaler = upscaler
        self.jobs = jobs

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Ray Serve calls it once the replica is constructed; the app it returns serves the HTTP requests."""
        return build_app(self.handler, self.upscaler, self.jobs)


def build_app(handler: EditHandler, upscaler: DeploymentHandle, jobs: RayJobStore) -> FastAPI:
    """The FastAPI app of one ingress replica: the API core's guard, error shapes and routes, with edits sent
    to `upscaler` and jobs kept in `jobs`."""
    config = handler.config
    app = FastAPI()
    forwarded = ForwardedHeaders(config.forwarded_allow_ips)
    webhooks = WebhookSender(config.webhook_secret, config.webhook_allow, config.webhook_retry_seconds)
    submitter = JobSubmitter(handler, jobs, jobs.wake, forwarded.base_url, webhooks)

    @app.post(wire.EDITS_PATH)
    async def edits(request: Request) -> Response:
        request_id = request.headers.get(REQUEST_ID_HEADER) or f"req_{secrets.token_hex(12)}"
        call = EditCall(await request.body(), request.headers["content-type"], request_id,
                        forwarded.base_url(request.scope), time.time())
        answer = await call_upscaler(upscaler, call)
        return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)

    @app.get(HEALTH_PATH)
    async def health() -> Response:
        return PlainTextResponse("ok")

    @app.get(METRICS_PATH, include_in_schema=False)
    async def metrics() -> Response:
        """The Clarity metrics of the whole cluster (every node's processes), as one machine serves its own."""
        body, content_type = await cluster_exposition()
        return Response(body, media_type=content_type)

    # Each added middleware wraps the app so far: the metrics end up outermost (they count the guard's
    # refusals), then the guard.
    app.add_middleware(EditsRouter, streamed=StreamedEdits(submitter, jobs), max_uploads=config.max_uploads)
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_payload_bytes,
                       upload_timeout=config.upload_timeout, ready=lambda: True,
                       open_paths=OPEN_PATHS | {METRICS_PATH} if config.metrics_public else OPEN_PATHS)
    app.add_middleware(HTTPMetricsMiddleware, routes=lambda: app.router.routes)
    install_error_handlers(app)
    add_public_routes(app, list(handler.catalogue.models), handler.results)
    add_job_routes(app, submitter, jobs)
    install_docs(app)
    return app
