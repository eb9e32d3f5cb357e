"""The API core on one machine, with LitServe: assembly, and running until stopped.

    clarity serve --weights weights --api-key "$KEY"

Around LitServe's `/v1/images/edits` (a thin LitAPI over the API core's handler) this adds
what an OpenAI client and a shared server need: the API core's guard (bearer key on every route
but the open ones: `/health`, result files, docs, the playground; body limits, a 503 while workers load), its error
shapes and its routes (`GET /v1/models`, result files, offline `/docs` and the public API's
`/openapi.json`, Prometheus' `/metrics`); a bounded queue (429 `queue_full`); a deadline on time
spent queued (504 `queue_timeout`); crashed workers restarted with their running request answered 503 at once; and
on SIGINT or SIGTERM, to the main process or to all of them, a drain of the accepted work before
exiting (signals.py, drain.py).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import tempfile
from collections.abc import Callable

from clarity.api import metrics, wire
from clarity.api.config import ServerConfig
from clarity.api.docs import install_docs
from clarity.api.errors import APIError
from clarity.api.handler import EditHandler
from clarity.api.http import (
    OPEN_PATHS,
    ForwardedHeaders,
    GuardMiddleware,
    add_public_routes,
    install_error_handlers,
)
from clarity.api.job_routes import StreamedEdits, add_job_routes
from clarity.api.playground import install_playground
from clarity.api.results import ResultStore, open_result_store
from clarity.api.runner import JobRunner
from clarity.api.sqlite_jobs import SQLiteJobStore, open_job_store
from clarity.api.submit import JobSubmitter
from clarity.api.webhooks import WebhookSender
from clarity.models.catalogue import Catalogue
from clarity.serving.litserve import patches
from clarity.serving.litserve.api import EditsLitAPI
from clarity.serving.litserve.dispatch import in_process_executor
from clarity.serving.litserve.drain import Drain
from clarity.serving.litserve.queue import CancelRegistry, EditsInFlight, QueueBound
from clarity.serving.litserve.watchdog import RequestWatchdog

logger = logging.getLogger(__name__)

#: Seconds between two purges of expired url-mode results and jobs.
PURGE_INTERVAL = 60
#: LitServe's own queue deadline raises a bare 504; this is what the client reads instead.
QUEUE_TIMEOUT = APIError(504, "The request waited too long for a free worker; retry later.", code="queue_timeout")


def build_server(config: ServerConfig) -> patches.SupervisedLitServer:
    """A ready-to-run LitServer for the models of `config.weights` (a weights root or one model folder).

    Raises `ParamError`/`WeightsError` when the models asked for are not there.
    """
    metrics.use_multiprocess_dir()  # before any process is started: they inherit it
    catalogue = Catalogue.discover(config.weights, models=config.models, default_model=config.default_model)
    results = open_result_store(config.results, config.results_path, config.result_ttl_seconds,
                                config.max_result_bytes)
    jobs = open_job_store(config)
    handler = EditHandler(config, catalogue, results, jobs)
    cancellations = CancelRegistry(tempfile.mkdtemp(prefix="clarity-cancelled-"))
    server = patches.SupervisedLitServer(
        EditsLitAPI(handler, cancellations),
        accelerator=config.accelerator,
        devices=config.devices,
        workers_per_device=config.workers_per_device,
        timeout=config.queue_timeout,  # also checked by the worker, so an expired request is never run
        max_payload_size=config.max_payload_bytes,
        model_metadata={"models": list(catalogue.models), "default_model": catalogue.default_model,
                        "weights": str(config.weights)},
        restart_workers=True,
        shutdown_timeout=config.shutdown_timeout,
    )
    buffer = patches.install_tracked_buffer(server)
    endpoint = wire.EDITS_PATH.rsplit("/", 1)[-1]  # LitServe keys worker statuses by it
    watchdog = RequestWatchdog(
        buffer, config.queue_timeout, lambda worker_id: patches.worker_is_ready(server, endpoint, worker_id)
    )
    patches.run_beside_litserve(server, watchdog.run, name="clarity-request-watchdog")
    patches.run_beside_litserve(server, lambda: purge_on_a_timer(results, jobs), name="clarity-result-expiry")
    in_flight = EditsInFlight()
    drain = Drain(buffer, in_flight, config.shutdown_timeout)
    patches.run_beside_litserve(server, drain.run, name="clarity-drain")

    app = server.app
    forwarded = ForwardedHeaders(config.forwarded_allow_ips)
    submitter = _start_job_runner(server, config, handler, jobs, forwarded, stopping=lambda: drain.stopping)
    # Each added middleware wraps the app so far: the metrics end up outermost (they count the guard's
    # refusals), then the guard, then the queue bound.
    app.add_middleware(QueueBound, max_queue=config.max_queue, max_uploads=config.max_uploads,
                       cancellations=cancellations, base_url=forwarded.base_url, in_flight=in_flight,
                       streamed=StreamedEdits(submitter, jobs))
    app.add_middleware(
        GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_payload_bytes,
        upload_timeout=config.upload_timeout, ready=lambda: patches.any_worker_ready(server),
        stopping=lambda: drain.stopping,
        open_paths=OPEN_PATHS | {metrics.METRICS_PATH} if config.metrics_public else OPEN_PATHS,
    )
    app.add_middleware(metrics.HTTPMetricsMiddleware, routes=lambda: app.router.routes)
    install_error_handlers(app, plain_errors={504: QUEUE_TIMEOUT})
    add_public_routes(app, list(catalogue.models), results)
    add_job_routes(app, submitter, jobs)
    metrics.add_metrics_route(app)
    install_playground(app)
    install_docs(app)
    return server


def _start_job_runner(
    server: patches.SupervisedLitServer, config: ServerConfig, handler: EditHandler, jobs: SQLiteJobStore,
    forwarded: ForwardedHeaders, stopping: Callable[[], bool],
) -> JobSubmitter:
    """Run the jobs beside LitServe (one in flight per inference worker, each through the app's own edits
    route), with their webhooks; return what submits new ones."""
    webhooks = WebhookSender(config.webhook_secret, config.webhook_allow, config.webhook_retry_seconds)
    runner = JobRunner(jobs, in_process_executor(server.app, config.api_key),
                       concurrency=patches.worker_count(server), webhooks=webhooks, stopping=stopping)
    patches.run_beside_litserve(server, runner.run, name="clarity-job-runner")
    return JobSubmitter(handler, jobs, runner.wake, forwarded.base_url, webhooks)


async def purge_on_a_timer(results: ResultStore, jobs: SQLiteJobStore) -> None:
    """Delete expired results and jobs every `PURGE_INTERVAL` seconds, not only when a new result is saved."""
    while True:
        await asyncio.sleep(PURGE_INTERVAL)
        try:
            await asyncio.to_thread(results.purge_expired)  # a bucket's listing takes round trips
        except OSError:  # the storage unreachable or refusing for now: the next round tries again
            logger.warning("purging expired results failed", exc_info=True)
        try:
            jobs.purge_expired()
        except sqlite3.Error:  # locked for longer than its timeout: the next round tries again
            logger.warning("purging expired jobs failed", exc_info=True)


def serve(config: ServerConfig) -> int:
    """Run the server until stopped; return the exit code."""
    server = build_server(config)
    catalogue = server.lit_api.handler.catalogue
    logger.info("serving %s (default %s) from %s", ", ".join(catalogue.models), catalogue.default_model,
                config.weights)
    if not config.api_key:
        logger.warning("no API key set (--api-key or CLARITY_API_KEY): anyone who can reach the port can use it")
    # Forwarded headers are read by the API core, from the proxies config.forwarded_allow_ips names;
    # uvicorn's own reading (which trusts 127.0.0.1 by default) would rewrite the scheme under it.
    try:
        server.run(host=config.host, port=config.port, generate_client_file=False, proxy_headers=False)
    finally:
        shutil.rmtree(metrics.use_multiprocess_dir(), ignore_errors=True)  # every process has stopped
    return 0
