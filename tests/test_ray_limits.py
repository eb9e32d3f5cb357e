"""`clarity serve --ray`'s own answers to --max-uploads and --queue-timeout, without a cluster: the ingress's
`EditsRouter` and the `UpscalerReplica` are plain classes (server.py makes them Serve deployments), run here as
Ray Serve runs them, on an event loop (the cluster itself: test_ray_serving.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from typing import Any

import httpx2 as httpx
import pytest
from conftest import FAST, edit_handler, make_test_image

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")

from clarity.serving.ray.calls import EditCall  # noqa: E402
from clarity.serving.ray.ingress import EditsRouter  # noqa: E402
from clarity.serving.ray.upscaler import UpscalerReplica  # noqa: E402

EDITS = {"type": "http", "method": "POST", "path": "/v1/images/edits", "headers": []}


class Upload:
    """One request through the router: its body arrives when `arrive` is set; what the router sent back."""

    def __init__(self, router: EditsRouter) -> None:
        self.router = router
        self.arrive = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        await self.arrive.wait()
        return {"type": "http.request", "body": b"a body", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def run(self) -> None:
        await self.router(dict(EDITS), self.receive, self.send)

    def status(self) -> int:
        return next(message["status"] for message in self.sent if message["type"] == "http.response.start")

    def error(self) -> dict[str, Any]:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"))


def test_uploads_beyond_max_uploads_get_429_too_many_uploads_until_one_is_in():
    reached: list[bytes] = []

    async def app(scope, receive, send) -> None:  # the edits route: records the body it was handed
        reached.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario() -> tuple[Upload, Upload, Upload, Upload]:
        router = EditsRouter(app, streamed=app, max_uploads=2)
        first, second, third, fourth = (Upload(router) for _ in range(4))
        running = [asyncio.create_task(upload.run()) for upload in (first, second)]
        await asyncio.sleep(0.05)  # both are receiving their bodies
        await asyncio.wait_for(third.run(), 10)  # refused at once: two bodies are being received
        first.arrive.set()
        await running[0]
        fourth.arrive.set()
        await fourth.run()  # a place is free again
        second.arrive.set()
        await running[1]
        return first, second, third, fourth

    first, second, third, fourth = asyncio.run(scenario())
    assert (first.status(), second.status(), third.status(), fourth.status()) == (200, 200, 429, 200)
    error = third.error()["error"]
    assert (error["code"], error["type"]) == ("too_many_uploads", "rate_limit_error")
    assert "receiving 2 other uploads" in error["message"]
    headers = dict(next(m for m in third.sent if m["type"] == "http.response.start")["headers"])
    assert int(headers[b"retry-after"]) > 0
    assert reached == [b"a body"] * 3


def edit_call(request_id: str, received_at: float) -> EditCall:
    image = io.BytesIO()
    make_test_image(24, 16).save(image, "PNG")
    form = {"prompt": "x", "response_format": "b64_json", **{name: str(value) for name, value in FAST.items()}}
    request = httpx.Request("POST", "http://testserver/v1/images/edits", data=form,
                            files={"image": ("a.png", image.getvalue(), "image/png")})
    return EditCall(request.read(), request.headers["content-type"], request_id, "http://testserver", received_at)


def test_an_edit_that_waited_past_queue_timeout_is_answered_504_without_running(tiny_weights, tmp_path, caplog,
                                                                              monkeypatch):
    # A replica records its metrics with Ray; this test process may record LitServe's already (its in-process
    # servers), and a process records into one system only. Metrics are not what this test is about.
    monkeypatch.setattr("clarity.serving.ray.upscaler.install_metrics", lambda: None)
    replica = UpscalerReplica(edit_handler(tiny_weights, tmp_path, queue_timeout=2), "cpu")
    # The `clarity` logger writes to the stderr of its first configuration and does not propagate: watch it here.
    monkeypatch.setattr(logging.getLogger("clarity"), "handlers", [caplog.handler])
    late = asyncio.run(replica.edit(edit_call("req_late", time.time() - 3)))
    assert late.status == 504, late.body
    assert late.body["error"]["code"] == "queue_timeout" and "limit of 2 s" in late.body["error"]["message"]
    assert int(late.headers["Retry-After"]) > 0  # the SDKs retry it; the job runner queues a job again
    on_time = asyncio.run(replica.edit(edit_call("req_on_time", time.time() - 1)))
    assert on_time.status == 200 and on_time.body["size"] == "48x32", on_time.body
    started = [record.getMessage() for record in caplog.records if "started:" in record.getMessage()]
    assert any("req_on_time" in line for line in started), started
    assert not any("req_late" in line for line in started), started
