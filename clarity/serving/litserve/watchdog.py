"""Keeping every request answered while inference workers are slow, crash or are stopped.

Two gaps of LitServe 0.2.19 are closed here, in each HTTP process:

- Its `timeout` is checked only when a worker takes the request off the queue, so behind a
  long upscale a queued request waits for that upscale to end before it learns it timed out.
- With `restart_workers=True` its monitor revives a dead worker and fails the requests that
  worker was running, but the monitor runs in the main process and the buffer it clears is
  that process's (empty) copy: the HTTP processes are forks with their own. Their clients
  would wait forever.

`RequestWatchdog` runs on the event loop that owns the process's response buffer and answers
both kinds of request with an OpenAI-shaped error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from clarity.api import metrics
from clarity.api.errors import APIError, queue_timeout
from clarity.serving.litserve.patches import TrackedBuffer

logger = logging.getLogger(__name__)

#: Seconds between two checks of the waiting requests.
CHECK_INTERVAL = 0.25


class RequestWatchdog:
    """Fails waiting requests that will not be answered in time, or at all.

    `queue_timeout`: seconds a request may wait for a worker to start it (504 `queue_timeout`).
    `worker_ready(worker_id)`: whether that worker is alive; one that is no longer ready while
    running a request has died and is being restarted, so its request is answered 503
    `worker_restarted` (which the SDKs retry).
    """

    def __init__(self, buffer: TrackedBuffer, queue_timeout: float, worker_ready: Callable[[int], bool]) -> None:
        self.buffer = buffer
        self.queue_timeout = queue_timeout
        self.worker_ready = worker_ready

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
        failed = 0
        for uid, queued_at, worker_id in self.buffer.unanswered():
            if worker_id is None:  # still queued: no worker has said it started it
                waited = now - queued_at
                if waited > self.queue_timeout:
                    self.buffer.answer(uid, queue_timeout(waited, self.queue_timeout))
                    metrics.record_queue_timeout()
                    failed += 1
            elif not self.worker_ready(worker_id):
                logger.warning("inference worker %s died while running request %s", worker_id, uid)
                self.buffer.answer(uid, APIError(
                    503, "The worker running this request stopped unexpectedly and is being restarted;"
                         " retry shortly.", code="worker_restarted"))
                failed += 1
        return failed
