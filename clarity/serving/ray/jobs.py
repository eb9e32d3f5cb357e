"""The cluster's jobs: one store and one runner, in a Ray actor on the head node.

`JobsActor` holds the API core's `SQLiteJobStore` (in the data folder on the head node, so jobs
survive a restart of the server as on one machine) and runs its `JobRunner`, which hands queued jobs
to the upscaler deployment: once per cluster, whatever the number of ingress replicas. It is named
(`JOBS_ACTOR` in `NAMESPACE`) and detached, like the Serve application it serves: `server.py` creates
it before deploying and kills it after. Every other process reaches the store through `RayJobStore`,
whose methods are calls to the actor.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import time
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from clarity.api.config import ServerConfig
from clarity.api.jobs import Job, JobEvent, JobInput, JobStatus, NewJob
from clarity.api.logs import configure_logging
from clarity.api.results import open_result_store
from clarity.api.runner import JobRunner
from clarity.api.sqlite_jobs import open_job_store
from clarity.api.webhooks import WebhookSender
from clarity.serving.ray.calls import EditCall, call_upscaler
from clarity.serving.ray.metrics import install as install_metrics

logger = logging.getLogger(__name__)

#: The actor's name, and the Ray namespace it is found in from any process of the cluster.
JOBS_ACTOR = "clarity-jobs"
NAMESPACE = "clarity"
#: Seconds between two purges of expired jobs and url-mode results.
PURGE_INTERVAL = 60
#: The `JobStore` methods the actor answers (`RayJobStore` calls them by name).
STORE_METHODS = frozenset({
    "create", "get", "list", "claim_next", "mark_running", "report_progress", "add_event", "events_after",
    "finish", "requeue", "cancel", "cancel_requested", "delete", "recover", "purge_expired", "counts",
})


class JobsActor:
    """The job store and the job runner of the Serve application `app_name`, whose upscaler deployment is
    `upscaler`; `concurrency` jobs run at once (as many as the upscaler replicas can hold).

    An async actor: the store is used from its event loop only, where the runner runs too. The runner
    dispatches nothing until the application is running (after a restart of the actor too).
    """

    def __init__(self, config: ServerConfig, app_name: str, upscaler: str, concurrency: int) -> None:
        configure_logging(config.log_level)
        install_metrics()  # the jobs gauge and the webhook deliveries
        self.app_name = app_name
        self.upscaler_name = upscaler
        self.store = open_job_store(config)
        self.results = open_result_store(config.results, config.results_path, config.result_ttl_seconds,
                                         config.max_result_bytes)
        webhooks = WebhookSender(config.webhook_secret, config.webhook_allow, config.webhook_retry_seconds)
        self.runner = JobRunner(self.store, self._execute, concurrency, webhooks, stopping=self._not_ready)
        self._upscaler: DeploymentHandle | None = None
        self._stopping = False
        loop = asyncio.get_running_loop()  # Ray runs an async actor's constructor on its event loop
        self._tasks = [  # held: the loop keeps only weak references to its tasks
            loop.create_task(self.runner.run()), loop.create_task(self._purge_on_a_timer())]

    async def call(self, method: str, *args: Any) -> Any:
        """`JobStore.<method>(*args)` on the store."""
        if method not in STORE_METHODS:
            raise AttributeError(f"the job store has no method {method!r}")
        return getattr(self.store, method)(*args)

    async def wake(self) -> None:
        """A job was submitted: the runner looks for it now."""
        self.runner.wake()

    async def stop_dispatching(self) -> None:
        """The server is stopping: no new job starts (queued ones wait for the next start)."""
        self._stopping = True

    def _not_ready(self) -> bool:
        """Whether no job may start now: the server is stopping, or the application is not running yet."""
        if self._stopping:
            return True
        if self._upscaler is None:
            application = serve.status().applications.get(self.app_name)
            if application is None or application.status != ApplicationStatus.RUNNING:
                return True
            self._upscaler = serve.get_deployment_handle(self.upscaler_name, app_name=self.app_name)
        return False

    async def _execute(self, job: JobInput) -> tuple[int, dict[str, Any]]:
        """Run a job's stored form on an upscaler replica, as a client's edit would run."""
        assert self._upscaler is not None  # the runner dispatches only when `_not_ready()` is False
        call = EditCall(job.body, job.content_type, f"req_{secrets.token_hex(12)}", job.base_url, time.time(),
                        job_id=job.id)
        answer = await call_upscaler(self._upscaler, call)
        return answer.status, answer.body

    async def _purge_on_a_timer(self) -> None:
        """Delete expired jobs, and expired results of the head's result folder, every `PURGE_INTERVAL` s."""
        while True:
            await asyncio.sleep(PURGE_INTERVAL)
            try:
                self.store.purge_expired()
                self.results.purge_expired()
            except (OSError, sqlite3.Error):  # a vanished file, a locked database: the next round tries again
                logger.warning("purging expired jobs and results failed", exc_info=True)


class RayJobStore:
    """The `JobStore` every process of the cluster shares: each method a call to the `JobsActor`, found by
    name on first use. Pickles as the name (it travels to the deployments inside the `EditHandler`).

    Its methods block until the actor answers (about a millisecond on one node), as the API core's job
    routes call the store synchronously; the store's own errors (`JobNotFound`, `JobsFull`, ...) are
    raised as they were raised in the actor.
    """

    def __init__(self, name: str = JOBS_ACTOR, namespace: str = NAMESPACE) -> None:
        self.name = name
        self.namespace = namespace
        self._actor: ray.actor.ActorHandle | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "_actor": None}

    def _handle(self) -> ray.actor.ActorHandle:
        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=self.namespace)
        return self._actor

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return ray.get(self._handle().call.remote(method, *args))
        except RayTaskError as error:
            raise error.cause from None

    def wake(self) -> None:
        """Tell the runner a job was submitted (without waiting for it)."""
        self._handle().wake.remote()

    def create(self, new: NewJob) -> tuple[Job, bool]:
        return self._call("create", new)

    def get(self, job_id: str) -> Job | None:
        return self._call("get", job_id)

    def list(self, limit: int, after: str | None = None) -> tuple[list[Job], bool]:
        return self._call("list", limit, after)

    def claim_next(self) -> JobInput | None:
        return self._call("claim_next")

    def mark_running(self, job_id: str) -> bool:
        return self._call("mark_running", job_id)

    def report_progress(self, job_id: str, fraction: float) -> None:
        self._call("report_progress", job_id, fraction)

    def add_event(self, job_id: str, type: str, payload: dict[str, Any]) -> None:
        self._call("add_event", job_id, type, payload)

    def events_after(self, job_id: str, seq: int) -> list[JobEvent]:
        return self._call("events_after", job_id, seq)

    def finish(self, job_id: str, status: JobStatus, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> Job | None:
        return self._call("finish", job_id, status, result, error)

    def requeue(self, job_id: str, count_attempt: bool = False) -> None:
        self._call("requeue", job_id, count_attempt)

    def cancel(self, job_id: str) -> Job:
        return self._call("cancel", job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self._call("cancel_requested", job_id)

    def delete(self, job_id: str) -> None:
        self._call("delete", job_id)

    def recover(self) -> tuple[int, int]:
        return self._call("recover")

    def purge_expired(self) -> int:
        return self._call("purge_expired")

    def counts(self) -> dict[str, int]:
        return self._call("counts")

