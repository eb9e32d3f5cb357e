"""`clarity upscale --server`: each image a job on the server's `/v1/jobs`, so that a batch survives restarts.

    submit (POST /v1/jobs + Idempotency-Key) ─> poll (GET /v1/jobs/{id}) ─> write the result ─> DELETE the job

At most `concurrency` jobs are on the server at once (queued or running). A job's idempotency key is
derived from what defines its result (`idempotency_key`), so the same command run again, after this
process or the server stopped in any way, gets back the jobs it had submitted (the server answers 200
`Idempotent-Replayed: true`) instead of running them twice; a key the server no longer knows (its job
expired or was deleted) is simply submitted afresh. A finished job is deleted once its result is written
or its failure reported, so that a large batch does not fill the server's store (and a re-run retries a
failure instead of replaying it); a job whose result could not be written here is left for a re-run.

The HTTP calls are httpx2 with a small retry loop of our own rather than the `openai` SDK: the SDK has no
jobs API, and its retries are a few, counted, seconds apart, where a batch must ride out a server
restart of minutes. Here a connection error, 429, 502, 503 or 504 is retried (after the server's
`Retry-After` when it gives one) until `RETRY_WINDOW_SECONDS` of failure in a row.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
from tqdm import tqdm

from clarity.cli.batch import Job, write_atomically
from clarity.cli.remote import RemoteError

#: Seconds of failure in a row (no answer, or busy / not ready / bad gateway) before a call gives up.
RETRY_WINDOW_SECONDS = 600.0
#: Answers that mean "not now" rather than "no": retried within the window.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: First and longest pause between two tries of a call, when the server gives no `Retry-After` (the longest
#: is also how late a restarted server may be noticed).
FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS = 1.0, 5.0
#: The longest `Retry-After` followed (a full job store asks for 60 s).
MAX_RETRY_AFTER_SECONDS = 120.0
#: Seconds between two looks at the jobs in flight while one runs, and the longest while all are queued.
POLL_SECONDS, MAX_QUEUED_POLL_SECONDS = 1.0, 5.0
#: Per request: connecting, and everything else (an upload, or a result of many megabytes coming back).
CONNECT_TIMEOUT, REQUEST_TIMEOUT = 10.0, 300.0
#: Bumped if what goes into an idempotency key changes, so that old keys are not matched to new requests.
KEY_SCHEME = b"clarity-cli/1"


class JobRefused(RemoteError):
    """The server refused one image's job (a 4xx naming the field): that image fails, the batch goes on."""


@dataclass(frozen=True)
class JobRequest:
    """One image's submission: its form's text fields, its image (and mask) files, and its idempotency key."""

    fields: dict[str, str]
    image_name: str
    image: bytes
    mask: bytes | None

    @property
    def key(self) -> str:
        return idempotency_key(self.image, self.mask, self.fields)

    def files(self) -> dict[str, tuple[str, bytes, str]]:
        """The multipart files: `image`, and `mask` when one is sent."""
        files = {"image": (self.image_name, self.image, _content_type(self.image_name))}
        if self.mask is not None:
            files["mask"] = ("mask.png", self.mask, "image/png")
        return files


