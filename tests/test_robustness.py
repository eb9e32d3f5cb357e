"""Robustness of the server against hostile input, overload and faults, as a client sees it.

Two servers on the tiny model:

- an in-process one (TestClient) with a small queue bound, for the corpus of hostile files
  and requests, the files route, concurrency and the load test;
- a real `python server.py` subprocess on 127.0.0.1 with a 2 s queue deadline, for what only
  real processes show: queue deadlines, an inference worker killed mid-request, and
  schema-driven fuzzing over loopback.

Stopping the server (SIGINT and SIGTERM with work in flight) is tests/test_shutdown.py.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import numpy as np
import pytest
from conftest import ServerProcess, make_test_image, running_server
from PIL import Image

from clarity.api.results import LocalResultStore

KEY = "sk-robustness-secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: Fast engine settings (each request well under a second on two cores).
FAST = {"num_inference_steps": "2", "creativity": "0.5"}
#: A request that keeps the worker busy for a few seconds.
SLOW = {"num_inference_steps": "24", "creativity": "1.0", "scheduler": "Euler"}
#: Edit requests the in-process server holds at once before answering 429.
MAX_QUEUE = 3
#: Seconds the subprocess server lets a request wait for a worker.
QUEUE_TIMEOUT = 2
#: Seconds the subprocess server gives a client to send its request body.
UPLOAD_TIMEOUT = 3


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    return encode(make_test_image(width, height, seed=seed))


def png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header (with a correct CRC) claims another size: a bomb."""
    data = bytearray(png(16, 16))
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def gif_claiming_size(width: int, height: int) -> bytes:
    data = bytearray(encode(make_test_image(8, 8).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def corrupted(data: bytes) -> bytes:
    broken = bytearray(data)
    broken[len(data) // 3: len(data) // 3 + 24] = bytes(24)
    return bytes(broken)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    """The body is OpenAI's error shape (what the SDKs parse); returns the `error` object."""
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "rate_limit_error", "server_error")
    assert set(error) >= {"param", "code"}
    return error


def post_edit(http, image: bytes | None = None, filename: str = "a.png", **fields) -> httpx.Response:
    files = {"image": (filename, png() if image is None else image, "application/octet-stream")}
    return http.post("/v1/images/edits", headers=AUTH, files=files, data={**FAST, **fields})


def result_image(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))


# --- the in-process server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(tiny_weights, tmp_path_factory):
    with running_server(
        tiny_weights, tmp_path_factory.mktemp("outputs"), api_key=KEY, max_payload_mb=2.0,
        max_input_mp=1.0, max_queue=MAX_QUEUE,
    ) as client:
        yield client


def healthy(http) -> None:
    """The server still answers a normal request correctly."""
    assert http.get("/health").status_code == 200
    assert result_image(post_edit(http, png(24, 16), response_format="b64_json")).size == (48, 32)


HOSTILE_FILES = {
    "empty": b"",
    "text": b"definitely not an image",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    "html": b"<html><script>alert(1)</script></html>",
    "ppm (not allowed)": encode(make_test_image(8, 8), "PPM"),
    "ico (not allowed)": encode(make_test_image(16, 16), "ICO"),
    "truncated png": png()[: len(png()) // 2],
    "png header only": png()[:33],
    "corrupt png": corrupted(png()),
    "truncated jpeg": encode(make_test_image(32, 32), "JPEG")[:400],
    "truncated jpeg pixels": encode(make_test_image(64, 64), "JPEG")[:-300],
    "bomb png (10 gigapixels)": png_claiming_size(100_000, 100_000),
    "bomb png (over the 1 MP limit)": png_claiming_size(2_000, 1_000),
    "bomb gif": gif_claiming_size(65_535, 65_535),
    "zero-size png": png_claiming_size(0, 0),
}


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_hostile_files_are_a_400_naming_the_image(http, name):
    response = post_edit(http, HOSTILE_FILES[name])
    error = assert_openai_error(response, 400)
    assert error["param"] == "image"


def test_a_bomb_is_refused_by_its_header_in_milliseconds(http):
    started = time.monotonic()
    error = assert_openai_error(post_edit(http, png_claiming_size(30_000, 30_000)), 400)
    assert "limit" in error["message"]
    assert time.monotonic() - started < 2  # decoding 900 MP would take far longer (and 2.7 GB)


HOSTILE_FIELDS = [
    ({"prompt": "x" * 4001}, "prompt"),
    ({"negative_prompt": "y" * 10_000}, "negative_prompt"),
    ({"n": "1000"}, "n"),
    ({"n": "-1"}, "n"),
    ({"n": "1e309"}, "n"),
    ({"scale_factor": "1e9"}, "scale_factor"),
    ({"scale_factor": "nan"}, "scale_factor"),
    ({"scale_factor": "inf"}, "scale_factor"),
    ({"seed": "-5"}, "seed"),
    ({"num_inference_steps": "1000000"}, "num_inference_steps"),
    ({"output_compression": "1000"}, "output_compression"),
    ({"size": "0x0"}, "size"),
    ({"size": "99999999999999999999x1"}, "size"),
    ({"size": "64x64; rm -rf /"}, "size"),
    ({"response_format": "../../etc/passwd"}, "response_format"),
    ({"output_format": "svg"}, "output_format"),
    ({"__proto__": "1"}, "__proto__"),
]


@pytest.mark.parametrize(("fields", "param"), HOSTILE_FIELDS)
def test_hostile_fields_are_a_400_naming_the_field(http, fields, param):
    error = assert_openai_error(post_edit(http, **fields), 400)
    assert error["param"] == param


def test_an_hours_long_request_is_refused_before_any_work_naming_what_drives_it(http):
    started = time.monotonic()
    response = post_edit(http, png(256, 256), scale_factor="16", num_inference_steps="100", creativity="1",
                         tiling_width="16", tiling_height="16", n="4")
    error = assert_openai_error(response, 400)
    assert (error["param"], error["code"]) == ("scale_factor", "over_compute_budget")
    assert "megapixel-steps" in error["message"] and time.monotonic() - started < 10
    # The same steps and tiles on an output of a sensible size are within the budget.
    assert post_edit(http, png(16, 16), num_inference_steps="100", creativity="1", tiling_width="16",
                     tiling_height="16", n="4").status_code != 400


def test_an_output_over_the_pixel_cap_is_refused_naming_scale_factor(http):
    # 1000x1000 (1 MP, the input limit) at 16x is 256 MP, far over the default 16.8 MP cap.
    image = encode(Image.new("RGB", (1000, 1000), (40, 80, 120)))
    error = assert_openai_error(post_edit(http, image, scale_factor="16"), 400)
    assert error["param"] == "scale_factor"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"image": "aGVsbG8=", "prompt": "x"}', "application/json"),
        (b"{not json", "application/json"),
        (b"image=abc&prompt=x", "application/x-www-form-urlencoded"),
        (b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc", "multipart/form-data; boundary=x"),
        (b"", "multipart/form-data"),
        (b"\x00\xff" * 100, "multipart/form-data; boundary=zz"),
        (b"prompt=x", "text/plain"),
    ],
    ids=["json", "broken-json", "urlencoded", "unterminated-multipart", "no-boundary", "binary-multipart",
         "text"],
)
def test_malformed_bodies_are_a_4xx_in_openai_shape(http, body, content_type):
    response = http.post("/v1/images/edits", content=body, headers={**AUTH, "Content-Type": content_type})
    assert 400 <= response.status_code < 500, response.text
    assert_openai_error(response)


