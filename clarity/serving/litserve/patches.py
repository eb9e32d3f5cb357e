"""Every use of LitServe 0.2.19 beyond its public API, in one place.

LitServe serves the edits endpoint well, but a shared production server needs four things it
does not offer: a request's queue age and worker, to answer requests that will never be
answered; a shutdown that answers the accepted requests however the stop signal arrives, and
revives no worker; a way to tell a worker which HTTP request a form came from; and the
workers' readiness, to answer 503 while they load. Each touch below says why, and names the
test that fails if an upgrade breaks it.
Pinned `litserve>=0.2.19,<0.3` in pyproject.toml; check every touch before moving the pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import litserve as ls
from fastapi import HTTPException
from litserve.utils import LitAPIStatus, WorkerSetupStatus
from starlette.types import Message, Receive, Scope, Send

from clarity.api import metrics
from clarity.api.errors import APIError
from clarity.api.http import multipart_boundary
from clarity.serving.litserve.signals import install_main_handlers, stop_signals_blocked

logger = logging.getLogger(__name__)

#: Seconds between two checks for dead inference workers.
WORKER_MONITOR_INTERVAL = 0.5
#: Seconds uvicorn gives the connections still open after an HTTP process's drain (a download).
CLOSE_CONNECTIONS_SECONDS = 5.0
#: Seconds an HTTP process gets beyond the shutdown timeout to send its last answers and close
#: its connections, before it is killed.
HTTP_EXIT_SECONDS = CLOSE_CONNECTIONS_SECONDS + 5.0


# --- the response buffer: queue ages, workers, answers ------------------------------------------


class TrackedBuffer(dict):
    """LitServe's response buffer (`LitServer.response_buffer`, uid -> `ResponseBufferItem`), also
    noting when each request entered it: LitServe adds an entry right after putting the request
    on the queue and pops it once the answer has been read, so the entry's age is its wait.

    Guarded by tests/test_robustness.py::test_the_watchdog_answers_overdue_and_orphaned_requests_only
    (the item fields) and ::test_a_request_queued_past_the_deadline_gets_a_504_without_waiting_for_the_worker
    (the buffer).
    """

    def __init__(self) -> None:
        super().__init__()
        self.added_at: dict[str, float] = {}

    def __setitem__(self, uid: str, item: Any) -> None:
        self.added_at.setdefault(uid, time.monotonic())
        super().__setitem__(uid, item)

    def pop(self, uid: str, *default: Any) -> Any:
        self.added_at.pop(uid, None)
        return super().pop(uid, *default)

    def unanswered(self) -> Iterator[tuple[str, float, int | None]]:
        """(uid, when it was queued, the worker running it or None if still queued) of each waiting request."""
        for uid, item in list(self.items()):
            if not item.event.is_set():
                yield uid, self.added_at.get(uid, time.monotonic()), item.worker_id

    def answer(self, uid: str, error: APIError) -> None:
        """Answer a waiting request with `error` through LitServe's own error path (its handler
        re-raises an `HTTPException` found as an error response, as it is)."""
        item = self[uid]
        item.response = (HTTPException(error.status, detail=error.body), LitAPIStatus.ERROR)
        item.event.set()


def install_tracked_buffer(server: ls.LitServer) -> TrackedBuffer:
    """Replace the server's response buffer before the HTTP processes fork: each gets its own copy."""
    server.response_buffer = TrackedBuffer()
    return server.response_buffer


def worker_is_ready(server: ls.LitServer, endpoint: str, worker_id: int) -> bool:
    """Whether LitServe counts inference worker `worker_id` of `endpoint` as set up and alive.

    `workers_setup_status` is a manager dict made by `run()`; a worker that died reads "starting"
    while the monitor restarts it. Guarded by
    test_robustness.py::test_a_killed_worker_fails_its_request_fast_and_comes_back.
    """
    return worker_statuses(server).get(f"{endpoint}_{worker_id}") == WorkerSetupStatus.READY


