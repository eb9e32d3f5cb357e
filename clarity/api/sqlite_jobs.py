"""The embedded job store: jobs, their forms, results and events in one SQLite file.

The default `JobStore` (jobs.py) of a server on one machine: every process of it opens the same file
in the data folder, which survives restarts (SQLite's WAL mode, synchronous writes).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clarity.api.config import ServerConfig
from clarity.api.jobs import (
    JOB_STATUSES,
    STREAM_LOST,
    IdempotencyConflict,
    Job,
    JobEvent,
    JobInput,
    JobNotFound,
    JobsFull,
    JobStatus,
    NewJob,
    WrongState,
    cancelled_error,
)

#: The job store's file in a server's data folder.
JOBS_FILE = "jobs.sqlite3"


def open_job_store(config: ServerConfig) -> SQLiteJobStore:
    """A server's job store: `JOBS_FILE` in its data folder, under its limits."""
    return SQLiteJobStore(config.data_path / JOBS_FILE, config.job_ttl_seconds, config.max_jobs,
                          config.max_job_bytes)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    base_url TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    progress REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    dispatched INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    partial_images INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    webhook_url TEXT,
    webhook_events TEXT NOT NULL DEFAULT '',
    webhook_due INTEGER NOT NULL DEFAULT 0,
    body BLOB,
    content_type TEXT,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, number);
CREATE INDEX IF NOT EXISTS jobs_webhook_due ON jobs (number) WHERE webhook_due = 1;
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""
_COLUMNS = ("id, number, kind, status, model, created_at, started_at, finished_at, expires_at, progress, attempts,"
            " cancel_requested, partial_images, base_url, result, error, webhook_url, webhook_events")