@pytest.mark.parametrize("content_type", [
    "multipart/form-data; charset=utf-8; xboundary=abc", "multipart/form-data; boundary=", "multipart/form-data;",
    "multipart/form-data; boundary=" + "b" * 71, "multipart/form-data; boundary=a{b}", "multipart/mixed; boundary=x",
])
def test_a_malformed_multipart_content_type_is_a_400_before_the_body_is_read(http, content_type):
    body = b'--abc\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--abc--\r\n'
    response = http.post("/v1/images/edits", content=body, headers={**AUTH, "Content-Type": content_type})
    assert response.status_code == 400, response.text  # was a 500 (a KeyError) for some of these
    assert assert_openai_error(response)["code"] == "invalid_content_type"


def test_a_multipart_body_without_its_closing_boundary_is_a_400(http):
    def part(name: str, value: bytes, filename: str = "") -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--abc\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value

    head = (part("image", png(16, 16), "a.png") + b"\r\n" + part("response_format", b"b64_json") + b"\r\n"
            + part("num_inference_steps", b"1") + b"\r\n" + part("scale_factor", b"3"))
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=abc"}
    whole = http.post("/v1/images/edits", content=head + b"\r\n--abc--\r\n", headers=headers)
    assert result_image(whole).size == (48, 48)
    # The form parser drops a cut-off last part: this one would run at the default scale, silently.
    cut = http.post("/v1/images/edits", content=head, headers=headers)
    assert cut.status_code == 400, cut.text
    assert assert_openai_error(cut)["code"] == "invalid_body"


