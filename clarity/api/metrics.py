"""What the server tells Prometheus: every metric's name, help, labels and buckets, one function per
event the HTTP front end, the handler and the runtime report, and the `/metrics` route.

Written once for every runtime. A runtime's processes (HTTP front ends, inference workers, its
supervisor) each record their own events, so collection is prometheus_client's multiprocess mode:
each process writes its values to files in one folder, and `/metrics` sums them. The runtime calls
`use_multiprocess_dir()` in its main process before it starts any other; the processes it starts
inherit the folder through the environment. Outside a server (the Python API, the CLI, unit tests)
nothing is recorded and prometheus_client is never imported.

Labels take bounded values only: a route template, a served model id (or `UNKNOWN_MODEL`), a
status code, a device index, or one of a few fixed words.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The route Prometheus scrapes.
METRICS_PATH = "/metrics"
#: prometheus_client's switch to multiprocess mode, read when it is first imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The model label of an edit refused before its model was known.
UNKNOWN_MODEL = "unknown"
#: The route label of a path no route serves (so that scanners cannot make new series).
OTHER_ROUTE = "other"

#: Seconds: from a refused header (milliseconds) to a large upscale on a CPU (half an hour).
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Seconds to load a model: from a warm disk cache to a cold download-sized read.
LOAD_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: `kind` is counter, gauge or histogram; `mode` is a gauge's multiprocess mode
    (how the values of several processes combine; "live" modes drop processes marked dead)."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    mode: str = ""


SPECS = (
    # The HTTP front end, for every route.
    MetricSpec("clarity_http_requests_total", "counter", "HTTP requests answered, by route template and status"
               " code (refusals before the route included).", ("route", "status")),
    MetricSpec("clarity_http_request_duration_seconds", "histogram", "Seconds from a request's arrival to the end"
               " of its answer, by route template.", ("route",), SECONDS_BUCKETS),
    MetricSpec("clarity_queue_depth", "gauge", "Edit requests held (queued or running) once their bodies have"
               " arrived; --max-queue per HTTP process is the limit.", mode="livesum"),
    MetricSpec("clarity_uploads_in_progress", "gauge", "Edit request bodies still arriving.", mode="livesum"),
    MetricSpec("clarity_queue_timeouts_total", "counter", "Edit requests answered 504 queue_timeout after waiting"
               " for a free worker."),
    MetricSpec("clarity_jobs", "gauge", "Jobs kept in the job store, by status (streamed edits included).",
               ("status",), mode="livemostrecent"),
    # The inference workers.
    MetricSpec("clarity_edits_total", "counter", "Edit requests a worker answered, by model (unknown: refused"
               " before the model was settled) and status code.", ("model", "status")),
    MetricSpec("clarity_queue_wait_seconds", "histogram", "Seconds from an edit's arrival at the HTTP front end"
               " (its body starting to arrive) to a worker starting it.", (), SECONDS_BUCKETS),
    MetricSpec("clarity_requests_running", "gauge", "Upscales running in the workers now.", mode="livesum"),
    MetricSpec("clarity_output_images_total", "counter", "Images produced, by model.", ("model",)),
    MetricSpec("clarity_output_megapixels_total", "counter", "Megapixels of the images produced, by model.",
               ("model",)),
    MetricSpec("clarity_denoising_steps_total", "counter", "Denoising steps run (each over the whole image, in"
               " tiles), by model; divide its rate by clarity_denoising_seconds_total's for steps per second.",
               ("model",)),
    MetricSpec("clarity_denoising_seconds_total", "counter", "Seconds spent in the denoising loop, by model.",
               ("model",)),
    MetricSpec("clarity_oom_retries_total", "counter", "Upscale steps retried with smaller settings after running"
               " out of memory, by model.", ("model",)),
    MetricSpec("clarity_cancelled_requests_total", "counter", "Edit requests stopped because their client"
               " disconnected, by stage (queued: skipped; running: stopped after a denoising step).", ("stage",)),
    MetricSpec("clarity_compute_timeouts_total", "counter", "Upscales stopped at --max-compute-seconds (504"
               " compute_timeout)."),
    MetricSpec("clarity_model_load_seconds", "histogram", "Seconds a worker took to load a model, by model.",
               ("model",), LOAD_BUCKETS),
    MetricSpec("clarity_gpu_memory_bytes", "gauge", "GPU memory the workers hold (reserved by torch), by CUDA"
               " device index, as of each worker's last request.", ("device",), mode="livesum"),
    MetricSpec("clarity_gpu_memory_total_bytes", "gauge", "GPU memory of each CUDA device.", ("device",),
               mode="livemax"),
    # The runtime's supervisor.
    MetricSpec("clarity_worker_restarts_total", "counter", "Inference workers that died and were started again."),
    # Job webhooks, sent by the HTTP process.
    MetricSpec("clarity_webhook_deliveries_total", "counter", "Job webhook deliveries ended, by outcome: delivered,"
               " gone (410), refused (host off the allow-list), gave_up (retried for --webhook-retry-seconds),"
               " dropped (too many pending, or shutting down), cancelled (at shutdown).", ("outcome",)),
)
#: Every metric name the server exports (the Grafana dashboard's test checks its queries against these).
METRIC_NAMES = frozenset(spec.name for spec in SPECS)

_metrics: dict[str, Any] = {}
_own_dir: Path | None = None


def use_multiprocess_dir() -> Path:
    """Make this process (and the processes it starts afterwards) record into a fresh folder it owns.

    One folder per process, made on the first call: prometheus_client keeps writing to the files it
    opened first, so a second server in the same process (tests) shares the folder.
    Raises `RuntimeError` if prometheus_client was imported before: it would not be in multiprocess mode.
    """
    global _own_dir
    if _own_dir is None:
        if "prometheus_client" in sys.modules:
            raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set; metrics would"
                               " not reach the other processes")
        _own_dir = Path(tempfile.mkdtemp(prefix="clarity-metrics-"))
        os.environ[MULTIPROC_ENV] = str(_own_dir)
    return _own_dir


def _metric(name: str) -> Any | None:
    """The prometheus_client metric `name`, built with all the others on first use; None outside a server."""
    if not _metrics:
        if MULTIPROC_ENV not in os.environ:
            return None
        # Imported here, not at the top: it picks its multiprocess mode from the environment on import.
        import prometheus_client

        kinds = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge,
                 "histogram": prometheus_client.Histogram}
        for spec in SPECS:
            options: dict[str, Any] = {"registry": None}
            if spec.buckets:
                options["buckets"] = spec.buckets
            if spec.mode:
                options["multiprocess_mode"] = spec.mode
            _metrics[spec.name] = kinds[spec.kind](spec.name, spec.help, spec.labels, **options)
    return _metrics[name]


def _inc(name: str, amount: float = 1.0, **labels: str) -> None:
    metric = _metric(name)
    if metric is not None and amount:
        (metric.labels(**labels) if labels else metric).inc(amount)


def _observe(name: str, value: float, **labels: str) -> None:
    metric = _metric(name)
    if metric is not None:
        (metric.labels(**labels) if labels else metric).observe(value)


def _set(name: str, value: float, **labels: str) -> None:
    metric = _metric(name)
    if metric is not None:
        (metric.labels(**labels) if labels else metric).set(value)


# --- events of the HTTP front end ---------------------------------------------------------------------


def record_http_request(route: str, status: int, seconds: float) -> None:
    _inc("clarity_http_requests_total", route=route, status=str(status))
    _observe("clarity_http_request_duration_seconds", seconds, route=route)


def record_edits_held(held: int, uploading: int) -> None:
    """The edit requests one HTTP process holds now: bodies arrived (queued or running) and still arriving."""
    _set("clarity_queue_depth", held)
    _set("clarity_uploads_in_progress", uploading)


def record_queue_timeout() -> None:
    _inc("clarity_queue_timeouts_total")


def record_jobs(counts: dict[str, int]) -> None:
    """The jobs in the store now, by status (every status, 0 included)."""
    for status, count in counts.items():
        _set("clarity_jobs", count, status=status)


# --- events of an inference worker ----------------------------------------------------------------------


def record_edit(model: str, status: int) -> None:
    """An edit answered by a worker: `model` a served id or `UNKNOWN_MODEL`."""
    _inc("clarity_edits_total", model=model, status=str(status))


def record_queue_wait(received_at: float | None) -> None:
    """A worker starts an edit that arrived at `received_at` (`time.time()` of the HTTP front end)."""
    if received_at is not None:
        _observe("clarity_queue_wait_seconds", max(time.time() - received_at, 0.0))


@contextlib.contextmanager
def running() -> Iterator[None]:
    """Count an upscale as running for the duration of the block."""
    gauge = _metric("clarity_requests_running")
    if gauge is None:
        yield
        return
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def record_output(model: str, images: int, megapixels: float, steps: int, denoise_seconds: float,
                  retries: int) -> None:
    """What a finished upscale produced and did."""
    _inc("clarity_output_images_total", images, model=model)
    _inc("clarity_output_megapixels_total", megapixels, model=model)
    _inc("clarity_denoising_steps_total", steps, model=model)
    _inc("clarity_denoising_seconds_total", denoise_seconds, model=model)
    _inc("clarity_oom_retries_total", retries, model=model)


def record_cancelled(stage: str) -> None:
    """An edit whose client left: `stage` is "queued" (skipped) or "running" (stopped)."""
    _inc("clarity_cancelled_requests_total", stage=stage)


def record_compute_timeout() -> None:
    _inc("clarity_compute_timeouts_total")


def record_model_load(model: str, seconds: float) -> None:
    _observe("clarity_model_load_seconds", seconds, model=model)


def record_gpu_memory(device: str) -> None:
    """The GPU memory this worker holds on `device` ("cuda", "cuda:1"; nothing for other devices)."""
    if not device.startswith("cuda") or _metric("clarity_gpu_memory_bytes") is None:
        return
    import torch  # only in a worker that runs on CUDA, where the engine has loaded it already

    index = torch.device(device).index or 0
    _set("clarity_gpu_memory_bytes", torch.cuda.memory_reserved(index), device=str(index))
    _set("clarity_gpu_memory_total_bytes", torch.cuda.get_device_properties(index).total_memory, device=str(index))


# --- events of the runtime's supervisor -------------------------------------------------------------------


def record_worker_restart(dead_pid: int | None) -> None:
    """A dead worker is being replaced: count it, and drop the live gauges it left behind."""
    _inc("clarity_worker_restarts_total")
    if dead_pid is not None and _metric("clarity_worker_restarts_total") is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(dead_pid)


# --- events of the webhook sender (HTTP process) -------------------------------------------------------


def record_webhook_delivery(outcome: str) -> None:
    """A webhook delivery ended: `outcome` is one of the few words `clarity_webhook_deliveries_total` lists."""
    _inc("clarity_webhook_deliveries_total", outcome=outcome)


# --- the HTTP side: the route and the middleware ---------------------------------------------------------


def exposition() -> tuple[bytes, str]:
    """Every process's metrics in Prometheus' text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def add_metrics_route(app: Any) -> None:
    """`GET /metrics` on a FastAPI `app` (authorised by `GuardMiddleware`, like every route)."""
    from fastapi.responses import Response

    @app.get(METRICS_PATH, include_in_schema=False)
    def metrics() -> Response:  # sync: FastAPI runs it in a thread, as it reads files
        body, content_type = exposition()
        return Response(body, media_type=content_type)


class HTTPMetricsMiddleware:
    """Counts and times every HTTP request by route template and status (`record_http_request`).

    Outermost, so that the guard's refusals are counted too. `routes()` gives the app's routes;
    the template of the first that matches the request labels it, never the raw path.
    """

    def __init__(self, app: ASGIApp, *, routes: Callable[[], list[Any]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 500}  # an exception with nothing sent is answered 500 by the server

        async def noting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            record_http_request(self.route_of(scope), status["code"], time.monotonic() - started)

    def route_of(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match != Match.NONE and hasattr(route, "path"):
                return route.path
        return OTHER_ROUTE
