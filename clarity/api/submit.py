"""A submitted form made into a stored job: validated as an edit, its own fields split off, made
safe to retry with an idempotency key, and re-encoded as the edit form the runner will send.

Shared by `POST /v1/jobs` (kind `job`) and streamed edits (`stream=true`, kind `stream`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import Scope

from clarity.api.errors import APIError, invalid
from clarity.api.handler import EditHandler
from clarity.api.jobs import IdempotencyConflict, Job, JobKind, JobsFull, JobStore, NewJob
from clarity.api.webhooks import WebhookSender
from clarity.errors import ParamError

#: A job's own form fields (the rest is the edit it runs).
WEBHOOK_URL_FIELD = "webhook_url"
WEBHOOK_EVENTS_FIELD = "webhook_events"
JOB_FIELDS = (WEBHOOK_URL_FIELD, WEBHOOK_EVENTS_FIELD)
#: Fields of a streamed edit that the run itself does not take (the job keeps `partial_images`).
STREAM_FIELDS = ("stream", "partial_images")
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Longest idempotency key accepted (Stripe's limit).
MAX_IDEMPOTENCY_KEY = 255


class JobSubmitter:
    """Stores forms as jobs of `store` after `handler` accepted them as edits; `wake()` tells the runner.

    `base_url(scope)` is how the client reached the server (its url-mode results point there);
    `webhooks` checks a job's webhook fields (and refuses them if the server sends none).
    """

    def __init__(self, handler: EditHandler, store: JobStore, wake: Callable[[], None],
                 base_url: Callable[[Scope], str], webhooks: WebhookSender) -> None:
        self.handler = handler
        self.store = store
        self.wake = wake
        self.base_url = base_url
        self.webhooks = webhooks

    async def submit(self, request: Request, kind: JobKind) -> tuple[Job, bool]:
        """The job for `request`'s form, and whether it is new (False: the idempotency key's earlier job).
        Every refusal is an `APIError` naming the field or header."""
        key = _idempotency_key(request)
        try:
            form = await request.form()
        except StarletteHTTPException as error:  # a malformed multipart body, as the form parser reports it
            raise APIError(400, str(error.detail), code="invalid_body") from None
        items = list(form.multi_items())
        own = {name: value for name, value in items if name in JOB_FIELDS} if kind == "job" else {}
        edit_items = [(name, value) for name, value in items if name not in own]
        edit = await run_in_threadpool(self.handler.parse, edit_items)
        if kind == "job" and edit.stream:
            raise invalid("stream", "a job is not streamed: poll GET /v1/jobs/{id} or name a webhook_url;"
                          " to stream, send the edit to /v1/images/edits")
        try:
            webhook = await self.webhooks.check(_text(own.get(WEBHOOK_URL_FIELD)), _text(own.get(WEBHOOK_EVENTS_FIELD)))
        except ParamError as error:
            raise invalid(error.param, str(error)) from None
        values = await _read_form(items)
        run_items = [(name, value) for name, value in values if name not in own and name not in STREAM_FIELDS]
        if edit.stream and not any(name == "response_format" for name, _ in run_items):
            run_items.append(("response_format", edit.response_format))  # a stream's default differs
        body, content_type = _encode_form(run_items)
        new = NewJob(
            kind=kind, body=body, content_type=content_type, model=edit.model or self.handler.catalogue.default_model,
            base_url=self.base_url(request.scope), partial_images=edit.partial_images if edit.stream else 0,
            idempotency_key=key, request_hash=_content_hash(values) if key else None,
            webhook_url=webhook.url if webhook else None, webhook_events=webhook.events if webhook else (),
        )
        try:
            job, created = await run_in_threadpool(self.store.create, new)
        except JobsFull as full:
            raise APIError(429, str(full), param=full.limit, code="too_many_jobs",
                           headers={"Retry-After": "60"}) from None
        except IdempotencyConflict:
            message = (f"The {IDEMPOTENCY_HEADER} was used before with another request; send a new key for a"
                       " new request.")
            raise APIError(409, message, param=IDEMPOTENCY_HEADER, code="idempotency_conflict",
                           headers={"x-should-retry": "false"}) from None
        if created:
            self.wake()
        return job, created


def _text(value: Any) -> str | None:
    """A form field that must be text: a file there is refused as the field's mistake."""
    if value is None or isinstance(value, str):
        return value
    raise invalid(getattr(value, "name", None) or "webhook_url", "a webhook field must be text, not a file")


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY or not key.isascii():
        raise invalid(IDEMPOTENCY_HEADER, f"{IDEMPOTENCY_HEADER} must be 1-{MAX_IDEMPOTENCY_KEY} ASCII characters")
    return key


#: A form field as stored: text, or an uploaded file's (filename, content, content type).
FormValue = str | tuple[str, bytes, str]


async def _read_form(items: list[tuple[str, Any]]) -> list[tuple[str, FormValue]]:
    """`items` with each uploaded file read once, for the encoding and the hash."""
    values: list[tuple[str, FormValue]] = []
    for name, value in items:
        if isinstance(value, str):
            values.append((name, value))
        else:
            await value.seek(0)
            values.append((name, (value.filename or "upload", await value.read(),
                                  value.content_type or "application/octet-stream")))
    return values


def _encode_form(items: list[tuple[str, FormValue]]) -> tuple[bytes, str]:
    """`items` as a multipart/form-data body, and its Content-Type: httpx's encoder, the one the OpenAI SDKs
    send with."""
    data = {name: value for name, value in items if isinstance(value, str)}
    files = [(name, value) for name, value in items if not isinstance(value, str)]
    request = httpx.Request("POST", "http://clarity.invalid", data=data, files=files)
    return request.read(), request.headers["content-type"]


def _content_hash(items: list[tuple[str, FormValue]]) -> str:
    """What makes two submissions the same request: their fields and files, not the multipart boundary
    (an SDK retry draws a new one) nor the order of the fields."""
    parts = []
    for name, value in items:
        content = value.encode() if isinstance(value, str) else value[1]
        parts.append(hashlib.sha256(name.encode() + b"\0" + content).hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()
