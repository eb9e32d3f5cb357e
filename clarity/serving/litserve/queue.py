"""The edits queue of one HTTP process: bounded, and emptied of requests whose clients left.

LitServe has no queue limit and cannot withdraw a queued request. `QueueBound` counts the edit
requests this process holds (from the first byte of the body to the answer) and answers 429
`queue_full` beyond `max_queue`, before an upload is buffered; it tags each request with an id
(see `patches.tag_request`) and marks it in a `CancelRegistry` when its client disconnects, so
that workers skip it when its turn comes, or stop it after the current denoising step. The
count is an `EditsInFlight`, which a shutdown also reads (drain.py): it waits for it to fall to 0.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from clarity.api import wire
from clarity.api.errors import APIError
from clarity.api.http import json_error
from clarity.serving.litserve.patches import tag_request

#: Seconds a client is told to wait before retrying a full queue.
QUEUE_FULL_RETRY_AFTER = 10


class CancelRegistry:
    """Ids of requests whose clients disconnected, shared between processes through a folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def cancel(self, request_id: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / request_id).touch()

    def is_cancelled(self, request_id: str | None) -> bool:
        return request_id is not None and (self.folder / request_id).exists()

    def forget(self, request_id: str) -> None:
        (self.folder / request_id).unlink(missing_ok=True)


class EditsInFlight:
    """The edit requests one HTTP process holds (from the first byte of the body to the end of the
    answer), and when the last of them was answered (`time.monotonic()`)."""

    def __init__(self) -> None:
        self.count = 0
        self.last_answered = -math.inf


class QueueBound:
    """ASGI middleware for the edits route: at most `max_queue` requests held (counted in `in_flight`),
    each one tagged."""

    def __init__(
        self, app: ASGIApp, *, max_queue: int, cancellations: CancelRegistry, in_flight: EditsInFlight
    ) -> None:
        self.app = app
        self.max_queue = max_queue
        self.cancellations = cancellations
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != wire.EDITS_PATH:
            await self.app(scope, receive, send)
            return
        if self.in_flight.count >= self.max_queue:
            message = f"The server is busy: {self.in_flight.count} requests are already queued or running; retry later."
            refusal = APIError(429, message, code="queue_full", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)})
            await json_error(refusal)(scope, receive, send)
            return
        # Single-threaded event loop: the check above and this increment cannot interleave.
        self.in_flight.count += 1
        try:
            async with tag_request(scope, receive, send, self.cancellations.cancel) as (request_id, tagged):
                try:
                    await self.app(*tagged)
                finally:
                    # By now the worker has answered (or given up on) the request.
                    self.cancellations.forget(request_id)
        finally:
            self.in_flight.count -= 1
            self.in_flight.last_answered = time.monotonic()
