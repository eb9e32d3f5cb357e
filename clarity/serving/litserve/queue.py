"""The edits queue of one HTTP process: bounded, and emptied of requests whose clients left.

LitServe has no queue limit and cannot withdraw a queued request. `QueueBound` counts the edit
requests this process holds (from the first byte of the body to the answer) and answers 429
`queue_full` beyond `max_queue`, before an upload is buffered; it tags each request with an id
and the base URL of its result URLs (see `patches.tag_request`), and marks the id in a
`CancelRegistry` when the client disconnects, so that workers skip the request when its turn
comes, or stop it after the current denoising step.
"""

from __future__ import annotations

from collections.abc import Callable
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


class QueueBound:
    """ASGI middleware for the edits route: at most `max_queue` requests held, each one tagged."""

    def __init__(
        self, app: ASGIApp, *, max_queue: int, cancellations: CancelRegistry, base_url: Callable[[Scope], str]
    ) -> None:
        self.app = app
        self.max_queue = max_queue
        self.cancellations = cancellations
        self.base_url = base_url
        self.pending = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != wire.EDITS_PATH:
            await self.app(scope, receive, send)
            return
        if self.pending >= self.max_queue:
            message = f"The server is busy: {self.pending} requests are already queued or running; retry later."
            refusal = APIError(429, message, code="queue_full", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)})
            await json_error(refusal)(scope, receive, send)
            return
        # Single-threaded event loop: the check above and this increment cannot interleave.
        self.pending += 1
        try:
            tags = tag_request(scope, receive, send, self.base_url(scope), self.cancellations.cancel)
            async with tags as (request_id, tagged):
                try:
                    await self.app(*tagged)
                finally:
                    # By now the worker has answered (or given up on) the request.
                    self.cancellations.forget(request_id)
        finally:
            self.pending -= 1