def test_the_server_is_healthy_after_the_hostile_corpus(http):
    healthy(http)


# --- inputs that are odd but legitimate --------------------------------------------------------------


def animated_gif() -> bytes:
    red, blue = Image.new("RGB", (20, 10), (230, 20, 20)), Image.new("RGB", (30, 30), (20, 20, 230))
    return encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)


@pytest.mark.parametrize(
    ("name", "data", "size", "mode"),
    [
        ("animated gif: first frame", animated_gif(), (40, 20), "RGB"),
        ("cmyk jpeg", encode(make_test_image(24, 16).convert("CMYK"), "JPEG"), (48, 32), "RGB"),
        ("16-bit grayscale png", encode(Image.fromarray((np.arange(24 * 16).reshape(16, 24) * 170).astype(np.uint16))),
         (48, 32), "L"),
        ("palette with transparency", encode(make_test_image(24, 16).convert("P"), "PNG", transparency=0),
         (48, 32), "RGBA"),
        ("gray + alpha", encode(make_test_image(24, 16).convert("LA")), (48, 32), "LA"),
        ("rgba", encode(make_test_image(24, 16).convert("RGBA")), (48, 32), "RGBA"),
        ("one pixel", png(1, 1), (2, 2), "RGB"),
        ("1 x 64", png(1, 64), (2, 128), "RGB"),
        ("300 x 2", png(300, 2), (600, 4), "RGB"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_odd_but_valid_images_are_upscaled(http, name, data, size, mode):
    image = result_image(post_edit(http, data, response_format="b64_json"))
    assert image.size == size
    assert image.mode == mode  # transparency and grayscale come back as they went in


def test_an_animated_gif_is_upscaled_from_its_first_frame(http):
    pixels = np.asarray(result_image(post_edit(http, animated_gif(), response_format="b64_json")).convert("RGB"))
    red, _, blue = pixels.reshape(-1, 3).mean(axis=0)
    assert red > blue + 50  # the first frame is red, the second blue


# --- files route --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/files/..%5c..%5cwindows%5cwin.ini",
        "/v1/files/%2Fetc%2Fpasswd",
        "/v1/files/" + "A" * 43 + ".png%00.txt",
        "/v1/files/.partial-abc",
        "/v1/files/..",
    ],
)
def test_the_files_route_never_leaves_its_folder(http, path):
    response = http.get(path, headers=AUTH)  # with the key: the route is tested, not the auth
    assert response.status_code == 404
    assert "root:" not in response.text
    assert_openai_error(response)


def test_a_url_result_is_whole_and_fetchable(http):
    response = post_edit(http, png(24, 16))
    url = response.json()["data"][0]["url"]
    fetched = http.get(url)
    assert fetched.status_code == 200
    assert Image.open(io.BytesIO(fetched.content)).size == (48, 32)


def test_a_write_that_fails_midway_leaves_nothing_servable(tmp_path, monkeypatch):
    store = LocalResultStore(tmp_path, ttl_seconds=60)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.save(b"half an image", "png")
    assert list(tmp_path.iterdir()) == []


def test_partial_files_of_a_killed_writer_are_never_served_and_expire(tmp_path):
    store = LocalResultStore(tmp_path, ttl_seconds=60)
    partial = tmp_path / ".partial-abc123"
    partial.write_bytes(b"half")
    assert store.find(partial.name) is None
    fresh = store.save(b"whole", "png")
    old = time.time() - 120
    os.utime(partial, (old, old))
    foreign = tmp_path / "keep.png"
    foreign.write_bytes(b"someone else's")
    os.utime(foreign, (old, old))
    store.purge_expired()
    assert not partial.exists()
    assert foreign.exists()  # cleanup touches only its own expired files
    assert store.find(fresh).read_bytes() == b"whole"


def test_readers_never_see_a_half_written_result(tmp_path):
    """While results are written, every file a reader can find holds a complete image."""
    store = LocalResultStore(tmp_path, ttl_seconds=60)
    payload = png(200, 200)  # large enough that a write is not a single syscall's worth of time
    stop = threading.Event()
    seen: list[bytes] = []

    def read() -> None:
        while not stop.is_set():
            for path in tmp_path.iterdir():
                found = store.find(path.name)
                if found is not None:
                    seen.append(found.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(100):
            store.save(payload, "png")
    finally:
        stop.set()
        reader.join()
    assert seen and all(data == payload for data in seen)


# --- concurrency and load -----------------------------------------------------------------------------


def test_concurrent_requests_each_get_their_own_image(http):
    sizes = [(16, 16), (24, 16), (16, 24)]
    reference = {}
    for (width, height), seed in zip(sizes, (11, 12, 13), strict=True):
        reference[seed] = np.asarray(result_image(
            post_edit(http, png(width, height, seed=seed), response_format="b64_json", seed=str(seed))))

    def run(index: int) -> tuple[int, np.ndarray, int]:
        (width, height), seed = sizes[index], 11 + index
        response = post_edit(http, png(width, height, seed=seed), response_format="b64_json", seed=str(seed))
        return seed, np.asarray(result_image(response)), response.json()["data"][0]["seed"]

    with ThreadPoolExecutor(MAX_QUEUE) as pool:
        results = list(pool.map(run, range(len(sizes))))
    for seed, pixels, echoed in results:
        assert echoed == seed
        assert np.array_equal(pixels, reference[seed])


def test_load_beyond_the_queue_bound_gets_429_and_accepted_requests_complete(http):
    barrier = threading.Barrier(10)

    def run(index: int) -> httpx.Response:
        barrier.wait()
        return post_edit(http, png(16 + index, 16, seed=index), response_format="b64_json", seed=str(index))

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(run, range(10)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    for index, response in enumerate(responses):
        if response.status_code == 200:
            assert result_image(response).size == (2 * (16 + index), 32)
            assert response.json()["data"][0]["seed"] == index
        else:
            error = assert_openai_error(response, 429)
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) > 0
    healthy(http)


def test_the_watchdog_answers_overdue_and_orphaned_requests_only():
    import asyncio

    from litserve.utils import LitAPIStatus, ResponseBufferItem

    from clarity.serving.litserve.patches import TrackedBuffer
    from clarity.serving.litserve.watchdog import RequestWatchdog

    buffer = TrackedBuffer()
    ready = {0: True, 1: False}  # worker 1 died and is restarting
    watchdog = RequestWatchdog(buffer, queue_timeout=5, worker_ready=ready.__getitem__)
    items = {name: ResponseBufferItem(event=asyncio.Event()) for name in ("old", "new", "on-0", "on-1")}
    for uid, item in items.items():
        buffer[uid] = item
    buffer.added_at["old"] -= 10
    items["on-0"].worker_id, items["on-1"].worker_id = 0, 1

    assert watchdog.check() == 2
    answered = {uid for uid, item in items.items() if item.event.is_set()}
    assert answered == {"old", "on-1"}
    for uid, status, code in [("old", 504, "queue_timeout"), ("on-1", 503, "worker_restarted")]:
        error, state = items[uid].response
        assert state == LitAPIStatus.ERROR
        assert error.status_code == status and error.detail["error"]["code"] == code
    buffer.pop("old")
    assert "old" not in buffer.added_at  # nothing kept once LitServe has read the answer


def test_the_limits_are_set_from_the_command_line(tiny_weights, monkeypatch):
    from clarity.cli import serve
    from clarity.serving.litserve import server

    built: dict = {}
    monkeypatch.setattr(server, "serve", lambda config: built.update(config=config) or 0)  # not run
    argv = ["--weights", str(tiny_weights), "--host", "127.0.0.1", "--max-queue", "3", "--queue-timeout", "7",
            "--max-input-mp", "2.5", "--shutdown-timeout", "9", "--max-compute-seconds", "30"]
    assert serve.main(argv) == 0
    config = built["config"]
    assert config.host == "127.0.0.1"
    assert (config.max_queue, config.queue_timeout, config.shutdown_timeout) == (3, 7, 9)
    assert config.max_compute_seconds == 30
    assert config.max_input_pixels == 2_500_000


# --- a real server process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_weights, tmp_path_factory):
    options = ["--api-key", KEY, "--queue-timeout", str(QUEUE_TIMEOUT), "--upload-timeout", str(UPLOAD_TIMEOUT)]
    with ServerProcess(tiny_weights, tmp_path_factory.mktemp("server") / "server.log", options) as server:
        yield server


def in_background(function) -> tuple[threading.Thread, list]:
    """Run `function()` in a thread; its result lands in the returned list."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(function()), daemon=True)
    thread.start()
    return thread, result


def test_a_url_result_points_where_the_client_came_from(served):
    response = served.http.post("/v1/images/edits", headers={**AUTH, "Host": f"clarity.lan:{served.port}"},
                                files={"image": ("a.png", png(16, 16), "image/png")}, data=FAST)
    url = httpx.URL(response.json()["data"][0]["url"])
    assert (url.host, url.port) == ("clarity.lan", served.port)  # not localhost
    assert served.http.get(url.path).status_code == 200


def test_a_request_queued_past_the_deadline_gets_a_504_without_waiting_for_the_worker(served):
    slow, slow_result = in_background(lambda: post_edit(served.http, png(128, 128), **SLOW))
    time.sleep(0.5)
    started = time.monotonic()
    response = post_edit(served.http, png(16, 16))
    waited = time.monotonic() - started
    error = assert_openai_error(response, 504)
    assert error["code"] == "queue_timeout"
    assert response.headers["retry-after"]
    assert waited < QUEUE_TIMEOUT + 1.5
    slow.join(60)
    assert slow_result[0].status_code == 200  # the request that was running was not disturbed
    url = httpx.URL(slow_result[0].json()["data"][0]["url"])
    assert served.http.get(url.path).status_code == 200


def test_a_killed_worker_fails_its_request_fast_and_comes_back(served):
    slow, slow_result = in_background(lambda: post_edit(served.http, png(128, 128), **SLOW))
    time.sleep(1.0)
    os.kill(served.inference_worker_pid(), signal.SIGKILL)
    killed = time.monotonic()
    slow.join(20)
    assert slow_result, "the request of the killed worker is still hanging"
    error = assert_openai_error(slow_result[0], 503)
    assert error["code"] == "worker_restarted"
    assert time.monotonic() - killed < 5
    # While the worker restarts, new requests are told to retry rather than left waiting.
    early = post_edit(served.http, png(16, 16))
    assert early.status_code in (200, 503)
    served.wait_healthy(90)
    assert result_image(post_edit(served.http, png(24, 16), response_format="b64_json")).size == (48, 32)


def test_schema_fuzzing_finds_no_server_error(served):
    """Requests generated from /openapi.json (including the edits form) never get a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json", headers=AUTH)
    calls: dict[str, list[int]] = {}
    deadline = time.monotonic() + 45  # bounded whatever hypothesis decides to try

    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=6, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def call(case) -> None:
            if time.monotonic() < deadline:
                response = case.call(headers=AUTH, timeout=30)
                calls.setdefault(f"{case.method} {case.formatted_path}", []).append(response.status_code)

        call()
    edits = [status for name, statuses in calls.items() if "images/edits" in name for status in statuses]
    assert edits, calls  # the edits form was fuzzed, not only the simple routes
    server_errors = {name: statuses for name, statuses in calls.items() if any(s >= 500 for s in statuses)}
    assert not server_errors, server_errors
    served.wait_healthy(5)


def test_a_client_that_hangs_up_stops_its_running_upscale(served):
    impatient = httpx.Client(base_url=served.url, timeout=1.5)
    with pytest.raises(httpx.ReadTimeout):  # its upscale alone would take a minute or more
        post_edit(impatient, png(256, 256), **{**SLOW, "num_inference_steps": "100"})
    hung_up = time.monotonic()
    # The worker is free after the step it was in, not after 100 steps: the next request is
    # answered (a queued request waits at most QUEUE_TIMEOUT s before a 504).
    while (response := post_edit(served.http, png(16, 16))).status_code == 504:
        assert time.monotonic() - hung_up < 15, "the abandoned upscale kept the worker busy"
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 10
    while "stopped: its client disconnected" not in served.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the worker did not report stopping the abandoned request"
        time.sleep(0.2)


def test_stalled_uploads_do_not_hold_queue_slots(served):
    import socket

    # More stalled uploads than the queue has slots (16): headers and a few bytes, then nothing.
    stalled = []
    for _ in range(20):
        connection = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        connection.sendall(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1\r\n" + f"Authorization: Bearer {KEY}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=abc\r\nContent-Length: 100000\r\n\r\n--abc\r\n"
        )
        stalled.append(connection)
    try:
        time.sleep(0.3)
        response = post_edit(served.http, png(16, 16), response_format="b64_json")
        assert response.status_code == 200, response.text  # was a 429 queue_full
    finally:
        for connection in stalled:
            connection.close()


def test_a_trickling_upload_gets_a_408_and_frees_its_slot(served):
    body = b"x" * 1000
    head = (f"POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", served.port), timeout=UPLOAD_TIMEOUT + 10) as connection:
        connection.sendall(head + body[:100])  # ... and then nothing more
        started = time.monotonic()
        answer = b""
        while not answer.endswith(b"}}") and (chunk := connection.recv(65536)):
            answer += chunk
        answer = answer.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"code":"upload_timeout"' in answer
    assert time.monotonic() - started < UPLOAD_TIMEOUT + 5
    assert post_edit(served.http, png(16, 16)).status_code == 200


def test_a_queued_request_whose_client_left_is_skipped(tiny_weights, tmp_path):
    """The worker checks the registry before it starts a request (unit level: no timing involved)."""
    from fastapi import HTTPException

    from clarity.api.config import ServerConfig
    from clarity.api.handler import EditHandler
    from clarity.api.results import LocalResultStore
    from clarity.models.catalogue import Catalogue
    from clarity.serving.litserve.api import EditsLitAPI
    from clarity.serving.litserve.patches import BASE_URL_FIELD, REQUEST_ID_FIELD
    from clarity.serving.litserve.queue import CancelRegistry

    registry = CancelRegistry(tmp_path / "cancelled")
    handler = EditHandler(ServerConfig(weights=tiny_weights), Catalogue.discover(tiny_weights),
                          LocalResultStore(tmp_path / "out"))
    api = EditsLitAPI(handler, registry)

    class Upload:
        filename = "a.png"

        def __init__(self, data: bytes) -> None:
            self.file = io.BytesIO(data)

    class Form:
        def __init__(self, request_id: str) -> None:
            self.items = [(REQUEST_ID_FIELD, request_id), (BASE_URL_FIELD, "http://x"), ("image", Upload(png(16, 16))),
                          ("prompt", "x")]

        def multi_items(self):
            return self.items

    assert api.decode_request(Form("kept")).request_id == "kept"
    registry.cancel("gone")
    with pytest.raises(HTTPException) as refused:
        api.decode_request(Form("gone"))
    assert refused.value.status_code == 499
    registry.forget("gone")
    assert api.decode_request(Form("gone")).params.prompt == "x"