def worker_count(server: ls.LitServer) -> int:
    """How many inference workers serve the edits: LitServe's device list (resolved from `devices` when it
    was built) times the workers per device, as its private `_inference_workers_config_for_api` counts them.
    Guarded by test_litserve_patches.py::test_the_attributes_read_and_set_exist_with_their_meaning."""
    return len(server.devices) * server.workers_per_device


def any_worker_ready(server: ls.LitServer) -> bool:
    """Whether one worker is ready (enough to queue for; the others may be restarting)."""
    return any(value == WorkerSetupStatus.READY for value in worker_statuses(server).values())


def worker_statuses(server: ls.LitServer) -> dict[str, str]:
    status = getattr(server, "workers_setup_status", None)  # absent until run() makes it
    return status.copy() if status is not None else {}


def run_beside_litserve(server: ls.LitServer, task: Callable[[], Any], name: str) -> None:
    """Run the coroutine `task()` on each HTTP process's event loop for as long as it serves.

    LitServe builds its FastAPI app with its own lifespan; it is wrapped here (Starlette's
    `router.lifespan_context`) because the response buffer belongs to that loop. Guarded by
    test_robustness.py::test_a_request_queued_past_the_deadline_gets_a_504_without_waiting_for_the_worker.
    """
    litserve_lifespan = server.app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with litserve_lifespan(app):
            running = asyncio.create_task(task(), name=name)
            try:
                yield
            finally:
                running.cancel()

    server.app.router.lifespan_context = lifespan


# --- shutdown and worker restarts ---------------------------------------------------------------