def idempotency_key(image: bytes, mask: bytes | None, fields: Mapping[str, str]) -> str:
    """`clarity-cli-<64 hex digits>`: the SHA-256 of everything that defines an image's result.

    Hashed, each part prefixed by its length (so that no two different inputs run together alike):
    `KEY_SCHEME`; the input file's bytes; whether a mask is sent and its bytes; and every text field
    sent, name and value, sorted by name (the engine parameters given, the prompt, `model` when
    given, `response_format`, `output_format`, `output_compression`). The same file with the same
    settings has the same key on any run and any machine, so a re-run finds the job it submitted;
    any change to what is sent changes it. The file's name and path are not in it: two copies of one
    image under different names share a job, which the first to finish deletes; the other then
    finds it gone and submits it again.
    """
    digest = hashlib.sha256()

    def part(data: bytes) -> None:
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)

    part(KEY_SCHEME)
    part(image)
    part(b"mask" if mask is not None else b"no mask")
    part(mask or b"")
    for name in sorted(fields):
        part(name.encode())
        part(fields[name].encode())
    return f"clarity-cli-{digest.hexdigest()}"


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class JobsClient:
    """The jobs routes of the Clarity server at `base_url`; each call is retried while the server is away
    or busy, for up to `retry_window` seconds of failure in a row, then fails with `RemoteError`."""

    def __init__(self, base_url: str, api_key: str | None, retry_window: float = RETRY_WINDOW_SECONDS) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=f"{base_url.rstrip('/')}/v1", headers=headers,
                                 timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT))
        self.retry_window = retry_window

    def available(self) -> bool:
        """Whether the server has the jobs API (an older Clarity, or another OpenAI-compatible server, has not)."""
        response = self._send("GET", "/jobs", params={"limit": 1})
        if response.status_code in (404, 405):
            return False
        if response.status_code != 200:
            raise RemoteError(_status_message(response))
        return True

    def submit(self, request: JobRequest) -> tuple[dict[str, Any], bool]:
        """The job for `request`, and whether it is one submitted before (replayed by its idempotency key).
        `JobRefused` if the server refuses it."""
        response = self._send("POST", "/jobs", data=request.fields, files=request.files(),
                              headers={"Idempotency-Key": request.key})
        if response.status_code not in (200, 202):
            raise JobRefused(_status_message(response))
        return response.json(), response.headers.get("idempotent-replayed") == "true"

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job as the server shows it now; None if it knows no such job (expired or deleted)."""
        response = self._send("GET", f"/jobs/{job_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise RemoteError(_status_message(response))
        return response.json()

    def delete(self, job_id: str) -> None:
        """Delete a finished job and its result on the server (one already gone is fine)."""
        response = self._send("DELETE", f"/jobs/{job_id}")
        if response.status_code not in (200, 404):
            raise RemoteError(_status_message(response))

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, tried again while the server is unreachable or answers 429/502/503/504. A notice says
        when that starts and ends; `RemoteError` once it has lasted `retry_window` seconds."""
        failing_since: float | None = None
        pause = FIRST_RETRY_SECONDS
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
                if response.status_code not in RETRY_STATUSES:
                    if failing_since is not None:
                        tqdm.write("clarity: the server answers again", file=sys.stderr)
                    return response
                reason, wait = f"server answered {response.status_code}", _retry_after(response) or pause
            except httpx.TransportError as error:
                detail = str(error) or type(error).__name__
                reason, wait = f"cannot reach the server at {self.http.base_url} ({detail})", pause
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
                tqdm.write(f"clarity: {reason}; retrying for up to {self.retry_window:g} s", file=sys.stderr)
            if now - failing_since + wait > self.retry_window:
                raise RemoteError(f"{reason}; gave up after {now - failing_since:.0f} s of retrying") from None
            time.sleep(wait)
            pause = min(pause * 2, MAX_RETRY_SECONDS)


def _retry_after(response: httpx.Response) -> float | None:
    """The server's `Retry-After` in seconds (the delay form; the date form is not worth parsing here)."""
    value = response.headers.get("retry-after", "")
    return min(float(value), MAX_RETRY_AFTER_SECONDS) if value.isdigit() else None


