"""The edits queue of one HTTP process: bounded, and emptied of requests whose clients left.

LitServe has no queue limit and cannot withdraw a queued request. `QueueBound` bounds the bodies
being received (429 `too_many_uploads` beyond `max_uploads`) and the requests held once their
bodies have arrived (429 `queue_full` beyond `max_queue`); it hands streamed edits to the API
core (they become jobs); it tags each request with an id and the
base URL of its result URLs (see `patches.tag_request`), and marks the id in a `CancelRegistry`
when the client disconnects, so that workers skip the request when its turn comes, or stop it
after the current denoising step. The counts are an `EditsInFlight`, which a shutdown also reads
(drain.py): it waits for them to fall to 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from clarity.api import metrics, wire
from clarity.api.errors import busy, too_many_uploads
from clarity.api.http import early_error, json_error, read_body, replay_body
from clarity.api.job_routes import asks_for_stream
from clarity.serving.litserve.dispatch import JOB_SCOPE_KEY
from clarity.serving.litserve.patches import tag_request


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
    """The edit requests one HTTP process holds, from the first byte of the body to the end of the
    answer: `uploading` (body still arriving) and `queued` (queued or running), and when the last of
    them was answered (`time.monotonic()`)."""

    def __init__(self) -> None:
        self.uploading = 0
        self.queued = 0
        self.last_answered = -math.inf

    @property
    def count(self) -> int:
        return self.uploading + self.queued

    def report(self) -> None:
        """Hand the counts to the metrics, after each change."""
        metrics.record_edits_held(self.queued, self.uploading)


class QueueBound:
    """ASGI middleware for the edits route: at most `max_uploads` bodies read at once, then a streamed edit
    (`stream=true`) handed to `streamed`, and any other request tagged and held in the queue, at most
    `max_queue` of them (queued or running).

    A request takes a queue slot only when its whole body is in: clients that send headers and a
    few bytes, then stall, hold upload places (each for at most the upload timeout), never the
    queue. Both limits are answered 429 with Retry-After, which the SDKs follow. A streamed edit
    takes no slot: it becomes a job, whose run (the job runner's request, marked in its scope by
    `dispatch.JOB_SCOPE_KEY`) takes one like any edit.
    """

    def __init__(
        self, app: ASGIApp, *, max_queue: int, max_uploads: int, cancellations: CancelRegistry,
        base_url: Callable[[Scope], str], in_flight: EditsInFlight, streamed: ASGIApp | None = None,
    ) -> None:
        self.app = app
        self.max_queue = max_queue
        self.max_uploads = max_uploads
        self.cancellations = cancellations
        self.base_url = base_url
        self.in_flight = in_flight
        self.streamed = streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != wire.EDITS_PATH:
            await self.app(scope, receive, send)
            return
        in_flight = self.in_flight
        if in_flight.uploading >= self.max_uploads:
            await json_error(too_many_uploads(in_flight.uploading))(scope, receive, send)
            return
        received_at = time.time()
        # Single-threaded event loop: a check and the increment after it cannot interleave.
        in_flight.uploading += 1
        in_flight.report()
        try:
            body = await read_body(receive)
        except HTTPException as error:  # the guard's limits, raised from its receive
            await early_error(error)(scope, receive, send)
            return
        finally:
            in_flight.uploading -= 1
            in_flight.report()
        if body is None:  # the client left during the upload
            return
        replay = replay_body(body, receive)
        job_id = scope.get(JOB_SCOPE_KEY)
        if self.streamed is not None and job_id is None and asks_for_stream(scope, body):
            await self.streamed(scope, replay, send)
            return
        if in_flight.queued >= self.max_queue:
            message = f"The server is busy: {in_flight.queued} requests are already queued or running; retry later."
            await json_error(busy(message, "queue_full"))(scope, replay, send)
            return
        in_flight.queued += 1
        in_flight.report()
        try:
            tags = tag_request(scope, replay, send, self.base_url(scope), self.cancellations.cancel,
                               job_id=job_id, received_at=received_at)
            async with tags as (request_id, tagged):
                try:
                    await self.app(*tagged)
                finally:
                    # By now the worker has answered (or given up on) the request.
                    self.cancellations.forget(request_id)
        finally:
            in_flight.queued -= 1
            in_flight.last_answered = time.monotonic()
            in_flight.report()