class SupervisedLitServer(ls.LitServer):
    """`LitServer` that stops as signals.py and drain.py describe, and restarts dead workers.

    LitServe stops on KeyboardInterrupt only, in the main process, and then signals the HTTP
    processes and the workers at once: whenever the signal also reaches the other processes
    (Ctrl-C, systemd), the requests in flight are lost, and its monitor revives the workers it
    sees stopped. Here the main process alone acts on SIGINT and SIGTERM, and stops the others
    in order: the HTTP processes drain and exit, then the workers are killed (they ignore
    SIGTERM, and no request needs them any more), then LitServe's own steps close the rest.

    Guarded, unless a method says otherwise, by every test of tests/test_shutdown.py.
    """

    def __init__(self, *args: Any, shutdown_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_timeout = shutdown_timeout
        # Read by LitServe for uvicorn's own graceful shutdown, which comes after the drain and
        # only closes the connections still open (its default: 30 s).
        self.uvicorn_graceful_timeout = CLOSE_CONNECTIONS_SECONDS
        self._stopping = threading.Event()
        self._serving = False
        self._monitor: threading.Thread | None = None

    def run(self, *args: Any, **kwargs: Any) -> None:
        """LitServe's `run`, with SIGINT and SIGTERM handled by this process alone (signals.py)."""
        # Read by the workers' setup (`lit_api` is the LitAPI LitServe was given). Only here:
        # LitServe's test harness, which does not call run(), stops its workers with SIGTERM.
        self.lit_api.ignore_stop_signals = True
        install_main_handlers(self.begin_stop, self.shutdown_timeout)
        super().run(*args, **kwargs)

    def begin_stop(self) -> bool:
        """Have `run` stop, from a signal handler in the main thread; False while still starting."""
        if not self._serving:
            return False
        self._stopping.set()
        # `run` waits on `_shutdown_event` (a manager event; LitServe's /shutdown route sets it)
        # and shuts down when it is set: no KeyboardInterrupt, whose traceback and log line
        # the tests look for. The call must use another thread's connection to the manager, the
        # main thread's being busy with the wait.
        threading.Thread(target=self._shutdown_event.set, name="clarity-begin-stop", daemon=True).start()
        return True

    # LitServe spawns workers in these two; with the stop signals blocked meanwhile, a worker
    # starts with them blocked, and one sent to the group before its setup ignores them does not
    # kill it. Also guarded by test_robustness.py::test_a_killed_worker_fails_its_request_fast_and_comes_back.
    def launch_inference_worker(self, lit_api: ls.LitAPI) -> Any:
        with stop_signals_blocked():
            return super().launch_inference_worker(lit_api)

    def launch_single_inference_worker(self, lit_api: ls.LitAPI, worker_id: int) -> Any:
        with stop_signals_blocked():
            return super().launch_single_inference_worker(lit_api, worker_id)

    def _start_worker_monitoring(self, manager: Any, uvicorn_workers: Any) -> None:
        # `run` calls this once everything has started, just before it waits for the stop. It
        # starts this class's monitor instead of LitServe's, which checks every 2 s, goes on
        # until a manager call tells it to stop, and logs "Worker 0 is dead. Restarting it" for
        # workers stopped on purpose. Also guarded by
        # test_robustness.py::test_a_killed_worker_fails_its_request_fast_and_comes_back.
        self._serving = True
        self._monitor = threading.Thread(target=self._restart_dead_workers, name="clarity-worker-monitor",
                                         daemon=True)
        self._monitor.start()

    def _restart_dead_workers(self) -> None:
        """Until a stop begins: every `WORKER_MONITOR_INTERVAL` s, start a new inference worker in place
        of each that died (the watchdog answers the requests it was running)."""
        while not self._stopping.wait(WORKER_MONITOR_INTERVAL):
            for worker_id, process in enumerate(self.inference_workers):
                if process.is_alive() or self._stopping.is_set():
                    continue
                logger.warning("inference worker %d (pid %s) died with exit code %s; starting a new one",
                               worker_id, process.pid, process.exitcode)
                metrics.record_worker_restart(process.pid)
                self.inference_workers[worker_id] = self.launch_single_inference_worker(self.lit_api, worker_id)

    def _perform_graceful_shutdown(self, manager: Any, uvicorn_workers: dict[int, Any],
                                   shutdown_reason: str = "normal") -> None:
        # Where `run` shuts down, once its wait ends: the processes are stopped in order here, and
        # LitServe's own steps are left only the transport and the manager.
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join()
        self._drain_http_processes(list(uvicorn_workers.values()))
        for process in self.inference_workers:
            process.kill()
        for process in self.inference_workers:
            process.join()
        super()._perform_graceful_shutdown(manager, {}, shutdown_reason)

    def _drain_http_processes(self, processes: list[Any]) -> None:
        """Ask each HTTP process to drain (SIGTERM; one sent to the whole group has begun it already)
        and wait for it to exit; kill it if it takes more than its share of time."""
        deadline = time.monotonic() + self.shutdown_timeout + HTTP_EXIT_SECONDS
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
            if process.is_alive():
                logger.warning("HTTP process %s did not stop within %g s; killing it", process.pid,
                               self.shutdown_timeout + HTTP_EXIT_SECONDS)
                process.kill()
                process.join()


# --- the request's id, address and arrival: what a worker must know of the HTTP request a form came from ---

#: The form fields carrying them. They always come first, in this order (they are prepended); a
#: client sending fields of these names gets the usual "unknown parameter" error for them.
REQUEST_ID_FIELD = "clarity_request_id"
BASE_URL_FIELD = "clarity_base_url"
RECEIVED_AT_FIELD = "clarity_received_at"
JOB_ID_FIELD = "clarity_job_id"  # the job whose form it is; empty but present on every other request
TAG_FIELDS = (REQUEST_ID_FIELD, BASE_URL_FIELD, RECEIVED_AT_FIELD, JOB_ID_FIELD)


@dataclass(frozen=True)
class Tags:
    """What `tag_request` put in front of a form: the request id, the base URL of its result URLs, when
    its body started to arrive (`time.time()` in the HTTP process; the queue wait starts there), and
    the job it runs, if any."""

    request_id: str | None = None
    base_url: str | None = None
    received_at: float | None = None
    job_id: str | None = None


def split_tags(items: list[tuple[str, Any]]) -> tuple[Tags, list[tuple[str, Any]]]:
    """The tags `tag_request` put first in a form (those present, in order), and the form's own fields."""
    values: dict[str, Any] = {}
    for (name, value), expected in zip(items, TAG_FIELDS, strict=False):
        if name != expected:
            break
        values[name] = value
    received_at = values.get(RECEIVED_AT_FIELD)
    tags = Tags(values.get(REQUEST_ID_FIELD), values.get(BASE_URL_FIELD),
                float(received_at) if received_at is not None else None, values.get(JOB_ID_FIELD) or None)
    return tags, items[len(values):]


@contextlib.asynccontextmanager
async def tag_request(
    scope: Scope, receive: Receive, send: Send, base_url: str, on_disconnect: Callable[[str], None],
    job_id: str | None = None, received_at: float | None = None,
) -> AsyncIterator[tuple[str, tuple[Scope, Receive, Send]]]:
    """A fresh request id, and (scope, receive, send) for the app with the id, `base_url`, the time of
    arrival (`received_at`, default now) and `job_id` (the job the request runs, if any) in the body (`Tags`).

    LitServe 0.2.19 hands `decode_request` the parsed form and nothing else of the HTTP request,
    and cannot withdraw a queued request. So the id, and the base URL the client reached the
    server at (for result URLs it can open), travel as form fields put in front of the multipart
    body (the form is parsed after this, in the HTTP process, and reaches the worker whole), and
    when the client disconnects before its answer is sent, `on_disconnect(id)` is called, so that
    workers can skip or stop its work. The id is also sent back as the `x-request-id` header (the
    OpenAI SDKs expose it as `response._request_id`).
    Guarded by test_robustness.py::test_a_client_that_hangs_up_stops_its_running_upscale and
    test_logs.py (the id in the worker's log lines is the one the client got).

    `scope` must be a multipart/form-data request with a boundary.
    """
    request_id = f"req_{secrets.token_hex(16)}"  # OpenAI's shape; also a safe file name
    tags = {REQUEST_ID_FIELD: request_id, BASE_URL_FIELD: base_url,
            RECEIVED_AT_FIELD: repr(received_at if received_at is not None else time.time()),
            # Always sent, so that a client's own field of that name can never take the tag's place.
            JOB_ID_FIELD: job_id or ""}
    tagged_scope, prefix = _with_form_fields(scope, tags)
    state = {"prefix_sent": False, "body_done": False, "answered": False}
    disconnected: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
    watcher: list[asyncio.Task[None]] = []

    async def watch() -> None:
        # After the body, the server's next message for this request is the disconnect: sent
        # when the client goes, or once the response is complete.
        message = await receive()
        if message["type"] == "http.disconnect" and not state["answered"]:
            on_disconnect(request_id)
        disconnected.set_result(message)

    async def tagged_receive() -> Message:
        if state["body_done"]:
            return await asyncio.shield(disconnected)  # only the watcher reads the real channel
        if not state["prefix_sent"]:
            state["prefix_sent"] = True
            return {"type": "http.request", "body": prefix, "more_body": True}
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            state["body_done"] = True
            watcher.append(asyncio.create_task(watch(), name=f"clarity-disconnect-watch-{request_id[:12]}"))
        return message

    async def answered_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            state["answered"] = True
            message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
        await send(message)

    try:
        yield request_id, (tagged_scope, tagged_receive, answered_send)
    finally:
        for task in watcher:
            task.cancel()


def _with_form_fields(scope: Scope, fields: dict[str, str]) -> tuple[Scope, bytes]:
    """`scope` with its Content-Length grown by the multipart parts that send `fields` first, and those parts."""
    boundary = multipart_boundary(dict(scope["headers"]).get(b"content-type", b""))
    part = b"".join(
        b"--" + boundary + b"\r\n"
        + f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    headers = [
        (header, str(int(text) + len(part)).encode() if header.lower() == b"content-length" else text)
        for header, text in scope["headers"]
    ]
    return {**scope, "headers": headers}, part
