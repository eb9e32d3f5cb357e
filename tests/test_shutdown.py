"""Stopping a busy server: SIGTERM or SIGINT, to the whole process group or to the main process only.

Ctrl-C in a terminal and systemd (`KillMode=control-group`) signal every process of the server;
`docker stop` and Kubernetes signal the main process only. Each case starts its own
`python server.py` (each one stops it), puts one slow request in flight, sends the signal and
checks what a client and an operator see: the running request is answered, its result stays
downloadable while the server drains, new edits are told to retry elsewhere, and the server
exits 0 within its shutdown timeout with a clean log.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import psutil
import pytest
from conftest import ServerProcess, make_test_image
from PIL import Image

KEY = "sk-shutdown-secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: A request that keeps the worker busy for a few seconds on two loaded cores, long enough to
#: send a signal and probe the draining server while it runs.
SLOW = {"num_inference_steps": "12", "creativity": "1.0", "scheduler": "Euler"}
#: Seconds the server gives in-flight work after the signal: generous, since a loaded two-core
#: machine was seen to need over 20 s for a slow request.
SHUTDOWN_TIMEOUT = 60
#: An upscale far longer than any test waits for (of a 256x256 image: a minute or more).
ENDLESS = {**SLOW, "num_inference_steps": "100"}
#: What no clean shutdown writes to the log.
UNCLEAN = ("Traceback", "KeyboardInterrupt", "is dead. Restarting")


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    make_test_image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def post_edit(http: httpx.Client, image: bytes, **fields: str) -> httpx.Response:
    files = {"image": ("a.png", image, "image/png")}
    return http.post("/v1/images/edits", headers=AUTH, files=files, data=fields)


def in_background(function: Callable[[], object]) -> tuple[threading.Thread, list]:
    """Run `function()` in a thread; its result lands in the returned list."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture
def start_server(tiny_weights: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts a fresh server (the test stops it); whatever is still running at the end is killed."""
    servers: list[ServerProcess] = []

    def start(shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> ServerProcess:
        options = ["--api-key", KEY, "--shutdown-timeout", str(shutdown_timeout)]
        server = ServerProcess(tiny_weights, tmp_path / f"server-{len(servers)}.log", options)
        servers.append(server)
        server.wait_healthy()
        return server

    yield start
    for server in servers:
        server.stop()


def start_slow_request(
    server: ServerProcess, settings: dict[str, str] = SLOW, size: int = 64
) -> tuple[threading.Thread, list[httpx.Response | Exception]]:
    """A slow url-mode edit of a `size`-pixel square, returned once a worker has started it."""

    def request() -> httpx.Response | Exception:
        try:
            return post_edit(server.http, png(size, size), **settings, response_format="url")
        except httpx.TransportError as error:  # no answer at all
            return error

    thread, result = in_background(request)
    deadline = time.monotonic() + 30
    while " started: " not in server.log.read_text(errors="replace"):
        assert thread.is_alive(), f"the slow request was answered before it started: {result}"
        assert time.monotonic() < deadline, "the slow request did not start"
        time.sleep(0.05)
    return thread, result


def wait_for_log(server: ServerProcess, text: str, seconds: float = 30) -> None:
    """Return once the server's log holds `text`."""
    deadline = time.monotonic() + seconds
    while text not in server.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} did not appear in the log"
        time.sleep(0.05)


def send(server: ServerProcess, signum: signal.Signals, to_group: bool) -> None:
    if to_group:  # as Ctrl-C and systemd do: the server runs in its own process group
        os.killpg(server.process.pid, signum)
    else:  # as docker stop and Kubernetes do
        server.process.send_signal(signum)


def assert_clean_log(server: ServerProcess, *unclean: str) -> None:
    """No traceback, interrupt or worker restart in the log (nor any of `unclean`), and no API key.

    The tiny test model's warning, logged as each worker loads it, is expected.
    """
    log = server.log.read_text(errors="replace")
    checked = "\n".join(line for line in log.splitlines() if "is the tiny test model" not in line)
    found = [marker for marker in (*UNCLEAN, *unclean) if marker in checked]
    assert not found, f"{found} in the log:\n{log[-4000:]}"
    assert KEY not in log


@pytest.mark.parametrize("to_group", [True, False], ids=["group", "main"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_drains_the_running_request_then_exits_cleanly(start_server, signum, to_group):
    server = start_server()
    slow, slow_result = start_slow_request(server)
    signalled = time.monotonic()
    send(server, signum, to_group)

    # While it drains, the server still answers: new edits are turned away with retry advice,
    # and load balancers see it is going.
    with httpx.Client(base_url=server.url, timeout=10) as client:
        refused = post_edit(client, png(16, 16))
        health = client.get("/health")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"]
    assert health.status_code == 503

    slow.join(SHUTDOWN_TIMEOUT)
    assert slow_result, "the in-flight request was not answered"
    assert slow_result[0].status_code == 200, slow_result[0].text
    # Its result URL is still served: the client just received it.
    url = httpx.URL(slow_result[0].json()["data"][0]["url"])
    download = server.http.get(url.path)
    assert download.status_code == 200, download.text
    assert Image.open(io.BytesIO(download.content)).size == (128, 128)

    assert server.process.wait(SHUTDOWN_TIMEOUT) == 0
    assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=2)
    assert_clean_log(server, "WARNING", "ERROR")  # nothing killed, nothing given up on


def test_requests_that_cannot_finish_in_time_get_a_503_and_the_server_still_exits_cleanly(start_server):
    server = start_server(shutdown_timeout=2)
    slow, slow_result = start_slow_request(server, ENDLESS, size=256)
    signalled = time.monotonic()
    send(server, signal.SIGTERM, to_group=False)
    slow.join(SHUTDOWN_TIMEOUT)
    assert slow_result, "the request was not answered"
    response = slow_result[0]
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down"
    assert response.headers["retry-after"]
    assert time.monotonic() - signalled < 2 + 5
    assert server.process.wait(30) == 0
    assert_clean_log(server)


def test_a_second_sigint_to_the_group_stops_at_once(start_server):
    server = start_server()
    processes = psutil.Process(server.process.pid).children(recursive=True)
    slow, slow_result = start_slow_request(server, ENDLESS, size=256)
    send(server, signal.SIGINT, to_group=True)
    # Both have taken the first one: the HTTP process drains, the main process waits for it.
    wait_for_log(server, "stopping: 1 edit request(s) in flight")
    wait_for_log(server, "Ctrl-C again stops at once")
    pressed_again = time.monotonic()
    send(server, signal.SIGINT, to_group=True)
    assert server.process.wait(10) == 130  # the shell's code for "ended by Ctrl-C"
    assert time.monotonic() - pressed_again < 5
    slow.join(10)
    assert slow_result and isinstance(slow_result[0], httpx.TransportError), slow_result
    # Every process of the server is gone with it: workers, HTTP process, manager.
    _, alive = psutil.wait_procs(processes, timeout=5)
    alive = [process for process in alive if process.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [process.cmdline() for process in alive]
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