def _status_message(response: httpx.Response) -> str:
    """`server answered <status>: <its OpenAI-shaped error's message>` (or the start of its body)."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    return f"server answered {response.status_code}: {message}"


def job_error_message(job: dict[str, Any]) -> str:
    """Why a job failed or was cancelled, from its OpenAI-shaped `error`, naming the field when the server did."""
    error = job.get("error") or {}
    message = error.get("message") or f"the job ended {job.get('status')}"
    param = error.get("param")
    if param and not message.startswith(f"{param}:"):
        message = f"{param}: {message}"
    return f"job {job.get('id')} {job.get('status')} on the server: {message}"


#: Times one image's job may vanish from the server (expired, deleted) before its result is fetched,
#: each time submitted again, before the image is failed: a server whose jobs expire faster than we poll.
MAX_VANISHED = 3


@dataclass
class _InFlight:
    """An image whose job is on the server: what was sent, the job as last seen, when it was sent here."""

    job: Job
    request: JobRequest
    server_job: dict[str, Any]
    submitted_at: float
    vanished: int = 0


class JobBatch:
    """Upscales a batch's images as jobs on the server of `client`, at most `concurrency` on the server at
    once, showing their progress on `bar`. `fields` are the form's text fields but `output_format` (each
    image's own), `mask` the mask file's bytes sent with every image."""

    def __init__(self, client: JobsClient, fields: Mapping[str, str], mask: bytes | None, concurrency: int,
                 bar: tqdm) -> None:
        self.client = client
        self.fields = dict(fields)
        self.mask = mask
        self.concurrency = concurrency
        self.bar = bar
        self.flight: list[_InFlight] = []
        self.failed: list[Path] = []
        self.pause = POLL_SECONDS

    def run(self, todo: list[Job]) -> list[Path]:
        """Submit, follow and write every image of `todo`; the sources that failed. On Ctrl-C, or when the
        server stays away past the retry window, says which jobs stay on the server, and re-raises."""
        pending = list(reversed(todo))  # taken from the end: in the given order
        try:
            while pending or self.flight:
                while pending and len(self.flight) < self.concurrency:
                    self._submit(pending.pop())
                self._show()
                if self.flight:
                    time.sleep(self.pause)
                    for item in list(self.flight):
                        self._poll(item)
                    self._pace()
        except (KeyboardInterrupt, RemoteError):
            self._say_what_stays()
            raise
        return self.failed

    def _submit(self, job: Job, vanished: int = 0) -> None:
        try:
            request = JobRequest({**self.fields, "output_format": job.output_format}, job.source.name,
                                 job.source.read_bytes(), self.mask)
            server_job, replayed = self.client.submit(request)
        except (JobRefused, OSError) as error:  # refused, or the file became unreadable: this image alone
            self._fail(job, str(error))
            return
        if replayed:
            tqdm.write(f"{job.source}: resuming job {server_job['id']} ({server_job['status']}),"
                       " submitted by an earlier run")
        item = _InFlight(job, request, server_job, time.monotonic(), vanished)
        self.flight.append(item)
        self._follow(item, server_job)

    def _poll(self, item: _InFlight) -> None:
        server_job = self.client.get(item.server_job["id"])
        if server_job is not None:
            self._follow(item, server_job)
            return
        self.flight.remove(item)
        if item.vanished + 1 >= MAX_VANISHED:
            self._fail(item.job, f"its job vanished from the server {MAX_VANISHED} times before its result could"
                       " be fetched (do the server's jobs expire within seconds? see its --job-ttl-seconds)")
            return
        self._submit(item.job, item.vanished + 1)  # expired or deleted meanwhile: its key is free again

    def _follow(self, item: _InFlight, server_job: dict[str, Any]) -> None:
        """Act on the job's state: write a result, report a failure, or wait."""
        item.server_job = server_job
        if server_job["status"] == "succeeded":
            self._write(item)
        elif server_job["status"] in ("failed", "cancelled"):
            self.flight.remove(item)
            self._fail(item.job, job_error_message(server_job))
            self.client.delete(server_job["id"])  # a re-run then tries again rather than replaying the failure

    def _write(self, item: _InFlight) -> None:
        job_id, result = item.server_job["id"], item.server_job["result"]
        image = result["data"][0]
        try:
            write_atomically(item.job.target, base64.b64decode(image["b64_json"]))
        except OSError as error:
            self.flight.remove(item)
            self._fail(item.job, f"{error} (its job {job_id} stays on the server, for a re-run to fetch)")
            return
        self.flight.remove(item)
        seconds = time.monotonic() - item.submitted_at
        tqdm.write(f"wrote {item.job.target} ({result.get('size')} on the server; seed {image.get('seed')})"
                   f" in {seconds:.1f} s")
        self.bar.update(1)
        self.client.delete(job_id)

    def _fail(self, job: Job, message: str) -> None:
        self.failed.append(job.source)
        tqdm.write(f"clarity: error: {job.source}: {message}", file=sys.stderr)
        self.bar.update(1)

    def _pace(self) -> None:
        """Look every `POLL_SECONDS` while a job runs; while all wait in the queue, less and less often."""
        if any(item.server_job["status"] == "running" for item in self.flight):
            self.pause = POLL_SECONDS
        else:
            self.pause = min(self.pause * 1.5, MAX_QUEUED_POLL_SECONDS)

    def _show(self) -> None:
        """The jobs in flight after the bar: `a.png 45 %, b.png queued (3 ahead)`."""
        states = []
        for item in self.flight:
            job = item.server_job
            if job["status"] == "running":
                states.append(f"{item.job.source.name} {100 * (job.get('progress') or 0):.0f} %")
            else:
                ahead = job.get("queue_position")
                states.append(f"{item.job.source.name} {job['status']}" + (f" ({ahead} ahead)" if ahead else ""))
        self.bar.set_postfix_str(", ".join(states), refresh=True)

    def _say_what_stays(self) -> None:
        if self.flight:
            names = ", ".join(item.job.source.name for item in self.flight)
            tqdm.write(f"clarity: {len(self.flight)} job(s) stay on the server ({names}): run the same command again"
                       " to collect their results; until then they keep their place (a finished job is kept for"
                       " the server's --job-ttl-seconds, an hour by default)", file=sys.stderr)


def run_jobs(client: JobsClient, todo: list[Job], fields: Mapping[str, str], mask: bytes | None,
             concurrency: int, interactive: bool) -> list[Path]:
    """`JobBatch(...).run(todo)` with a bar on a terminal (none in logs and pipes); the sources that failed."""
    with tqdm(total=len(todo), unit="image", disable=not interactive) as bar:
        try:
            return JobBatch(client, fields, mask, concurrency, bar).run(todo)
        finally:
            client.close()
