"""Errors in OpenAI's shape, and the one table from Clarity's errors to HTTP answers.

The SDKs read `{"error": {"message", "type", "param", "code"}}` into typed exceptions, choose
the exception class by status, and retry 408/409/429/5xx unless told `x-should-retry: false`.
Every runtime answers through `APIError`, so status, shape and retry advice are decided here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from clarity.errors import ClarityError, ContentPolicyError, ParamError, WeightsError

#: OpenAI's error `type` for each status Clarity returns.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "server_error",
    507: "server_error",
}
#: Seconds a client is told to wait before retrying what may succeed later (503, 504 in the queue).
RETRY_AFTER_SECONDS = 5
#: The status logged for work stopped because its client left (nginx's "client closed request");
#: nobody is there to receive it.
CLIENT_GONE_STATUS = 499
#: What a client hears when the upscale failed on the server; the details stay in the server log.
ENGINE_FAILURE = "The upscale failed on the server."


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape, which the SDKs parse into typed exceptions."""
    error_type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def retry_headers(status: int, code: str | None) -> dict[str, str]:
    """The retry advice the SDKs follow, for an error answer of `status`.

    They retry 5xx twice by default: worth it for a busy or restarting server (503, a 504 in
    the queue), not for an upscale that failed or ran over the compute limit (it would again,
    at the same cost).
    """
    if status < 500:
        return {}
    if status in (503, 504) and code != "compute_timeout":
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
    return {"x-should-retry": "false"}


class APIError(Exception):
    """An error to send to the client as `status` with an OpenAI-shaped `body`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(status, message, param=param, code=code)
        self.headers = {**retry_headers(status, code), **(headers or {})}


#: Seconds a client is told to wait before retrying a busy server (a full queue, too many uploads).
BUSY_RETRY_AFTER_SECONDS = 10


def busy(message: str, code: str) -> APIError:
    """A 429 with `Retry-After`, which the SDKs follow: the server is at one of its limits."""
    return APIError(429, message, code=code, headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})


def too_many_uploads(uploading: int) -> APIError:
    """A 429 `too_many_uploads`: `uploading` request bodies are being received already (`--max-uploads`)."""
    return busy(f"The server is busy receiving {uploading} other uploads; retry later.", "too_many_uploads")


def queue_timeout(waited: float, limit: float) -> APIError:
    """A 504 `queue_timeout`: the request waited `waited` seconds for a free worker, more than `limit`
    (`--queue-timeout`). Retried by the SDKs and by the job runner: the work was never started."""
    return APIError(504, f"The request waited {waited:.0f} s for a free worker, more than this server's limit of"
                         f" {limit:g} s; retry later.", code="queue_timeout")


def storage_unavailable() -> APIError:
    """A 503 `storage_unavailable` (with Retry-After): url mode's result store cannot be reached. What failed, and
    where (the endpoint), is for the server's log, not the answer."""
    return APIError(503, "The server's storage for url-mode results is unavailable; retry later, or ask for"
                         " response_format=b64_json.", code="storage_unavailable")


def shutting_down(message: str) -> APIError:
    """A 503 `shutting_down`: the server is stopping. Its `Retry-After` sends the SDKs back shortly,
    by when another instance (or this one, restarted) can answer."""
    return APIError(503, message, code="shutting_down")


def invalid(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 naming the offending field."""
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str, available: Iterable[str], param: str = "model") -> APIError:
    served = ", ".join(f"`{model_id}`" for model_id in available)
    shown = name if len(name) <= 40 else f"{name[:40]}..."  # never a whole hostile value
    return APIError(
        404,
        f"The model `{shown}` does not exist or you do not have access to it. This server serves {served}.",
        param=param,
        code="model_not_found",
    )


def api_error(error: ClarityError) -> APIError:
    """The HTTP answer for each of Clarity's errors: this table, and no `except` order, decides it.

    A `WeightsError` during a request means the server's files are broken (a LoRA named in the
    prompt that does not load): a 500 whose message holds no server paths.
    """
    if isinstance(error, ParamError):
        return invalid(error.param, str(error))
    if isinstance(error, ContentPolicyError):
        # OpenAI's answer when its safety system rejects a request.
        return APIError(400, error.message, code="content_policy_violation")
    if isinstance(error, WeightsError):
        return APIError(500, ENGINE_FAILURE)
    raise TypeError(f"no HTTP answer defined for {type(error).__name__}")
