"""The job runner: hands queued jobs to the workers, a few at a time, and records how each ended.

It runs in the HTTP process beside the routes. A runtime gives it `execute`, which runs one job's
edit form the way a client's edit runs (same queue, limits and workers) and returns the HTTP
answer; the runner turns that answer into the job's end:

    200                                     -> succeeded, with the ImagesResponse as its result
    any answer to a job cancelled meanwhile -> cancelled
    429, 503, 504 queue_timeout, 408        -> queued again (the server was busy, restarting or
                                               stopping), to run from the start
    anything else                           -> failed, with the OpenAI-shaped error

A job whose worker died `MAX_WORKER_DEATHS` times is failed rather than run again: it may be what
kills them. After a restart (`JobStore.recover`) jobs that were queued or running run again; a job
that succeeded is never run again (its end is recorded once, in one transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from clarity.api import metrics
from clarity.api.errors import error_body
from clarity.api.jobs import Job, JobInput, JobStore, cancelled_error
from clarity.api.webhooks import WebhookSender

logger = logging.getLogger(__name__)

#: `execute(job_input) -> (HTTP status, JSON body)`: one run of a job's edit form.
Execute = Callable[[JobInput], Awaitable[tuple[int, dict[str, Any]]]]
#: Seconds between two looks at the store for new jobs (a submission also wakes the runner at once).
POLL_SECONDS = 1.0
#: Seconds between two looks at a running job for its webhook events.
WATCH_SECONDS = 0.5
#: A progress webhook is sent each time this much more of the work is done.
PROGRESS_STEP = 0.1
#: Runs of one job that may end with its worker dying before the job is failed.
MAX_WORKER_DEATHS = 3
#: Seconds to wait before dispatching again after the server answered "busy" or "not ready".
BUSY_BACKOFF_SECONDS = 2.0
#: Answers that mean "not now" rather than "this job is wrong": the job waits its turn again.
_RETRYABLE = {408, 429, 503}


class JobRunner:
    """Runs the jobs of `store` through `execute`, at most `concurrency` at once.

    `stopping()` says the server is shutting down: no new job is dispatched (those in the store wait
    for the next start). `webhooks` delivers the events jobs asked for (started, progress, completed).
    """

    def __init__(
        self, store: JobStore, execute: Execute, concurrency: int, webhooks: WebhookSender | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.execute = execute
        self.concurrency = concurrency
        self.webhooks = webhooks
        self.stopping = stopping
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Jobs whose `completed` webhook is being delivered now (the store keeps it due until it ends).
        self._sending: set[str] = set()

    def wake(self) -> None:
        """A job was submitted: look for it now."""
        self._wakeup.set()

    async def run(self) -> None:
        """Recover the jobs of a previous run, then dispatch jobs until cancelled."""
        requeued, lost = self.store.recover()
        if requeued or lost:
            logger.info("jobs after restart: %d queued again, %d streamed edits failed (their clients left)",
                        requeued, lost)
        slots = asyncio.Semaphore(self.concurrency)
        webhooks = asyncio.create_task(self._send_due_webhooks_forever(), name="clarity-job-webhooks")
        try:
            while True:
                await slots.acquire()
                job_input = await self._next_job()
                task = asyncio.create_task(self._run_one(job_input), name=f"clarity-job-{job_input.id}")
                self._tasks.add(task)
                task.add_done_callback(lambda done: (self._tasks.discard(done), slots.release()))
        finally:
            webhooks.cancel()

    async def _next_job(self) -> JobInput:
        while True:
            metrics.record_jobs(self.store.counts())
            job_input = None if self.stopping() else self.store.claim_next()
            if job_input is not None:
                return job_input
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), POLL_SECONDS)

    async def _run_one(self, job_input: JobInput) -> None:
        sent: set[str] = set()  # the webhook events of this run sent so far
        watcher = asyncio.create_task(self._watch(job_input.id, sent))
        try:
            status, body = await self.execute(job_input)
        except Exception:  # the runner outlives any one job
            logger.exception("job %s: running it failed", job_input.id)
            status, body = 500, error_body(500, "The job failed on the server.")
        finally:
            watcher.cancel()
        try:
            await self._record(job_input.id, status, body, sent)
        except Exception:
            logger.exception("job %s: recording its end failed; it runs again", job_input.id)
            self.store.requeue(job_input.id, count_attempt=True)

    async def _record(self, job_id: str, status: int, body: dict[str, Any], sent: set[str]) -> None:
        job = self.store.get(job_id)
        if job is None:  # deleted while it ran
            return
        error = body.get("error") if isinstance(body.get("error"), dict) else None
        code = error.get("code") if error else None
        if status == 200:
            finished = self.store.finish(job_id, "succeeded", result=body)
        elif job.cancel_requested:
            finished = self.store.finish(job_id, "cancelled", error=cancelled_error())
        elif code == "worker_restarted" and job.attempts >= MAX_WORKER_DEATHS:
            message = f"The worker running this job died {job.attempts} times; it is not run again."
            finished = self.store.finish(job_id, "failed", error=error_body(500, message, code="worker_died")["error"])
        elif status in _RETRYABLE or code == "queue_timeout":
            logger.info("job %s: the server answered %d %s; it waits its turn again", job_id, status, code)
            self.store.requeue(job_id, count_attempt=code == "worker_restarted")
            await asyncio.sleep(BUSY_BACKOFF_SECONDS)  # holding its slot: the runner backs off
            return
        else:
            error = error or error_body(status, "The job failed.")["error"]
            finished = self.store.finish(job_id, "failed", error=error)
        if finished is not None:
            logger.info("job %s %s", job_id, finished.status)
            if finished.started_at is not None and "started" not in sent:
                # It ran between two looks of the watcher (a fast job): its receiver still hears that it started.
                self._notify(finished, "started")
            self.send_due_webhooks()

    async def _watch(self, job_id: str, sent: set[str]) -> None:
        """Send the started and progress webhooks of a job while it runs, adding the events sent to `sent`."""
        job = self.store.get(job_id)
        if job is None or not job.webhook_url or not {"started", "progress"} & set(job.webhook_events):
            return
        reported = 0.0
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            job = self.store.get(job_id)
            if job is None or job.status != "running":
                continue
            if "started" not in sent:
                sent.add("started")
                self._notify(job, "started")
            if job.progress - reported >= PROGRESS_STEP:
                reported = job.progress
                self._notify(job, "progress")

    async def _send_due_webhooks_forever(self) -> None:
        """Every `POLL_SECONDS`: the `completed` webhooks the store holds due (jobs cancelled while queued,
        and after a restart those the previous run had not delivered)."""
        while True:
            try:
                self.send_due_webhooks()
            except Exception:  # the store is busy or gone for a moment: try again at the next look
                logger.exception("sending due job webhooks failed")
            await asyncio.sleep(POLL_SECONDS)

    def send_due_webhooks(self) -> None:
        """Start the delivery of each due `completed` webhook not being delivered already. Each stays due in
        the store until its delivery ends for good, so one cut short by a stop is sent again after the start."""
        for job in self.store.due_webhooks():
            if job.id in self._sending:
                continue
            if self.webhooks is None:
                logger.warning("job %s: its completed webhook is not sent: this server has no webhook secret",
                               job.id)
                self.store.webhook_sent(job.id)
                continue
            try:
                taken = self._notify(job, "completed", on_end=functools.partial(self._webhook_ended, job.id))
            except ValueError:  # a URL that can never be sent to (checked at submission: not expected)
                logger.exception("job %s: its completed webhook cannot be sent", job.id)
                self.store.webhook_sent(job.id)
                continue
            if taken:  # else the sender was full or stopping: it stays due, for the next look
                self._sending.add(job.id)

    def _webhook_ended(self, job_id: str, outcome: str) -> None:
        self._sending.discard(job_id)
        self.store.webhook_sent(job_id)

    def _notify(self, job: Job, event: str, on_end: Callable[[str], None] | None = None) -> bool:
        """Send `event` of `job` if it asked for it; whether the sender took it (True too when not asked for)."""
        if self.webhooks is None or not job.webhook_url or event not in job.webhook_events:
            return True
        # The same event of the same run keeps its id, so a receiver can drop repeats by it.
        message_id = f"{job.id}.{event}.{job.attempts}.{int(job.progress * 100)}"
        return self.webhooks.send(job.webhook_url, event, job.to_dict(), message_id=message_id, on_end=on_end)
