"""What travels between the ingress (or the job runner) and an upscaler replica, and how Ray's own failures
are answered.

An edit crosses as an `EditCall`: the multipart body as the client sent it (or as a job stored it) and
what the handler needs to know of the HTTP request. The replica parses it with the API core's
`EditHandler`, so a form is read by one parser whatever the runtime, and answers an `Answer` (status,
OpenAI-shaped body, headers): expected failures are values, not exceptions, so nothing of them is lost
crossing processes. What Ray raises instead is answered here, once for the ingress and the job runner:

    BackPressureError (the queue is full)              -> 429 queue_full, Retry-After
    RayActorError, ReplicaUnavailableError (the replica
      or its node died while it held the edit)         -> 503 worker_restarted, Retry-After (the SDKs retry)
    DeploymentUnavailableError (it failed to deploy)   -> 503 upscaler_unavailable, Retry-After
    RayTaskError (a bug: the replica raised)           -> 500, x-should-retry: false
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import MultipartParseError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message

from clarity.api.errors import ENGINE_FAILURE, APIError, busy
from clarity.api.http import replay_body

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class EditCall:
    """One edit for an upscaler replica: its multipart form, and where and when it came from.

    `request_id` names it in the logs (the `x-request-id` the client is answered with); `base_url` is how
    the client reached the server (url-mode results point there); `received_at` (`time.time()`) when its
    body was in; `job_id` the job it runs, if any (the replica reports progress to the job store).
    """

    body: bytes
    content_type: str
    request_id: str
    base_url: str
    received_at: float
    job_id: str | None = None


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, JSON body (OpenAI's shapes) and headers (retry advice)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, error: APIError) -> Answer:
        return cls(error.status, error.body, error.headers)


async def read_form(call: EditCall) -> FormData:
    """The call's multipart form, parsed by Starlette as any route would (files spooled, not held twice);
    a 400 `invalid_body` if it cannot be read. The caller closes it."""

    async def nothing_more() -> Message:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", call.content_type.encode("latin-1"))]}
    try:
        return await Request(scope, replay_body(call.body, nothing_more)).form()
    except (MultiPartException, MultipartParseError) as error:
        raise APIError(400, f"The multipart body could not be read: {error}", code="invalid_body") from None


def queue_full(error: BackPressureError) -> APIError:
    logger.info("edit refused: %s", error)
    return busy("The server is busy: every upscaler replica is busy and the queue is full; retry later.", "queue_full")


def worker_restarted() -> APIError:
    """A 503 the SDKs retry: the replica running the edit, or its node, is gone; another can run it."""
    return APIError(503, "The upscaler replica running this request stopped (its process or node died); retry"
                         " shortly.", code="worker_restarted")


async def call_upscaler(upscaler: DeploymentHandle, call: EditCall) -> Answer:
    """Run `call` on a replica of the upscaler deployment; Ray's failures answered as the module says.

    Cancelling the caller (the client disconnected) cancels the replica's work: Ray raises
    `CancelledError` there, and the replica stops after its current denoising step.
    """
    try:
        return await upscaler.edit.remote(call)
    except BackPressureError as error:
        return Answer.of(queue_full(error))
    except (RayActorError, ReplicaUnavailableError) as error:
        logger.warning("request %s: its upscaler replica died: %s", call.request_id, error)
        return Answer.of(worker_restarted())
    except DeploymentUnavailableError as error:
        logger.error("request %s: %s", call.request_id, error.message)
        return Answer.of(APIError(503, "The upscaler is not available: it failed to deploy; see the server log.",
                                  code="upscaler_unavailable"))
    except RayTaskError:
        logger.exception("request %s failed in its upscaler replica", call.request_id)
        return Answer.of(APIError(500, ENGINE_FAILURE))
