"""Keeping every request answered while inference workers are slow, crash or are stopped.

LitServe 0.2.19 parks each request of the HTTP process in `LitServer.response_buffer` (uid ->
`ResponseBufferItem`) until a worker answers. Two gaps are closed here, in the HTTP process:

- Its `timeout` is checked only when a worker takes the request off the queue, so behind a
  long upscale a queued request waits for that upscale to end before it learns it timed out.
- With `restart_workers=True` its monitor revives a dead worker and fails the requests that
  worker was running, but the monitor runs in the main process and the buffer it clears is
  that process's (empty) copy: the HTTP processes are forks with their own. Their clients
  would wait forever.

`RequestWatchdog` runs in each HTTP process, on the event loop that owns the buffer, and
answers both kinds of request with an OpenAI-shaped error through LitServe's own error path.
`SupervisedLitServer` keeps LitServe's monitor from reviving workers during a shutdown.

Not handled: a client that disconnects. Uvicorn does not cancel a handler when its client
goes away, and even if the disconnect were noticed, LitServe 0.2.19 offers no way to take a
request back off its manager queue, nor tells `decode_request` the request's uid, so a worker
cannot know that a request it picks up was abandoned. Abandoned requests run to the end (or
to the queue deadline, if they are still waiting then) and their answer is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import litserve as ls
from fastapi import HTTPException
from litserve.utils import LitAPIStatus, WorkerSetupStatus

from clarity.serving import openai

logger = logging.getLogger(__name__)

#: Seconds between two checks of the waiting requests.
CHECK_INTERVAL = 0.25
#: Seconds after a shutdown starts before the listening socket is shut down.
STOP_LISTENING_DELAY = 0.5


class TrackedBuffer(dict):
    """LitServe's response buffer, also noting when each request entered it (it was queued then).

    LitServe adds an entry right after putting the request on the queue and pops it when the
    answer has been read, so the entry's age is the time the request has been waiting.
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


class RequestWatchdog:
    """Fails waiting requests that will not be answered in time, or at all.

    `queue_timeout`: seconds a request may wait for a worker to start it (504 `queue_timeout`).
    `worker_status`: returns LitServe's worker setup statuses (`{"edits_0": "ready", ...}`); a
    worker that is no longer ready while running a request has died and is being restarted,
    so its request is answered 503 `worker_restarted` (which the SDKs retry).
    """

    def __init__(
        self,
        buffer: TrackedBuffer,
        queue_timeout: float,
        worker_status: Callable[[], Mapping[str, str]],
        endpoint: str,
    ) -> None:
        self.buffer = buffer
        self.queue_timeout = queue_timeout
        self.worker_status = worker_status
        self.endpoint = endpoint

    async def run(self) -> None:
        """Check every `CHECK_INTERVAL` seconds until cancelled."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            try:
                self.check()
            except Exception:  # e.g. the manager process is gone during shutdown
                logger.debug("request watchdog check failed", exc_info=True)

    def check(self, now: float | None = None) -> int:
        """Answer every request that is overdue or lost with its worker; return how many."""
        now = time.monotonic() if now is None else now
        statuses: Mapping[str, str] | None = None
        failed = 0
        for uid, item in list(self.buffer.items()):
            if item.event.is_set():
                continue
            if item.worker_id is None:  # still queued: no worker has said it started it
                waited = now - self.buffer.added_at.get(uid, now)
                if waited > self.queue_timeout:
                    self._fail(item, openai.APIError(
                        504, f"The request waited {waited:.0f} s for a free worker, more than this server's"
                             f" limit of {self.queue_timeout:g} s; retry later.", code="queue_timeout"))
                    failed += 1
                continue
            if statuses is None:
                statuses = dict(self.worker_status())
            if statuses.get(f"{self.endpoint}_{item.worker_id}") != WorkerSetupStatus.READY:
                logger.warning("inference worker %s died while running request %s", item.worker_id, uid)
                self._fail(item, openai.APIError(
                    503, "The worker running this request stopped unexpectedly and is being restarted;"
                         " retry shortly.", code="worker_restarted"))
                failed += 1
        return failed

    @staticmethod
    def _fail(item: Any, error: openai.APIError) -> None:
        # LitServe's handler re-raises an HTTPException found as an error response, as it is.
        item.response = (HTTPException(error.status, detail=error.body), LitAPIStatus.ERROR)
        item.event.set()


class SupervisedLitServer(ls.LitServer):
    """`LitServer` that stops listening at once on shutdown and stops restarting workers then.

    On shutdown LitServe first lets the HTTP processes drain (uvicorn finishes accepted
    requests, for up to `uvicorn_graceful_timeout` seconds, while the workers keep serving),
    then terminates the workers. Two things go wrong on the way, fixed here:

    - The listening socket is opened in this process and inherited by every process forked
      from it (the HTTP processes and LitServe's manager). Uvicorn closes only its copy, so
      the kernel would go on accepting connections that nobody answers. The socket itself
      is shut down instead, which refuses new connections in all processes at once.
    - With `restart_workers=True` the monitor thread, which is not told about a shutdown
      caused by a signal, would revive the workers it sees terminated.
    """

    _stopping = False
    _listening: list[socket.socket] = []

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
