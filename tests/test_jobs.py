"""Async jobs: `/v1/jobs` on a real server (submit, poll, list, cancel, delete, idempotency, limits), a
server killed with SIGKILL and started again, and the SQLite store's own guarantees."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import ServerProcess, make_test_image, running_server
from PIL import Image

from clarity.api.jobs import IdempotencyConflict, JobsFull, NewJob, WrongState
from clarity.api.runner import POLL_SECONDS
from clarity.api.sqlite_jobs import SQLiteJobStore

KEY = "sk-jobs-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"num_inference_steps": "2", "creativity": "0.5", "response_format": "b64_json"}
#: A job that runs for a minute or more on the tiny model (256x256 at 100 steps): long enough to catch running.
SLOW = {"num_inference_steps": "100", "response_format": "b64_json"}
FINISHED = ("succeeded", "failed", "cancelled")


def png(width: int = 40, height: int = 32, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_test_image(width, height, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def submit(http, image: bytes | None = None, headers: dict | None = None, **fields):
    files = {"image": ("photo.png", image or png(), "image/png")}
    return http.post("/v1/jobs", headers={**AUTH, **(headers or {})}, files=files,
                     data={"prompt": "a photo", **FAST, **fields})


def wait_for(http, job_id: str, statuses=FINISHED, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        job = http.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stayed {job['status']}"
        time.sleep(0.2)


def result_image(job: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(job["result"]["data"][0]["b64_json"])))


@pytest.fixture(scope="module")
def http(tiny_weights, tmp_path_factory):
    with running_server(tiny_weights, tmp_path_factory.mktemp("jobs-outputs"), api_key=KEY, max_jobs=6) as client:
        yield client


# --- the life of a job -------------------------------------------------------------------------------


def test_a_job_is_accepted_at_once_then_succeeds_with_the_edit_response(http):
    response = submit(http)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "job" and job["id"].startswith("job_") and job["status"] in ("queued", "running")
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    done = wait_for(http, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1 and done["attempts"] == 1 and done["error"] is None
    assert result_image(done).size == (80, 64) and done["result"]["size"] == "80x64"
    assert done["expires_at"] - done["finished_at"] == 3600  # kept an hour by default
    http.delete(f"/v1/jobs/{job['id']}", headers=AUTH)


def test_jobs_are_listed_newest_first_page_by_page(http):
    ids = [submit(http, seed=str(seed)).json()["id"] for seed in range(3)]
    first = http.get("/v1/jobs", params={"limit": 2}, headers=AUTH).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [job["id"] for job in first["data"]] == ids[::-1][:2]
    second = http.get("/v1/jobs", params={"limit": 2, "after": first["last_id"]}, headers=AUTH).json()
    assert second["data"][0]["id"] == ids[0]
    for job_id in ids:
        wait_for(http, job_id)
        assert http.delete(f"/v1/jobs/{job_id}", headers=AUTH).json() == {
            "id": job_id, "object": "job.deleted", "deleted": True}
        assert http.get(f"/v1/jobs/{job_id}", headers=AUTH).status_code == 404


def test_an_idempotency_key_returns_the_same_job_and_refuses_another_body(http):
    key = {"Idempotency-Key": "batch-7/photo-1"}
    first = submit(http, headers=key)
    again = submit(http, headers=key)  # a retry: the SDK draws a new multipart boundary
    assert first.status_code == 202 and again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = submit(http, headers=key, prompt="another photo")
    assert other.status_code == 409, other.text
    assert other.json()["error"]["param"] == "Idempotency-Key"
    assert other.json()["error"]["code"] == "idempotency_conflict"
    assert other.headers["x-should-retry"] == "false"
    wait_for(http, first.json()["id"])
    http.delete(f"/v1/jobs/{first.json()['id']}", headers=AUTH)


def test_a_queued_and_a_running_job_can_be_cancelled(http):
    running = submit(http, png(256, 256), **SLOW).json()
    queued = submit(http, png(256, 256), **SLOW).json()
    wait_for(http, running["id"], statuses=("running",))
    cancelled = http.post(f"/v1/jobs/{queued['id']}/cancel", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    asked = http.post(f"/v1/jobs/{running['id']}/cancel", headers=AUTH).json()
    assert asked["cancel_requested"] is True
    stopped = wait_for(http, running["id"], seconds=30)  # after the denoising step it is in, not 100 steps
    assert stopped["status"] == "cancelled" and stopped["error"]["code"] == "cancelled"
    assert stopped["progress"] < 1  # stopped part way
    finished = http.post(f"/v1/jobs/{running['id']}/cancel", headers=AUTH)
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "job_finished"
    for job in (running, queued):
        http.delete(f"/v1/jobs/{job['id']}", headers=AUTH)


# --- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "status", "param", "code"), [
    ("get", "/v1/jobs/job_nope", 404, "job_id", "job_not_found"),
    ("post", "/v1/jobs/job_nope/cancel", 404, "job_id", "job_not_found"),
    ("delete", "/v1/jobs/job_nope", 404, "job_id", "job_not_found"),
    ("get", "/v1/jobs?limit=0", 400, "limit", None),
    ("get", "/v1/jobs?limit=many", 400, "limit", None),
    ("get", "/v1/jobs?after=job_nope", 400, "after", None),
])
def test_unknown_jobs_and_bad_pages_are_4xx_naming_the_parameter(http, method, path, status, param, code):
    response = getattr(http, method)(path, headers=AUTH)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code and error["message"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"stream": "true"}, "stream"),
    ({"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_url"),  # this server sends no webhooks
    ({"webhook_events": "completed"}, "webhook_events"),
    ({"scale_factor": "99"}, "scale_factor"),
])
def test_bad_submissions_are_400_naming_the_field(http, fields, param):
    response = submit(http, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_client_cannot_pass_its_edit_off_as_a_job(http):
    # The runner's own requests name their job in a tag only the server sets; a form field of that
    # name is just an unknown field.
    response = http.post("/v1/images/edits", headers=AUTH, files={"image": ("photo.png", png(), "image/png")},
                         data={"clarity_job_id": "job_0123", "prompt": "a photo", **FAST})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "clarity_job_id"


def test_a_job_needs_the_key(http):
    response = http.post("/v1/jobs", files={"image": ("photo.png", png(), "image/png")})
    assert response.status_code == 401
    assert http.get("/v1/jobs").status_code == 401


def test_a_running_job_cannot_be_deleted_and_a_full_store_is_a_429_naming_the_limit(http):
    jobs = [submit(http, png(256, 256), **SLOW).json()]
    refused = http.delete(f"/v1/jobs/{jobs[0]['id']}", headers=AUTH)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_finished"
    while (response := submit(http, png(256, 256), **SLOW)).status_code == 202:
        jobs.append(response.json())
        assert len(jobs) <= 6, "the store took more jobs than --max-jobs"
    assert response.status_code == 429, response.text
    assert response.json()["error"]["param"] == "max_jobs" and response.json()["error"]["code"] == "too_many_jobs"
    for job in jobs:
        http.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
    for job in jobs:
        wait_for(http, job["id"], seconds=30)
        http.delete(f"/v1/jobs/{job['id']}", headers=AUTH)


# --- webhooks, end to end ----------------------------------------------------------------------------


def test_a_job_sends_its_webhooks_signed_to_a_loopback_receiver(tiny_weights, tmp_path):
    from standardwebhooks import Webhook
    from test_webhooks import Receiver, new_secret

    secret = new_secret()
    receiver = Receiver([200])
    options = {"webhook_secret": (secret,), "webhook_allow": ("127.0.0.1/32",)}
    with running_server(tiny_weights, tmp_path, api_key=KEY, **options) as http:
        for bad_url in ("http://10.1.2.3/hook", "ftp://127.0.0.1/hook", "http://user:pw@127.0.0.1/hook"):
            refused = submit(http, webhook_url=bad_url)  # off the allow-list, not HTTP, credentials in it
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook_url", bad_url
        refused = submit(http, webhook_url=receiver.url, webhook_events="finished")
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook_events"
        job = submit(http, png(64, 64), webhook_url=receiver.url, webhook_events="started,progress,completed",
                     num_inference_steps="40", creativity="1.0").json()
        assert job["webhook"] == {"url": receiver.url, "events": ["started", "progress", "completed"]}
        finished = wait_for(http, job["id"])
        # A job that ends before the runner's watcher looks (4 steps) still says that it started.
        fast = submit(http, webhook_url=receiver.url, webhook_events="started,completed").json()
        assert wait_for(http, fast["id"])["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while sum(json.loads(body)["type"] == "job.completed" for _, _, body in receiver.received) < 2:
            assert time.monotonic() < deadline, "no job.completed webhook arrived"
            time.sleep(0.1)
    signed = [Webhook(secret).verify(body, headers) for _, headers, body in receiver.received]  # raises if forged
    assert sorted(delivery["type"] for delivery in signed if delivery["data"]["id"] == fast["id"]) == [
        "job.completed", "job.started"]
    # Deliveries run side by side, so they may arrive out of order; their timestamps order them (README).
    deliveries = [delivery for delivery in signed if delivery["data"]["id"] == job["id"]]
    stamps = {delivery["type"]: delivery["timestamp"] for delivery in deliveries}
    assert set(stamps) == {"job.started", "job.progress", "job.completed"}, stamps
    assert stamps["job.started"] == min(d["timestamp"] for d in deliveries)
    assert stamps["job.completed"] == max(d["timestamp"] for d in deliveries)
    deliveries = [delivery for delivery in deliveries if delivery["type"] == "job.completed"]
    assert deliveries[-1]["data"]["id"] == job["id"] and deliveries[-1]["data"]["status"] == "succeeded"
    assert deliveries[-1]["data"]["result"] == finished["result"]
    assert len(set(receiver.ids())) == len(receiver.ids())  # one id per event


def test_a_completed_webhook_cut_short_by_a_killed_server_is_sent_after_it_restarts(tiny_weights, tmp_path):
    from test_webhooks import Receiver, new_secret

    receiver = Receiver([503])  # down for now: every try fails and is retried
    options = ["--api-key", KEY, "--data-dir", str(tmp_path / "data"), "--webhook-secret", new_secret(),
               "--webhook-allow", "127.0.0.1/32"]
    with ServerProcess(tiny_weights, tmp_path / "first.log", options) as server:
        done = submit(server.http, png(), webhook_url=receiver.url).json()
        wait_for(server.http, done["id"])
        deadline = time.monotonic() + 30
        while not receiver.received:
            assert time.monotonic() < deadline, "no try of the job.completed webhook"
            time.sleep(0.1)
        port = server.port
    # SIGKILLed on leaving the block, its delivery still being retried.
    receiver.statuses = [200]
    tried_before = len(receiver.received)
    first_id = receiver.ids()[0]
    with ServerProcess(tiny_weights, tmp_path / "second.log", options, port=port) as server:
        deadline = time.monotonic() + 60
        while len(receiver.received) == tried_before:
            assert time.monotonic() < deadline, "the due webhook was not sent after the restart"
            time.sleep(0.1)
        assert receiver.ids()[tried_before] == first_id  # the same message: receivers drop repeats by its id
        # A job cancelled while queued (behind a slow one on the one worker) sends its completed webhook too.
        slow = submit(server.http, png(64, 64), **SLOW).json()
        queued = submit(server.http, png(), webhook_url=receiver.url).json()
        assert server.http.post(f"/v1/jobs/{queued['id']}/cancel", headers=AUTH).json()["status"] == "cancelled"
        deadline = time.monotonic() + 30
        while len(receiver.received) == tried_before + 1:
            assert time.monotonic() < deadline, "no job.completed webhook for the cancelled job"
            time.sleep(0.1)
        event = json.loads(receiver.received[-1][2])
        assert event["type"] == "job.completed" and event["data"]["id"] == queued["id"]
        assert event["data"]["status"] == "cancelled"
        server.http.post(f"/v1/jobs/{slow['id']}/cancel", headers=AUTH)
        time.sleep(2 * POLL_SECONDS)  # a delivered webhook is due no more: nothing is sent twice
    assert len(receiver.received) == tried_before + 2


# --- nothing lost: a dead worker, a killed server ------------------------------------------------------


def test_a_job_whose_worker_dies_runs_again(tiny_weights, tmp_path):
    with ServerProcess(tiny_weights, tmp_path / "server.log", ["--api-key", KEY]) as server:
        job = submit(server.http, png(64, 64), **{**SLOW, "num_inference_steps": "60"}).json()
        wait_for(server.http, job["id"], statuses=("running",))
        os.kill(server.inference_worker_pid(), signal.SIGKILL)
        finished = wait_for(server.http, job["id"], seconds=300)
        assert finished["status"] == "succeeded" and finished["attempts"] == 2, finished
        assert result_image(finished).size == (128, 128)


def test_jobs_survive_a_sigkilled_server_and_each_finishes_exactly_once(tiny_weights, tmp_path):
    data = tmp_path / "data"
    options = ["--api-key", KEY, "--data-dir", str(data)]
    server = ServerProcess(tiny_weights, tmp_path / "first.log", options)
    try:
        server.wait_healthy()
        done = submit(server.http, png(seed=1)).json()
        finished_before = wait_for(server.http, done["id"])
        assert finished_before["status"] == "succeeded"
        slow = submit(server.http, png(64, 64, seed=2), **{**SLOW, "num_inference_steps": "60"}).json()
        queued = [submit(server.http, png(48, 40, seed=seed)).json() for seed in (3, 4)]
        wait_for(server.http, slow["id"], statuses=("running",))
    finally:
        os.killpg(server.process.pid, signal.SIGKILL)  # every process of the server, at once
        server.process.wait(10)
    restarted = ServerProcess(tiny_weights, tmp_path / "second.log", options)
    try:
        restarted.wait_healthy()
        again = wait_for(restarted.http, done["id"])
        assert again == finished_before  # reported succeeded before: never run again
        resumed = wait_for(restarted.http, slow["id"], seconds=300)
        assert resumed["status"] == "succeeded" and resumed["attempts"] == 2  # run again from the start
        assert result_image(resumed).size == (128, 128)
        for job in queued:
            finished = wait_for(restarted.http, job["id"])
            assert finished["status"] == "succeeded" and finished["attempts"] == 1
            assert result_image(finished).size == (96, 80)
        assert "3 queued again" in restarted.log.read_text()
    finally:
        restarted.stop()


# --- the store --------------------------------------------------------------------------------------


def new_job(**fields) -> NewJob:
    return NewJob(**{"kind": "job", "body": b"form", "content_type": "multipart/form-data; boundary=x",
                     "model": "m", "base_url": "http://localhost:8000", **fields})


@pytest.fixture
def store(tmp_path) -> SQLiteJobStore:
    return SQLiteJobStore(Path(tmp_path) / "jobs.sqlite3", ttl_seconds=60, max_jobs=3, max_bytes=1000)


def test_the_store_hands_each_job_out_once_and_records_one_end(store):
    first, _ = store.create(new_job())
    second, _ = store.create(new_job())
    assert store.get(second.id).queue_position == 1
    assert store.claim_next().id == first.id and store.claim_next().id == second.id
    assert store.claim_next() is None
    assert store.mark_running(first.id)
    assert store.finish(first.id, "succeeded", result={"data": []}).status == "succeeded"
    assert store.finish(first.id, "failed", error={"message": "late"}) is None  # a job ends once
    assert store.get(first.id).status == "succeeded"


def test_the_store_keeps_its_limits(store):
    with pytest.raises(JobsFull) as full:
        store.create(new_job(body=b"x" * 1001))
    assert full.value.limit == "max_job_mb"
    for _ in range(3):
        store.create(new_job())
    with pytest.raises(JobsFull) as full:
        store.create(new_job())
    assert full.value.limit == "max_jobs"


def test_idempotency_keys_in_the_store(store):
    job, created = store.create(new_job(idempotency_key="k", request_hash="a"))
    assert created
    assert store.create(new_job(idempotency_key="k", request_hash="a")) == (job, False)
    with pytest.raises(IdempotencyConflict):
        store.create(new_job(idempotency_key="k", request_hash="b"))


def test_recovery_requeues_jobs_and_fails_streams(store):
    job, _ = store.create(new_job())
    stream, _ = store.create(new_job(kind="stream"))
    for _ in range(2):
        store.mark_running(store.claim_next().id)
    assert store.recover() == (1, 1)
    assert store.get(job.id).status == "queued" and store.get(job.id).attempts == 1
    assert store.get(stream.id).status == "failed"
    assert store.get(stream.id).error["code"] == "server_restarted"
    assert store.claim_next().id == job.id


def test_cancel_and_delete_follow_the_state(store):
    job, _ = store.create(new_job())
    with pytest.raises(WrongState):
        store.delete(job.id)
    assert store.cancel(job.id).status == "cancelled"  # no worker had it: at once
    with pytest.raises(WrongState):
        store.cancel(job.id)
    store.delete(job.id)
    assert store.get(job.id) is None
    handed, _ = store.create(new_job())
    store.claim_next()
    assert store.cancel(handed.id).status == "queued"  # a worker has it: it stops at its next check
    assert store.cancel_requested(handed.id) and not store.mark_running(handed.id)


def test_expired_jobs_are_purged(tmp_path):
    store = SQLiteJobStore(Path(tmp_path) / "jobs.sqlite3", ttl_seconds=0, max_jobs=3, max_bytes=1000)
    job, _ = store.create(new_job())
    store.claim_next()
    store.finish(job.id, "succeeded", result={})
    assert store.purge_expired() == 1 and store.get(job.id) is None


def test_a_finished_job_with_a_completed_webhook_stays_due_until_it_is_sent(store):
    wanted, _ = store.create(new_job(webhook_url="http://127.0.0.1:9/hook", webhook_events=("completed",)))
    unwanted, _ = store.create(new_job(webhook_url="http://127.0.0.1:9/hook", webhook_events=("started",)))
    silent, _ = store.create(new_job())
    assert store.due_webhooks() == []
    for job in (wanted, unwanted, silent):
        store.claim_next()
        store.finish(job.id, "succeeded", result={})
    assert [job.id for job in store.due_webhooks()] == [wanted.id]
    reopened = SQLiteJobStore(store.path, store.ttl_seconds, store.max_jobs, store.max_bytes)  # a restart
    assert [job.id for job in reopened.due_webhooks()] == [wanted.id]
    reopened.webhook_sent(wanted.id)
    assert store.due_webhooks() == []


def test_a_job_file_of_an_earlier_version_gains_the_webhook_column(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE jobs (number INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, kind TEXT"
                " NOT NULL, status TEXT NOT NULL, model TEXT NOT NULL, base_url TEXT NOT NULL, created_at REAL NOT"
                " NULL, started_at REAL, finished_at REAL, expires_at REAL, progress REAL NOT NULL DEFAULT 0,"
                " attempts INTEGER NOT NULL DEFAULT 0, dispatched INTEGER NOT NULL DEFAULT 0, cancel_requested"
                " INTEGER NOT NULL DEFAULT 0, partial_images INTEGER NOT NULL DEFAULT 0, idempotency_key TEXT UNIQUE,"
                " request_hash TEXT, webhook_url TEXT, webhook_events TEXT NOT NULL DEFAULT '', body BLOB,"
                " content_type TEXT, stored_bytes INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT)")
    old.execute("INSERT INTO jobs (id, kind, status, model, base_url, created_at) VALUES"
                " ('job_old', 'job', 'succeeded', 'm', 'http://x', 0)")
    old.commit()
    old.close()
    store = SQLiteJobStore(path, ttl_seconds=60, max_jobs=3, max_bytes=10**6)
    assert store.get("job_old").status == "succeeded" and store.due_webhooks() == []
