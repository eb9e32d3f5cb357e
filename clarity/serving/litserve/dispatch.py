"""How a job runs on this runtime: its edit form sent through the server's own app, in-process.

The job runner (API core) needs one call, `execute(job) -> (status, body)`. Here it is the app's
`POST /v1/images/edits` called through httpx's ASGI transport, in the HTTP process, with no socket:
a job's edit meets the same key check, queue bound, workers, deadlines and restarts as a client's,
and LitServe is used only through its public route. The request's scope carries the job's id
(`JOB_SCOPE_KEY`), which no HTTP client can set; `QueueBound` passes it to the worker as a tag.
"""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from clarity.api import wire
from clarity.api.errors import error_body
from clarity.api.jobs import JobInput
from clarity.api.runner import Execute

#: The ASGI scope key naming the job a request runs.
JOB_SCOPE_KEY = "clarity.job_id"


def in_process_executor(app: ASGIApp, api_key: str | None) -> Execute:
    """`execute` for the job runner: each job's form posted to `app`'s edits route, as its submitter's URL."""

    async def execute(job: JobInput) -> tuple[int, dict[str, Any]]:
        async def app_for_job(scope: Scope, receive: Receive, send: Send) -> None:
            await app({**scope, JOB_SCOPE_KEY: job.id}, receive, send)

        headers = {"content-type": job.content_type}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        # The submitter's base URL as the request's: url-mode results point where the client came from.
        transport = httpx.ASGITransport(app=app_for_job, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=job.base_url, timeout=None) as client:
            response = await client.post(wire.EDITS_PATH, content=job.body, headers=headers)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, error_body(response.status_code, response.text[:200] or "No answer.")

    return execute
