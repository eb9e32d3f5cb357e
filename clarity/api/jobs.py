"""Async jobs: their states, and where they are kept (SQLite in the server's data folder by default).

    queued ──> running ──> succeeded | failed | cancelled      (the terminal states)
       └────────────────────────────────────────> cancelled

A job holds the edit form it was submitted with (re-encoded, without the job's own fields) until it
finishes, then its result (the edit's `ImagesResponse`) or error until it expires. Every process of
one machine shares the store through its file: the HTTP process submits, dispatches and records
results; a worker marks its job running, reports progress and partial images, and reads whether it
was cancelled. A streamed edit (`stream=true`) is a job of kind `stream`: it runs the same way, but
dies with its connection (cancelled when the client goes, failed when the server restarts under it).

`JobStore` is the interface; `sqlite_jobs.SQLiteJobStore` the embedded one. A cluster can implement
the same methods on a shared database.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["job", "stream"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
#: The error a job gets when a server restarted under its stream (its client is gone with the connection).
STREAM_LOST = {"message": "The server restarted while this streamed edit ran.", "type": "server_error",
               "param": None, "code": "server_restarted"}


class JobsFull(Exception):
    """The store holds as many jobs, or bytes, as it may: `limit` names the server option."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rebuilt from its own arguments (the default would pass the message alone): a store shared
        # across processes (a Ray actor) raises it in one and its caller catches it in another.
        return type(self), (self.limit, str(self))


class IdempotencyConflict(Exception):
    """The idempotency key was used before with another request body."""


class JobNotFound(LookupError):
    pass


class WrongState(Exception):
    """The job is not in a state that allows the operation (cancel a finished job, delete a running one)."""

    def __init__(self, job: Job, message: str) -> None:
        super().__init__(message)
        self.job = job

    def __reduce__(self) -> tuple[type, tuple[Job, str]]:
        return type(self), (self.job, str(self))  # picklable, as `JobsFull`


@dataclass(frozen=True)
class NewJob:
    """What a submission stores: the edit form to run and how to report on it."""

    kind: JobKind
    body: bytes  # a multipart/form-data body of edit fields (wire.parse_edit_form reads it)
    content_type: str  # its Content-Type, boundary included
    model: str
    base_url: str  # how the client reached the server: where its url-mode results point
    partial_images: int = 0  # previews to record while it runs (streamed edits)
    idempotency_key: str | None = None
    request_hash: str | None = None  # of the form's content, to tell a retry from another request
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """A job as the API shows it (see `to_dict`), plus what the runner needs."""

    id: str
    number: int  # submission order
    kind: JobKind
    status: JobStatus
    model: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    progress: float
    attempts: int
    cancel_requested: bool
    partial_images: int
    base_url: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    webhook_url: str | None
    webhook_events: tuple[str, ...]
    queue_position: int | None = None  # how many queued jobs run before it, when queued

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left, from the time it has run and the share done; None until something is done."""
        if self.status != "running" or self.started_at is None or self.progress <= 0:
            return None
        elapsed = (now or time.time()) - self.started_at
        return round(max(elapsed * (1 - self.progress) / self.progress, 0.0), 1)

    def to_dict(self) -> dict[str, Any]:
        """The job resource of the HTTP API (`GET /v1/jobs/{id}`)."""
        return {
            "id": self.id,
            "object": "job",
            "status": self.status,
            "model": self.model,
            "created_at": int(self.created_at),
            "started_at": _int_or_none(self.started_at),
            "finished_at": _int_or_none(self.finished_at),
            "expires_at": _int_or_none(self.expires_at),
            "queue_position": self.queue_position,
            "progress": round(self.progress, 4),
            "eta_seconds": self.eta_seconds(),
            "attempts": self.attempts,
            "cancel_requested": self.cancel_requested,
            "result": self.result,
            "error": self.error,
            "webhook": {"url": self.webhook_url, "events": list(self.webhook_events)} if self.webhook_url else None,
        }


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class JobInput:
    """What the runner sends to be run: a job's form."""

    id: str
    body: bytes
    content_type: str
    base_url: str


@dataclass(frozen=True)
class JobEvent:
    """Something a running job produced for its watchers: a partial image (its payload), in order."""

    seq: int
    type: str
    payload: dict[str, Any] = field(default_factory=dict)


class JobStore(Protocol):
    """Where jobs live; every method is safe to call from any process of the server."""

    def create(self, new: NewJob) -> tuple[Job, bool]: ...
    def get(self, job_id: str) -> Job | None: ...
    def list(self, limit: int, after: str | None = None) -> tuple[list[Job], bool]: ...
    def claim_next(self) -> JobInput | None: ...
    def mark_running(self, job_id: str) -> bool: ...
    def report_progress(self, job_id: str, fraction: float) -> None: ...
    def add_event(self, job_id: str, type: str, payload: dict[str, Any]) -> None: ...
    def events_after(self, job_id: str, seq: int) -> list[JobEvent]: ...
    def finish(self, job_id: str, status: JobStatus, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> Job | None: ...
    def due_webhooks(self, limit: int = 100) -> list[Job]: ...
    def webhook_sent(self, job_id: str) -> None: ...
    def requeue(self, job_id: str, count_attempt: bool = False) -> None: ...
    def cancel(self, job_id: str) -> Job: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def delete(self, job_id: str) -> None: ...
    def recover(self) -> tuple[int, int]: ...
    def purge_expired(self) -> int: ...
    def counts(self) -> dict[str, int]: ...


def cancelled_error() -> dict[str, Any]:
    """The `error` of a cancelled job."""
    return {"message": "The job was cancelled.", "type": "invalid_request_error", "param": None, "code": "cancelled"}
