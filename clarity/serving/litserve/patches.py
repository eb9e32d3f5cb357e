"""Every use of LitServe 0.2.19 beyond its public API, in one place.

LitServe serves the edits endpoint well, but a shared production server needs four things it
does not offer: a request's queue age and worker, to answer requests that will never be
answered; a shutdown that stops listening at once and revives no worker; a way to tell a
worker which HTTP request a form came from; and the workers' readiness, to answer 503 while
they load. Each touch below says why, and names the test that fails if an upgrade breaks it.
Pinned `litserve>=0.2.19,<0.3` in pyproject.toml; check every touch before moving the pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import litserve as ls
from fastapi import HTTPException
from litserve.utils import LitAPIStatus, WorkerSetupStatus
from python_multipart.multipart import parse_options_header
from starlette.types import Message, Receive, Scope, Send

from clarity.api.errors import APIError

#: Seconds between LitServe's checks for dead inference workers (its default is 2).
WORKER_MONITOR_INTERVAL = 0.5
#: Seconds after a shutdown starts before the listening socket is shut down.
STOP_LISTENING_DELAY = 0.5


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
    """`LitServer` that checks for dead workers often, stops listening at once on shutdown, and
    stops restarting workers then.

    On shutdown LitServe first lets the HTTP processes drain (uvicorn finishes accepted requests
    for up to `uvicorn_graceful_timeout` seconds, while the workers keep serving), then
    terminates the workers. Two things go wrong on the way, fixed here by overriding private
    methods (guarded by test_robustness.py::test_sigterm_drains_the_running_request_then_exits):

    - The listening socket is opened in this process and inherited by every process forked
      from it (the HTTP processes and LitServe's manager). Uvicorn closes only its copy, so the
      kernel would go on accepting connections that nobody answers. The socket itself is shut
      down instead (`_start_server` is where LitServe hands it over), which refuses new
      connections in all processes at once.
    - With `restart_workers=True` the monitor thread, which is not told about a shutdown caused
      by a signal, would revive the workers it sees terminated (`launch_single_inference_worker`).
    """

    _stopping = False
    _listening: list[socket.socket] = []

    def __init__(self, *args: Any, shutdown_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Attributes LitServe reads but takes no argument for (its defaults: 2 s and 30 s).
        self.monitor_internal = WORKER_MONITOR_INTERVAL
        self.uvicorn_graceful_timeout = shutdown_timeout

    def _start_server(self, port: Any, num_uvicorn_servers: int, log_level: str, sockets: list[socket.socket],
                      *args: Any, **kwargs: Any) -> Any:
        self._listening = list(sockets or [])
        return super()._start_server(port, num_uvicorn_servers, log_level, sockets, *args, **kwargs)

    def _perform_graceful_shutdown(self, *args: Any, **kwargs: Any) -> None:
        self._stopping = True
        # Delayed until uvicorn, signalled just below, has stopped accepting: an accept loop
        # still watching the socket would fail on every turn once it is shut down.
        timer = threading.Timer(STOP_LISTENING_DELAY, self._stop_listening)
        timer.daemon = True
        timer.start()
        super()._perform_graceful_shutdown(*args, **kwargs)

    def _stop_listening(self) -> None:
        for listening in self._listening:
            with contextlib.suppress(OSError):  # already closed
                listening.shutdown(socket.SHUT_RDWR)
            listening.close()

    def launch_single_inference_worker(self, lit_api: ls.LitAPI, worker_id: int) -> Any:
        if self._stopping:
            # Hand the monitor back the dead process: it stays dead and nothing new is spawned.
            return self.inference_workers[worker_id]
        return super().launch_single_inference_worker(lit_api, worker_id)


# --- the request's id and address: what a worker must know of the HTTP request a form came from ---

#: The form fields carrying them. They always come first, in this order (they are prepended); a
#: client sending fields of these names gets the usual "unknown parameter" error for them.
REQUEST_ID_FIELD = "clarity_request_id"
BASE_URL_FIELD = "clarity_base_url"


def split_tags(items: list[tuple[str, Any]]) -> tuple[str | None, str | None, list[tuple[str, Any]]]:
    """The request id and base URL `tag_request` put first in a form, and the form's own fields."""
    if len(items) >= 2 and (items[0][0], items[1][0]) == (REQUEST_ID_FIELD, BASE_URL_FIELD):
        return items[0][1], items[1][1], items[2:]
    return None, None, items


@contextlib.asynccontextmanager
async def tag_request(
    scope: Scope, receive: Receive, send: Send, base_url: str, on_disconnect: Callable[[str], None]
) -> AsyncIterator[tuple[str, tuple[Scope, Receive, Send]]]:
    """A fresh request id, and (scope, receive, send) for the app with the id and `base_url` in the body.

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
    tagged_scope, prefix = _with_form_fields(scope, {REQUEST_ID_FIELD: request_id, BASE_URL_FIELD: base_url})
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
    _, options = parse_options_header(dict(scope["headers"]).get(b"content-type", b""))
    part = b"".join(
        b"--" + options[b"boundary"] + b"\r\n"
        + f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    headers = [
        (header, str(int(text) + len(part)).encode() if header.lower() == b"content-length" else text)
        for header, text in scope["headers"]
    ]
    return {**scope, "headers": headers}, part
