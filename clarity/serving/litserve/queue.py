"""Stopping the work of clients that hung up, queued or running.

LitServe 0.2.19 cannot withdraw a queued request, and a worker never learns which HTTP request
a form came from, nor that its client has gone. So the HTTP process tags each edits request:
`tag_request` puts a form field holding a fresh id in front of the multipart body (the form
is parsed after this middleware, in the HTTP process, and reaches the worker whole), then
watches the connection; when the client disconnects before its answer is sent, the id is
marked in a `CancelRegistry`, a folder of marker files that every worker process sees.
Workers skip a marked request when its turn comes and stop a running one after its current
denoising step.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from python_multipart.multipart import parse_options_header
from starlette.types import Message, Receive, Scope, Send

#: The form field carrying the id. It always comes first (it is prepended); a client sending
#: a field of this name gets the usual "unknown parameter" error for it.
REQUEST_ID_FIELD = "clarity_request_id"


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


@contextlib.asynccontextmanager
async def tag_request(
    scope: Scope, receive: Receive, send: Send, registry: CancelRegistry
) -> AsyncIterator[tuple[Scope, Receive, Send]]:
    """(scope, receive, send) for the app: the body carries a request id, and a disconnect cancels it.

    The id is also sent back in the response's `x-request-id` header, so a client can quote it
    and an operator find the request's log lines.

    `scope` must be a multipart/form-data request with a boundary. The id is forgotten once
    the app returns, by which time the worker has answered (or given up on) the request.
    """
    _, options = parse_options_header(dict(scope["headers"]).get(b"content-type", b""))
    boundary = options[b"boundary"]
    request_id = f"req_{secrets.token_hex(16)}"  # OpenAI's shape; also a safe file name for the registry
    prefix = (
        b"--" + boundary + b"\r\n"
        + f'Content-Disposition: form-data; name="{REQUEST_ID_FIELD}"\r\n\r\n{request_id}\r\n'.encode()
    )
    headers = [
        (name, str(int(value) + len(prefix)).encode() if name.lower() == b"content-length" else value)
        for name, value in scope["headers"]
    ]
    answered = False
    body_done = False
    disconnected: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        # After the body, the server's next message for this request is the disconnect: sent
        # when the client goes, or once the response is complete.
        message = await receive()
        if message["type"] == "http.disconnect" and not answered:
            registry.cancel(request_id)
        disconnected.set_result(message)

    prefix_sent = False

    async def tagged_receive() -> Message:
        nonlocal prefix_sent, body_done, watcher
        if body_done:
            return await asyncio.shield(disconnected)  # only the watcher reads the real channel
        if not prefix_sent:
            prefix_sent = True
            return {"type": "http.request", "body": prefix, "more_body": True}
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            body_done = True
            watcher = asyncio.create_task(watch(), name=f"clarity-disconnect-watch-{request_id[:8]}")
        return message

    async def watched_send(message: Message) -> None:
        nonlocal answered
        if message["type"] == "http.response.start":
            answered = True
            # The id the worker logs under; the OpenAI SDKs expose it as `response._request_id`.
            message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
        await send(message)

    try:
        yield {**scope, "headers": headers}, tagged_receive, watched_send
    finally:
        if watcher is not None:
            watcher.cancel()
        registry.forget(request_id)
