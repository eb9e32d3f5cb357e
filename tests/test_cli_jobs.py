"""`clarity upscale --server` runs each image as an async job: a batch on a real server (written, then
deleted there), a CLI killed with SIGKILL and run again (each image runs once), a server killed with
SIGKILL and started again under a running CLI, a server without jobs, and the retry loop."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ServerProcess, free_port, make_test_image
from PIL import Image

from clarity.cli import main
from clarity.cli.remote import RemoteError
from clarity.cli.remote_jobs import JobsClient, idempotency_key

KEY = "sk-cli-jobs"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = ["--steps", "2", "--creativity", "0.5"]


def photos(folder: Path, count: int, width: int, height: int) -> Path:
    """`count` different images in `folder` (a.png, b.png, ...)."""
    folder.mkdir()
    for index in range(count):
        make_test_image(width, height, seed=index).save(folder / f"{'abcdefgh'[index]}.png")
    return folder


def upscale_args(source: Path, results: Path, url: str, *extra: str) -> list[str]:
    return ["upscale", str(source), "-o", str(results), "--server", url, "--api-key", KEY, *extra]


def server_jobs(server: ServerProcess) -> list[dict]:
    return server.http.get("/v1/jobs", params={"limit": 100}, headers=AUTH).json()["data"]


def spawn_cli(arguments: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as output:
        return subprocess.Popen([sys.executable, "-m", "clarity.cli", *arguments], env=env, stdout=output,
                                stderr=subprocess.STDOUT)


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def sizes(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file in `folder` (partial files included) and its image size."""
    found = {}
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            image.load()  # whole, or it fails
            found[path.name] = image.size
    return found


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_weights, tmp_path_factory.mktemp("cli-jobs") / "server.log", ["--api-key", KEY]) as server:
        yield server


# --- on a real server ------------------------------------------------------------------------------


def test_a_batch_runs_as_jobs_at_most_concurrency_at_once_and_leaves_none_behind(server, tmp_path, capsys,
                                                                                monkeypatch):
    source = photos(tmp_path / "photos", 4, 40, 32)
    (source / "bad.png").write_bytes(b"not an image")
    on_server_at_submission = []
    submit = JobsClient.submit

    def counting_submit(client, request):
        on_server_at_submission.append(len(server_jobs(server)))
        return submit(client, request)

    monkeypatch.setattr(JobsClient, "submit", counting_submit)
    mask = tmp_path / "keep-all.png"
    Image.new("L", (40, 32), 255).save(mask)  # white: keep everything, so each result is its input resized
    code = main(upscale_args(source, tmp_path / "results", server.url, *FAST, "--concurrency", "2", "--seed", "3",
                             "--mask", str(mask)))
    out = capsys.readouterr()
    assert code == 1, out
    assert "done: 4 written, 0 skipped, 1 failed" in out.out and "seed 3" in out.out
    assert "bad.png: server answered 400: image" in out.err  # refused at submission, the batch went on
    assert sizes(tmp_path / "results") == {f"{name}.png": (80, 64) for name in "abcd"}
    with Image.open(source / "c.png") as image, Image.open(tmp_path / "results" / "c.png") as result:
        assert result.tobytes() == image.resize((80, 64), Image.Resampling.LANCZOS).tobytes()  # the mask travelled
    assert len(on_server_at_submission) == 5 and max(on_server_at_submission) <= 1  # never a third job
    assert server_jobs(server) == []  # each job deleted once its result was written (or its refusal reported)


def test_a_cli_killed_and_run_again_resumes_its_jobs_and_each_image_runs_once(server, tmp_path):
    # 120x112 at 30 steps: seconds per image, and a size no other test here sends.
    source = photos(tmp_path / "photos", 4, 120, 112)
    arguments = upscale_args(source, tmp_path / "results", server.url, "--steps", "30", "--seed", "1")
    first = spawn_cli(arguments, tmp_path / "first.log")
    try:
        wait_until(lambda: server_jobs(server), 60, "the first job is submitted")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert len(list((tmp_path / "results").glob("*.png"))) < 4, "the batch ended before it was killed"
    second = spawn_cli(arguments, tmp_path / "second.log")
    assert second.wait(240) == 0, (tmp_path / "second.log").read_text()
    out = (tmp_path / "second.log").read_text()
    assert "a.png: resuming job job_" in out  # picked up by its idempotency key
    assert sizes(tmp_path / "results") == {f"{name}.png": (240, 224) for name in "abcd"}
    runs = [line for line in server.log.read_text().splitlines() if "started: model" in line and "120x112" in line]
    assert len(runs) == 4, runs  # one run per image, though the first run submitted some of them
    assert server_jobs(server) == []


def test_ctrl_c_leaves_the_jobs_on_the_server_and_says_that_a_re_run_collects_them(server, tmp_path, capsys):
    source = photos(tmp_path / "photos", 2, 120, 104)
    arguments = upscale_args(source, tmp_path / "results", server.url, "--steps", "30", "--concurrency", "1")
    cli = spawn_cli(arguments, tmp_path / "cli.log")
    try:
        wait_until(lambda: server_jobs(server), 60, "the first job is submitted")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(30) == 130  # at once: the job is not waited for
    finally:
        cli.kill()
    err = (tmp_path / "cli.log").read_text()
    assert "clarity: 1 job(s) stay on the server (a.png): run the same command again to collect" in err
    assert err.strip().splitlines()[-1] == "clarity: interrupted" and "Traceback" not in err
    assert [job["status"] for job in server_jobs(server)] in (["queued"], ["running"], ["succeeded"])
    assert main(arguments) == 0
    assert "a.png: resuming job" in capsys.readouterr().out
    assert sizes(tmp_path / "results") == {"a.png": (240, 208), "b.png": (240, 208)}
    assert server_jobs(server) == []


