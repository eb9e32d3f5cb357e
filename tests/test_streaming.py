"""Streamed edits (`stream=true`) against a real server: the official Python SDK, curl -N, keep-alives,
an error after the stream started, and a client that hangs up. (The JS SDK: test_js_sdk.py.)"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading
import time

import httpx2 as httpx
import openai
import pytest
from conftest import ServerProcess, make_test_image
from PIL import Image

KEY = "sk-stream-test"
#: Three denoising steps (6 x creativity 0.5): previews are due at 1/3 and 2/3 of the work.
STEPS = {"num_inference_steps": 6, "creativity": 0.5}
#: An upscale of a minute or more on the tiny model: stopped by the server's 20 s compute limit.
LONG = {"num_inference_steps": "100", "creativity": "1.0"}


def png(width: int = 40, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    make_test_image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    options = ["--api-key", KEY, "--max-compute-seconds", "20"]
    with ServerProcess(tiny_weights, tmp_path_factory.mktemp("stream") / "server.log", options) as process:
        yield process


def sse_lines(server, image: bytes, timeout: float = 120, **fields):
    """The raw lines of a streamed edit, as they arrive."""
    client = httpx.Client(base_url=server.url, timeout=timeout)
    files = {"image": ("photo.png", image, "image/png")}
    data = {"prompt": "a photo", "stream": "true", **{k: str(v) for k, v in fields.items()}}
    return client, client.stream("POST", "/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"},
                                 files=files, data=data)


def test_the_python_sdk_streams_partial_images_then_the_result(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    stream = client.images.edit(model="clarity-upscaler", image=("photo.png", png(), "image/png"), prompt="a photo",
                                stream=True, partial_images=2, extra_body=STEPS)
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    partials, completed = events[:2], events[2]
    assert [event.partial_image_index for event in partials] == [0, 1]
    progress = [event.model_extra["progress"] for event in partials]
    assert 0 < progress[0] < progress[1] < 1
    for event in partials:  # a preview at a quarter of the output's size
        preview = Image.open(io.BytesIO(base64.b64decode(event.b64_json)))
        assert preview.size == (20, 16) and event.size == "20x16" and event.output_format == "png"
    image = Image.open(io.BytesIO(base64.b64decode(completed.b64_json)))
    assert image.size == (80, 64) and completed.size == "80x64"
    assert isinstance(completed.model_extra["seed"], int)


def test_curl_shows_the_events_as_they_come(server, tmp_path):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: the README's examples use it (apt-get install curl)")
    photo = tmp_path / "photo.png"
    photo.write_bytes(png())
    command = ["curl", "-sS", "-N", "-D", "-", f"{server.url}/v1/images/edits", "-H", f"Authorization: Bearer {KEY}",
               "-F", f"image=@{photo}", "-F", "prompt=a photo", "-F", "stream=true", "-F", "partial_images=1",
               "-F", "output_format=webp", *[arg for k, v in STEPS.items() for arg in ("-F", f"{k}={v}")]]
    output = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "content-type: text/event-stream" in output.lower()
    events = [line.removeprefix("event: ") for line in output.splitlines() if line.startswith("event: ")]
    assert events == ["image_edit.partial_image", "image_edit.completed"]
    completed = json.loads([line for line in output.splitlines() if line.startswith("data: ")][-1][6:])
    assert completed["output_format"] == "webp"
    assert Image.open(io.BytesIO(base64.b64decode(completed["b64_json"]))).format == "WEBP"


def test_refusals_before_the_stream_are_plain_json_errors(server):
    client, request = sse_lines(server, png(), creativity="7")
    with client, request as response:
        assert response.status_code == 400
        assert json.loads(response.read())["error"]["param"] == "creativity"


def read_lines(server, image: bytes, lines: list, until: str | None = None, **fields) -> None:
    """Append (seconds since the call, line) of a streamed edit to `lines`; hang up after a line starting
    with `until`, else read to the end."""
    started = time.monotonic()
    client, request = sse_lines(server, image, **fields)
    with client, request as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append((time.monotonic() - started, line))
            if until is not None and line.startswith(until):
                return


def test_streams_report_progress_keep_alive_while_queued_and_end_with_an_error_event(server):
    running, queued = [], []
    first = threading.Thread(target=read_lines, args=(server, png(256, 256), running), kwargs=LONG)
    first.start()
    while not any(line.startswith(": progress") for _, line in running):  # it has a worker
        assert first.is_alive(), running
        time.sleep(0.1)
    # The second waits behind it (one worker): nothing to say but that it is alive.
    read_lines(server, png(256, 256), queued, until=": keep-alive", **LONG)
    first.join(60)
    assert [line for _, line in queued if line] == [": queued", ": keep-alive"]
    assert 14 < queued[-1][0] < 19
    progress = [float(line.split()[-1]) for _, line in running if line.startswith(": progress")]
    assert progress == sorted(progress) and 0 < progress[0] < progress[-1] < 1
    # The first ran into the server's 20 s compute limit after its stream started: an error event.
    assert [line for _, line in running if line.startswith("event: ")] == ["event: error"]
    error = json.loads([line for _, line in running if line.startswith("data: ")][-1].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["code"] == "compute_timeout"
    times = [at for at, _ in running]
    assert max(later - earlier for earlier, later in zip(times, times[1:], strict=False)) < 15


def test_a_client_that_hangs_up_stops_its_streamed_edit(server):
    client, request = sse_lines(server, png(256, 256), **LONG)
    with client, request as response:
        next(response.iter_lines())  # the stream has started; its upscale takes a minute or more
        time.sleep(1)
    hung_up = time.monotonic()
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    events = list(sdk.images.edit(image=("photo.png", png(), "image/png"), prompt="a photo", stream=True,
                                  extra_body=STEPS))
    assert events[-1].type == "image_edit.completed"
    assert time.monotonic() - hung_up < 15, "the abandoned upscale kept the worker busy"
    assert "the client left; cancelling its job" in server.log.read_text(errors="replace")