class SQLiteJobStore:
    """Jobs in one SQLite file (WAL mode: readers never wait for the one writer).

    Pickles as its settings: each process (and thread) opens its own connection. Limits: at most
    `max_jobs` jobs kept, and `max_bytes` of forms and results, else `JobsFull`; finished jobs
    are kept `ttl_seconds`, then `purge_expired` removes them.
    """

    def __init__(self, path: Path, ttl_seconds: float, max_jobs: int, max_bytes: int) -> None:
        self.path = Path(path)
        self.ttl_seconds = ttl_seconds
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._add_missing_columns()
        self._db().executescript(_SCHEMA)  # its own transaction

    def _add_missing_columns(self) -> None:
        """Bring a file written by an earlier version up to `_SCHEMA` (columns added since default sensibly)."""
        db = self._db()
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        if columns and "webhook_due" not in columns:  # no columns: a new file, made whole by _SCHEMA
            db.execute("ALTER TABLE jobs ADD COLUMN webhook_due INTEGER NOT NULL DEFAULT 0")

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # --- connections ---------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if getattr(self._local, "pid", None) != os.getpid():  # a forked process: never the parent's connection
            self._local.db, self._local.pid = None, os.getpid()
        db = self._local.db
        if db is None:
            # Autocommit; `_transaction` opens explicit ones. 30 s covers a writer holding the lock.
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a job reported succeeded survives a power cut
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock at once (no upgrade deadlocks)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- submitting and reading ------------------------------------------------------------------

    def create(self, new: NewJob) -> tuple[Job, bool]:
        """Store `new` as a queued job; (the job, True). With an idempotency key seen before: (that job, False)
        if its request hash is the same, else `IdempotencyConflict`. `JobsFull` past the limits."""
        with self._transaction() as db:
            if new.idempotency_key is not None:
                row = db.execute("SELECT id, request_hash FROM jobs WHERE idempotency_key = ?",
                                 (new.idempotency_key,)).fetchone()
                if row is not None:
                    if row[1] != new.request_hash:
                        raise IdempotencyConflict(new.idempotency_key)
                    return self._get(db, row[0]), False
            self._check_room(db, len(new.body))
            job_id = f"job_{secrets.token_hex(12)}"
            db.execute(
                "INSERT INTO jobs (id, kind, status, model, base_url, created_at, partial_images, idempotency_key,"
                " request_hash, webhook_url, webhook_events, body, content_type, stored_bytes)"
                " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, new.kind, new.model, new.base_url, time.time(), new.partial_images, new.idempotency_key,
                 new.request_hash, new.webhook_url, ",".join(new.webhook_events), new.body, new.content_type,
                 len(new.body)),
            )
            return self._get(db, job_id), True

    def _check_room(self, db: sqlite3.Connection, size: int) -> None:
        count, stored = db.execute("SELECT COUNT(*), COALESCE(SUM(stored_bytes), 0) FROM jobs").fetchone()
        if count >= self.max_jobs:
            raise JobsFull("max_jobs", f"The server keeps at most {self.max_jobs} jobs and holds that many;"
                           " retry when finished jobs expire, or delete some.")
        if stored + size > self.max_bytes:
            raise JobsFull("max_job_mb", f"The server keeps at most {self.max_bytes / 1e6:g} MB of job inputs"
                           " and results and has no room for this one; retry when finished jobs expire, or delete"
                           " some.")

    def get(self, job_id: str) -> Job | None:
        return self._get(self._db(), job_id)

    def _get(self, db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(db, row)

    def _job(self, db: sqlite3.Connection, row: tuple[Any, ...]) -> Job:
        (job_id, number, kind, status, model, created_at, started_at, finished_at, expires_at, progress, attempts,
         cancel_requested, partial_images, base_url, result, error, webhook_url, webhook_events) = row
        position = None
        if status == "queued":
            position = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND number < ?",
                                  (number,)).fetchone()[0]
        return Job(
            id=job_id, number=number, kind=kind, status=status, model=model, created_at=created_at,
            started_at=started_at, finished_at=finished_at, expires_at=expires_at, progress=progress,
            attempts=attempts, cancel_requested=bool(cancel_requested), partial_images=partial_images,
            base_url=base_url, result=json.loads(result) if result else None,
            error=json.loads(error) if error else None, webhook_url=webhook_url,
            webhook_events=tuple(event for event in webhook_events.split(",") if event),
            queue_position=position,
        )

    def list(self, limit: int, after: str | None = None) -> tuple[list[Job], bool]:
        """Jobs of kind `job`, newest first, starting after the job `after` (its id); and whether more follow.
        `JobNotFound` if `after` names no job."""
        db = self._db()
        start = None
        if after is not None:
            row = db.execute("SELECT number FROM jobs WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise JobNotFound(after)
            start = row[0]
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE kind = 'job' AND (? IS NULL OR number < ?)"
            " ORDER BY number DESC LIMIT ?", (start, start, limit + 1),
        ).fetchall()
        return [self._job(db, row) for row in rows[:limit]], len(rows) > limit

    # --- running ----------------------------------------------------------------------------------

    def claim_next(self) -> JobInput | None:
        """The oldest queued job not yet handed to a worker, now handed (its attempt counted); None if none."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, body, content_type, base_url FROM jobs WHERE status = 'queued' AND dispatched = 0"
                " AND cancel_requested = 0 ORDER BY number LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET dispatched = 1, attempts = attempts + 1 WHERE id = ?", (row[0],))
            return JobInput(*row)

    def mark_running(self, job_id: str) -> bool:
        """Called by the worker that starts the job; False if it was cancelled or finished meanwhile."""
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, progress = 0"
                " WHERE id = ? AND status = 'queued' AND cancel_requested = 0", (time.time(), job_id),
            ).rowcount
            return changed == 1

    def report_progress(self, job_id: str, fraction: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'", (fraction, job_id))

    def add_event(self, job_id: str, type: str, payload: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO job_events (job_id, seq, type, payload) VALUES"
                " (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = ?), ?, ?)",
                (job_id, job_id, type, json.dumps(payload)),
            )

    def events_after(self, job_id: str, seq: int) -> list[JobEvent]:
        rows = self._db().execute(
            "SELECT seq, type, payload FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq)
        ).fetchall()
        return [JobEvent(row[0], row[1], json.loads(row[2])) for row in rows]

    def finish(self, job_id: str, status: JobStatus, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> Job | None:
        """Record the end of a job that has not ended yet (the form is dropped, the result kept until it
        expires); the job, or None if it had already finished (a job ends once)."""
        now = time.time()
        result_text = json.dumps(result) if result is not None else None
        with self._transaction() as db:
            # The job's `completed` webhook, if it asked for one, is due from now until it has been sent
            # (`due_webhooks`, `webhook_sent`): a restart in between sends it then.
            changed = db.execute(
                "UPDATE jobs SET status = ?, finished_at = ?, expires_at = ?, result = ?, error = ?, body = NULL,"
                " stored_bytes = ?, progress = CASE WHEN ? = 'succeeded' THEN 1 ELSE progress END,"
                " webhook_due = (webhook_url IS NOT NULL AND instr(',' || webhook_events || ',', ',completed,') > 0)"
                " WHERE id = ? AND status NOT IN ('succeeded', 'failed', 'cancelled')",
                (status, now, now + self.ttl_seconds, result_text, json.dumps(error) if error else None,
                 len(result_text or ""), status, job_id),
            ).rowcount
            return self._get(db, job_id) if changed else None

    def due_webhooks(self, limit: int = 100) -> list[Job]:
        """Finished jobs whose `completed` webhook has not been sent yet, oldest first."""
        db = self._db()
        rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE webhook_due = 1 ORDER BY number LIMIT ?",
                          (limit,)).fetchall()
        return [self._job(db, row) for row in rows]

    def webhook_sent(self, job_id: str) -> None:
        """The job's `completed` webhook has ended (delivered, or given up for good): it is no longer due."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET webhook_due = 0 WHERE id = ?", (job_id,))

    def requeue(self, job_id: str, count_attempt: bool = False) -> None:
        """Put a job whose run was lost (its worker died, the queue was full) back in line, to run from the
        start; the dispatch counts as an attempt only if `count_attempt`."""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = 'queued', dispatched = 0, progress = 0, started_at = NULL,"
                       " attempts = attempts - ? WHERE id = ? AND status IN ('queued', 'running')",
                       (0 if count_attempt else 1, job_id))

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: at once if no worker has it, else at the worker's next check (`cancel_requested`).
        `JobNotFound`; `WrongState` if it has finished."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job is None:
                raise JobNotFound(job_id)
            if job.finished:
                raise WrongState(job, f"Job {job_id} has already {job.status}; only queued or running jobs can be"
                                 " cancelled.")
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            dispatched = db.execute("SELECT dispatched FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        if not dispatched:
            self.finish(job_id, "cancelled", error=cancelled_error())
        return self.get(job_id)  # type: ignore[return-value]  # cancelling never deletes

    def cancel_requested(self, job_id: str) -> bool:
        row = self._db().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row[0])  # a deleted job is not run either

    def delete(self, job_id: str) -> None:
        """Delete a finished job and its result; `JobNotFound`, or `WrongState` while it may still run."""
        with self._transaction() as db:
            job = self._get(db, job_id)
            if job is None:
                raise JobNotFound(job_id)
            if not job.finished:
                raise WrongState(job, f"Job {job_id} is {job.status}; cancel it first, then delete it.")
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self) -> tuple[int, int]:
        """After a restart: jobs that were queued or running run again from the start; streamed edits, whose
        clients went with the old process, fail. Returns (jobs requeued, streams failed)."""
        with self._transaction() as db:
            requeued = db.execute(
                "UPDATE jobs SET status = 'queued', dispatched = 0, progress = 0, started_at = NULL"
                " WHERE kind = 'job' AND status IN ('queued', 'running')"
            ).rowcount
            lost = [row[0] for row in db.execute(
                "SELECT id FROM jobs WHERE kind = 'stream' AND status IN ('queued', 'running')")]
        for job_id in lost:
            self.finish(job_id, "failed", error=STREAM_LOST)
        return requeued, len(lost)

    def purge_expired(self) -> int:
        """Delete finished jobs whose time is up; how many."""
        with self._transaction() as db:
            return db.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?",
                              (time.time(),)).rowcount

    def counts(self) -> dict[str, int]:
        """Jobs (of both kinds) by status, every status included."""
        rows = dict(self._db().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
        return {status: rows.get(status, 0) for status in JOB_STATUSES}