def test_a_server_killed_and_started_again_under_a_running_cli(tiny_weights, tmp_path):
    port, options = free_port(), ["--api-key", KEY, "--data-dir", str(tmp_path / "data")]
    server = ServerProcess(tiny_weights, tmp_path / "first.log", options, port=port)
    cli = None
    try:
        server.wait_healthy()
        source = photos(tmp_path / "photos", 3, 112, 96)  # seconds each at 30 steps: killed while one runs
        cli = spawn_cli(upscale_args(source, tmp_path / "results", server.url, "--steps", "30"), tmp_path / "cli.log")
        wait_until(lambda: any(job["status"] == "running" for job in server_jobs(server)), 60, "a job runs")
        server.stop()  # SIGKILL, every process of it
        server = ServerProcess(tiny_weights, tmp_path / "second.log", options, port=port)
        server.wait_healthy()
        assert cli.wait(240) == 0, (tmp_path / "cli.log").read_text()
        out = (tmp_path / "cli.log").read_text()
        assert "cannot reach the server" in out and "retrying for up to 600 s" in out
        assert "the server answers again" in out
        assert sizes(tmp_path / "results") == {f"{name}.png": (224, 192) for name in "abc"}
        assert "queued again" in server.log.read_text()  # the jobs came back from its store, not resubmitted
        assert server_jobs(server) == []
    finally:
        if cli is not None:
            cli.kill()
        server.stop()


# --- a server without jobs, and the retry loop, on a scripted loopback server -------------------------------


class ScriptedServer:
    """An HTTP server on 127.0.0.1 answering each `(method, path)` from a script of `(status, headers, body)`
    answers, in turn (the last one repeats); anything else is a 404. Records the requests' method and path."""

    def __init__(self, script: dict[tuple[str, str], list[tuple[int, dict, dict]]]) -> None:
        self.script = {route: list(answers) for route, answers in script.items()}
        self.requests: list[tuple[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                route = (self.command, self.path.split("?")[0])
                owner.requests.append(route)
                answers = owner.script.get(route) or [(404, {}, {"detail": "Not Found"})]
                status, headers, body = answers.pop(0) if len(answers) > 1 else answers[0]
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"content-type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = handle_one

            def log_message(self, *args) -> None:  # quiet
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def test_a_server_without_jobs_gets_edit_requests_with_a_notice(tmp_path, capsys):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(buffer, format="PNG")
    edit = {"created": 0, "size": "8x6", "data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]}
    fake = ScriptedServer({("GET", "/v1/models"): [(200, {}, {"object": "list", "data": [
                               {"id": "clarity-upscaler", "object": "model", "created": 0, "owned_by": "x"}]})],
                           ("POST", "/v1/images/edits"): [(200, {}, edit)]})
    try:
        code = main(upscale_args(photos(tmp_path / "photos", 2, 16, 16), tmp_path / "results", fake.url))
    finally:
        fake.close()
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"notice: {fake.url} has no jobs API (/v1/jobs): each image goes as one edit request instead" in out
    assert fake.requests.count(("POST", "/v1/images/edits")) == 2 and ("POST", "/v1/jobs") not in fake.requests
    assert sizes(tmp_path / "results") == {"a.png": (8, 6), "b.png": (8, 6)}


def test_busy_answers_are_retried_after_retry_after_and_a_server_gone_for_good_is_given_up(capsys):
    job = {"id": "job_1", "object": "job", "status": "running"}
    fake = ScriptedServer({("GET", "/v1/jobs/job_1"): [(503, {"retry-after": "1"}, {}),
                                                       (429, {"retry-after": "1"}, {}), (200, {}, job)]})
    try:
        started = time.monotonic()
        assert JobsClient(fake.url, KEY).get("job_1") == job
        assert time.monotonic() - started >= 2  # two waits of the server's Retry-After
        assert fake.requests == [("GET", "/v1/jobs/job_1")] * 3
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert "server answered 503; retrying for up to 600 s" in err and "the server answers again" in err

    gone = JobsClient(f"http://127.0.0.1:{free_port()}", KEY, retry_window=2.5)
    started = time.monotonic()
    with pytest.raises(RemoteError, match=r"cannot reach the server .*; gave up after \d+ s of retrying"):
        gone.get("job_1")
    assert 1 <= time.monotonic() - started < 10  # a pause of 1 s, then of 2 s would pass the window


def test_the_idempotency_key_follows_what_defines_the_result():
    fields = {"prompt": "a photo", "output_format": "png", "model": "m"}
    key = idempotency_key(b"image", None, fields)
    assert key.startswith("clarity-cli-") and len(key) == len("clarity-cli-") + 64
    assert idempotency_key(b"image", None, dict(reversed(fields.items()))) == key  # the fields' order is not
    different = [idempotency_key(b"image2", None, fields), idempotency_key(b"image", b"", fields),
                 idempotency_key(b"image", b"mask", fields), idempotency_key(b"image", None, {**fields, "model": "n"}),
                 idempotency_key(b"image", None, {**fields, "seed": "1"})]
    assert len({key, *different}) == 6
    # Each part is length-prefixed: parts never run into each other.
    assert idempotency_key(b"", None, {"ab": "c"}) != idempotency_key(b"", None, {"a": "bc"})
