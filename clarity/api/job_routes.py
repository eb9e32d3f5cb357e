"""The HTTP face of jobs: `/v1/jobs` (submit, list, get, cancel, delete), and streamed edits.

    POST   /v1/jobs                 the edit form (+ webhook_url, webhook_events) -> 202 job
    GET    /v1/jobs?limit=&after=   newest first, OpenAI's list shape
    GET    /v1/jobs/{job_id}        status, queue position, progress and ETA, result or error
    POST   /v1/jobs/{job_id}/cancel a queued or running job
    DELETE /v1/jobs/{job_id}        a finished job and its result

A streamed edit (`POST /v1/images/edits` with `stream=true`) is a job too: `StreamedEdits` submits
it and relays what its worker records as Server-Sent Events in OpenAI's shapes (wire.py). A runtime
hands it the requests whose form says `stream=true`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from clarity.api import wire
from clarity.api.errors import APIError, invalid
from clarity.api.http import json_error, multipart_boundary, text_field
from clarity.api.jobs import JobNotFound, JobStore, WrongState
from clarity.api.submit import JobSubmitter
from clarity.errors import ParamError
from clarity.params import parse_bool

logger = logging.getLogger(__name__)

JOBS_PATH = "/v1/jobs"
#: Jobs per page of `GET /v1/jobs`: the default and the most.
DEFAULT_PAGE, MAX_PAGE = 20, 100
#: Seconds between two looks at a streamed job's store entries.
STREAM_POLL_SECONDS = 0.2
#: A stream with nothing to say sends a comment this often, so that no client or proxy times out.
KEEPALIVE_SECONDS = 15.0
#: A running edit's progress is sent as a comment (`: progress 0.420`) each time it grows by this much.
PROGRESS_COMMENT_STEP = 0.01
#: Headers of an event stream: not cached, not buffered by proxies (nginx reads X-Accel-Buffering).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def job_not_found(job_id: str) -> APIError:
    shown = job_id if len(job_id) <= 40 else f"{job_id[:40]}..."
    message = f"No job {shown}; finished jobs are removed when they expire."
    return APIError(404, message, param="job_id", code="job_not_found")


def wrong_state(error: WrongState, code: str) -> APIError:
    # 409 is retried by the SDKs; the state will not change by retrying.
    return APIError(409, str(error), param="job_id", code=code, headers={"x-should-retry": "false"})


def add_job_routes(app: FastAPI, submitter: JobSubmitter, store: JobStore) -> None:
    """The `/v1/jobs` routes (they need the key, like every route but the open ones)."""

    @app.post(JOBS_PATH, status_code=202)
    async def submit_job(request: Request) -> Response:
        try:
            job, created = await submitter.submit(request, kind="job")
        except APIError as error:
            return json_error(error)
        headers = {"Location": f"{JOBS_PATH}/{job.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(job.to_dict(), status_code=202 if created else 200, headers=headers)

    @app.get(JOBS_PATH)
    async def list_jobs(limit: str = str(DEFAULT_PAGE), after: str | None = None) -> Response:
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE:
            return json_error(invalid("limit", f"limit must be a whole number from 1 to {MAX_PAGE}"))
        try:
            jobs, has_more = store.list(int(limit), after)
        except JobNotFound:
            return json_error(invalid("after", "after must be the id of a job on an earlier page"))
        data = [job.to_dict() for job in jobs]
        return JSONResponse({"object": "list", "data": data, "has_more": has_more,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    @app.get(JOBS_PATH + "/{job_id}")
    async def get_job(job_id: str) -> Response:
        job = store.get(job_id)
        return json_error(job_not_found(job_id)) if job is None else JSONResponse(job.to_dict())

    @app.post(JOBS_PATH + "/{job_id}/cancel")
    async def cancel_job(job_id: str) -> Response:
        try:
            return JSONResponse(store.cancel(job_id).to_dict())
        except JobNotFound:
            return json_error(job_not_found(job_id))
        except WrongState as error:
            return json_error(wrong_state(error, "job_finished"))

    @app.delete(JOBS_PATH + "/{job_id}")
    async def delete_job(job_id: str) -> Response:
        try:
            store.delete(job_id)
        except JobNotFound:
            return json_error(job_not_found(job_id))
        except WrongState as error:
            return json_error(wrong_state(error, "job_not_finished"))
        return JSONResponse({"id": job_id, "object": "job.deleted", "deleted": True})


def asks_for_stream(scope: Scope, body: bytes) -> bool:
    """Whether an edit's multipart `body` says `stream=true`: a runtime hands such requests to `StreamedEdits`."""
    boundary = multipart_boundary(dict(scope["headers"]).get(b"content-type", b""))
    value = text_field(body, boundary, "stream") if boundary else None
    try:
        return value is not None and parse_bool("stream", value)
    except ParamError:  # the edit's own parsing names the field
        return False


class StreamedEdits:
    """ASGI app for an edit with `stream=true`: a job of kind `stream`, its events relayed as they come.

    Refusals before the work starts are plain JSON errors; once the stream has started, the end is an
    `image_edit.completed` per image or one `error` event. Between them, comment lines (which the SDKs
    skip): `: progress <fraction>` as the work advances, `: keep-alive` when there is nothing else to
    say for `KEEPALIVE_SECONDS`. A client that disconnects cancels the job.
    """

    def __init__(self, submitter: JobSubmitter, store: JobStore) -> None:
        self.submitter = submitter
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            job, _ = await self.submitter.submit(Request(scope, receive), kind="stream")
        except APIError as error:
            await json_error(error)(scope, receive, send)
            return
        response = StreamingResponse(self._events(job.id), media_type="text/event-stream", headers=STREAM_HEADERS)
        await response(scope, receive, send)

    async def _events(self, job_id: str) -> AsyncIterator[bytes]:
        yield wire.sse_comment("queued")  # the headers and a first line at once: no client waits for them
        seen, last_sent, progress = 0, time.monotonic(), 0.0
        try:
            while True:
                # The state first: every preview recorded before the job ended is then sent before its end.
                job = self.store.get(job_id)
                for event in self.store.events_after(job_id, seen):
                    seen = event.seq
                    yield wire.sse(wire.PARTIAL_IMAGE_EVENT, wire.partial_image_event(event.payload))
                    last_sent = time.monotonic()
                if job is None or job.finished:
                    break
                if job.progress - progress >= PROGRESS_COMMENT_STEP:
                    progress = job.progress
                    yield wire.sse_comment(f"progress {progress:.3f}")
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
                    yield wire.sse_comment("keep-alive")
                    last_sent = time.monotonic()
                await asyncio.sleep(STREAM_POLL_SECONDS)
            if job is not None and job.status == "succeeded":
                for completed in wire.completed_events(job.result):
                    yield wire.sse(wire.COMPLETED_EVENT, completed)
            else:
                error = job.error if job is not None else job_not_found(job_id).body["error"]
                yield wire.sse("error", wire.error_event({"error": error}))
        finally:
            self._let_go(job_id)

    def _let_go(self, job_id: str) -> None:
        """The stream ended: a finished job is deleted (its client has the result), an unfinished one (the
        client left) is cancelled, and deleted when it expires."""
        job = self.store.get(job_id)
        if job is None:
            return
        if job.finished:
            self.store.delete(job_id)
            return
        logger.info("streamed edit %s: the client left; cancelling its job", job_id)
        try:
            self.store.cancel(job_id)
        except (JobNotFound, WrongState):  # it ended meanwhile
            pass
