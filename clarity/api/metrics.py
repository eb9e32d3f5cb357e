"""What the server tells Prometheus: every metric's name, help, labels and buckets, one function per
event the HTTP front end, the handler and the runtime report, and the `/metrics` route.

Written once for every runtime. A runtime's processes (HTTP front ends, inference workers, its
supervisor) each record their own events into the process's `Recorder`. On one machine that is
prometheus_client's multiprocess mode (`MultiprocessRecorder`): each process writes its values to files
in one folder, and `/metrics` sums them. The runtime calls `use_multiprocess_dir()` in its main process
before it starts any other; the processes it starts inherit the folder through the environment. A runtime
with its own metrics system installs a recorder of its own in each process (`install_recorder`; the Ray
runtime's is serving/ray/metrics.py), built from `SPECS`. Outside a server (the Python API, the CLI, unit
tests) nothing is recorded and prometheus_client is never imported.

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
from typing import Any, Protocol

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



class Recorder(Protocol):
    """Where one process's events go: each method takes the metric's spec and its label values."""

    def inc(self, spec: MetricSpec, amount: float, labels: dict[str, str]) -> None:
        """A counter grows by `amount` (> 0)."""

    def observe(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        """A histogram counts `value`."""

    def set(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        """A gauge is `value` now."""

    def add(self, spec: MetricSpec, amount: float, labels: dict[str, str]) -> None:
        """A gauge goes up (or down, `amount` < 0) by `amount`."""


class MultiprocessRecorder:
    """prometheus_client's metrics in multiprocess mode, one per spec: every process writes files in the folder
    of `MULTIPROC_ENV`, and `exposition()` sums them."""

    def __init__(self) -> None:
        # Imported here, not at the top: it picks its multiprocess mode from the environment on import.
        import prometheus_client

        kinds = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge,
                 "histogram": prometheus_client.Histogram}
        self.metrics: dict[str, Any] = {}
        for spec in SPECS:
            options: dict[str, Any] = {"registry": None}
            if spec.buckets:
                options["buckets"] = spec.buckets
            if spec.mode:
                options["multiprocess_mode"] = spec.mode
            self.metrics[spec.name] = kinds[spec.kind](spec.name, spec.help, spec.labels, **options)

    def _child(self, spec: MetricSpec, labels: dict[str, str]) -> Any:
        metric = self.metrics[spec.name]
        return metric.labels(**labels) if labels else metric

    def inc(self, spec: MetricSpec, amount: float, labels: dict[str, str]) -> None:
        self._child(spec, labels).inc(amount)

    def observe(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        self._child(spec, labels).observe(value)

    def set(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        self._child(spec, labels).set(value)

    def add(self, spec: MetricSpec, amount: float, labels: dict[str, str]) -> None:
        self._child(spec, labels).inc(amount)

    @staticmethod
    def forget_process(pid: int) -> None:
        """Drop the live gauges of the dead process `pid` (its counters stay counted)."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


SPEC_BY_NAME = {spec.name: spec for spec in SPECS}
_recorder: Recorder | None = None
_own_dir: Path | None = None


def install_recorder(recorder: Recorder) -> None:
    """Make this process record into `recorder` (a runtime with a metrics system of its own calls it in each of
    its processes, before the first event). Raises `RuntimeError` if the process records somewhere else already."""
    global _recorder
    if _recorder is not None and _recorder is not recorder:
        raise RuntimeError(f"this process records its metrics into {_recorder!r} already")
    _recorder = recorder


def installed_recorder() -> Recorder | None:
    """This process's recorder: the installed one, else prometheus_client's multiprocess files when the runtime
    set their folder (`use_multiprocess_dir`), else None (nothing is recorded)."""
    global _recorder
    if _recorder is None and MULTIPROC_ENV in os.environ:
        _recorder = MultiprocessRecorder()
    return _recorder


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


def _inc(name: str, amount: float = 1.0, **labels: str) -> None:
    recorder = installed_recorder()
    if recorder is not None and amount:
        recorder.inc(SPEC_BY_NAME[name], amount, labels)


def _observe(name: str, value: float, **labels: str) -> None:
    recorder = installed_recorder()
    if recorder is not None:
        recorder.observe(SPEC_BY_NAME[name], value, labels)


def _set(name: str, value: float, **labels: str) -> None:
    recorder = installed_recorder()
    if recorder is not None:
        recorder.set(SPEC_BY_NAME[name], value, labels)


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
    recorder = installed_recorder()
    if recorder is None:
        yield
        return
    spec = SPEC_BY_NAME["clarity_requests_running"]
    recorder.add(spec, 1, {})
    try:
        yield
    finally:
        recorder.add(spec, -1, {})


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
    if not device.startswith("cuda") or installed_recorder() is None:
        return
    import torch  # only in a worker that runs on CUDA, where the engine has loaded it already

    index = torch.device(device).index or 0
    _set("clarity_gpu_memory_bytes", torch.cuda.memory_reserved(index), device=str(index))
    _set("clarity_gpu_memory_total_bytes", torch.cuda.get_device_properties(index).total_memory, device=str(index))


# --- events of the runtime's supervisor -------------------------------------------------------------------


def record_worker_restart(dead_pid: int | None) -> None:
    """A dead worker is being replaced: count it, and drop the live gauges it left behind."""
    _inc("clarity_worker_restarts_total")
    recorder = installed_recorder()
    if dead_pid is not None and isinstance(recorder, MultiprocessRecorder):
        recorder.forget_process(dead_pid)


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
