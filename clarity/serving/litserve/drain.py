"""An HTTP process's part in stopping the server: answer every accepted edit, then stop serving.

Uvicorn's own graceful shutdown stops listening at once: a client could no longer fetch the
result URL it was just given, and a request still running at its timeout would be dropped
unanswered. So the first SIGINT or SIGTERM this process gets (sent to the whole group, or by the
main process when it begins stopping) starts a drain instead, and uvicorn is handed the signal
only once it is done:

1. From the signal on, new edits and `/health` are answered 503 `shutting_down`
   (`GuardMiddleware` asks `stopping`); result files and the other routes are still served.
2. The edits already accepted (queued, running or still uploading: `EditsInFlight`) get up to
   the shutdown timeout to be answered; those that cannot finish by then are answered 503
   `shutting_down` (with `Retry-After`).
3. Whoever got the last answer gets `RESULT_GRACE_SECONDS` to fetch its result URL.
4. Uvicorn gets the SIGTERM: it closes the connections (waiting at most its graceful timeout for
   those still busy, such as a download) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from clarity.api.errors import shutting_down
from clarity.serving.litserve.patches import TrackedBuffer
from clarity.serving.litserve.queue import EditsInFlight
from clarity.serving.litserve.signals import STOP_SIGNALS

logger = logging.getLogger(__name__)

#: Seconds a client that got an answer during the drain has to fetch its result URL before the
#: process stops serving (the drain waits this long after the last answer, within the timeout).
RESULT_GRACE_SECONDS = 2.0
#: Seconds, after the shutdown timeout, for the 503s of unfinished requests to be sent (requests
#: still uploading at the timeout are answered as they reach the queue).
GIVE_UP_SECONDS = 1.0
#: Seconds between two looks at the requests in flight.
POLL_SECONDS = 0.1


class Drain:
    """Drains one HTTP process on its first SIGINT or SIGTERM (see the module's docstring).

    `buffer`: the process's response buffer, to answer unfinished requests; `in_flight`: the
    edits the process holds; `timeout`: seconds accepted requests get after the signal.
    """

    def __init__(self, buffer: TrackedBuffer, in_flight: EditsInFlight, timeout: float) -> None:
        self.buffer = buffer
        self.in_flight = in_flight
        self.timeout = timeout
        self.stopping = False

    async def run(self) -> None:
        """For the life of the HTTP process (on its event loop, in its main thread): wait for the
        signal, drain, then hand the signal on to uvicorn, whose handlers were there first."""
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()

        def on_signal(signum: int, frame: object) -> None:
            self.stopping = True  # new edits are turned away from now on
            loop.call_soon_threadsafe(signalled.set)  # also wakes the loop if it sleeps in a poll

        previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
        try:
            await signalled.wait()
            await self.drain()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        signal.raise_signal(signal.SIGTERM)

    async def drain(self) -> None:
        """Wait until the accepted edits are answered, or answer them 503 at the deadline; then
        give the last client a moment to fetch its result."""
        deadline = time.monotonic() + self.timeout
        logger.info("stopping: %d edit request(s) in flight get up to %g s to finish; new ones are answered"
                    " 503 shutting_down", self.in_flight.count, self.timeout)
        await wait_until(lambda: self.in_flight.count == 0, deadline)
        if self.in_flight.count:
            await self.give_up()
        await wait_until(lambda: False, min(self.in_flight.last_answered + RESULT_GRACE_SECONDS, deadline))
        logger.info("stopping: every accepted edit request is answered")

    async def give_up(self) -> None:
        """Answer the requests still in flight 503 `shutting_down`, as each reaches the response buffer."""
        error = shutting_down(f"The server is shutting down and this request could not finish within its"
                              f" shutdown timeout of {self.timeout:g} s; retry shortly.")
        answered = 0
        until = time.monotonic() + GIVE_UP_SECONDS
        while self.in_flight.count and time.monotonic() < until:
            for uid, _, _ in list(self.buffer.unanswered()):
                self.buffer.answer(uid, error)
                answered += 1
            await asyncio.sleep(POLL_SECONDS)
        logger.warning("stopping: %d request(s) could not finish within %g s and were answered 503 shutting_down",
                       answered, self.timeout)


async def wait_until(done: Callable[[], bool], deadline: float) -> None:
    """Return once `done()` is true or `deadline` (`time.monotonic()`) has passed."""
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
