"""`clarity serve --ray` on a real two-node Ray cluster on loopback addresses.

A head node (127.0.0.2) and a worker node (127.0.0.3), each a `ray start --block` process in a session
of its own, with explicit ports and one `gpu_slot` each standing for a GPU (on Linux Ray rewrites
127.0.0.1, hence .2 and .3); the server is `clarity serve --ray HEAD:PORT` in a third session, with
one upscaler replica per node running the tiny model on the CPU. Killing a node is killing every
process of its session with SIGKILL. The tests run in file order on one cluster (the node kill, then
the stop, come last). About two minutes on two cores; marked `cluster`.

The result folder is local to each node: on one host the nodes share it, as a shared filesystem would
(README, "Beyond one machine").
"""

from __future__ import annotations

import base64
import io
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx2 as httpx
import openai
import pytest
from conftest import FAST, free_port, make_test_image
from PIL import Image
from ray_cluster import HEAD_IP, Cluster, Session, titles, two_node_cluster
from standardwebhooks import Webhook
from test_webhooks import Receiver, new_secret

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.cluster

KEY = "cluster-key"
WEBHOOK_SECRET = new_secret()


def png(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_test_image(width, height, seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_node_cluster() as started:
        yield started


@dataclass
class Server:
    url: str
    session: Session
    http: httpx.Client

    def sdk(self, **options) -> openai.OpenAI:
        return openai.OpenAI(api_key=KEY, base_url=f"{self.url}/v1", **{"max_retries": 0, **options})


@pytest.fixture(scope="module")
def server(cluster: Cluster, tiny_weights) -> Iterator[Server]:
    port = free_port()
    command = [sys.executable, "-m", "clarity.cli", "serve", "--ray", cluster.address, "--weights", str(tiny_weights),
               "--host", HEAD_IP, "--port", str(port), "--proxy-location", "HeadOnly", "--replica-resource",
               "gpu_slot", "--replicas", "2", "--max-queue", "2", "--accelerator", "cpu", "--api-key", KEY,
               "--data-dir", str(cluster.root / "data"), "--shutdown-timeout", "20", "--webhook-allow", "127.0.0.1/32"]
    session = Session(command, cluster.root / "server.log", env={"CLARITY_WEBHOOK_SECRET": WEBHOOK_SECRET})
    try:
        session.wait_for("serving clarity-upscaler .* through Ray Serve", 240)
        with httpx.Client(base_url=f"http://{HEAD_IP}:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as http:
            yield Server(f"http://{HEAD_IP}:{port}", session, http)
    finally:
        session.kill()


def edit(client: openai.OpenAI, image: bytes, **extra):
    return client.images.edit(model="clarity-upscaler", image=("photo.png", image, "image/png"), prompt="a photo",
                              response_format=extra.pop("response_format", "b64_json"), extra_body={**FAST, **extra})


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_sdk_edits_through_the_cluster_on_both_replicas(server):
    client = server.sdk()
    result = edit(client, png(40, 32), seed=7)
    assert decoded(result.data[0].b64_json).size == (80, 64)
    assert (result.size, result.data[0].model_extra["seed"]) == ("80x64", 7)
    assert result._request_id  # Ray Serve's request id, also in the replica's log lines
    with ThreadPoolExecutor(2) as pool:  # one per replica: each replica runs one edit at a time
        sizes = list(pool.map(lambda seed: edit(client, png(24, 24), seed=seed).size, [1, 2]))
    assert sizes == ["48x48", "48x48"]
    assert server.http.get("/v1/models").json()["data"][0]["id"] == "clarity-upscaler"


def test_the_ingress_and_the_job_actor_run_on_the_head_node(server, cluster):
    """Placed by the head node's own resource (`node:__internal_head__`), not by its address."""
    on_head, on_worker = titles(cluster.head.process.pid), titles(cluster.worker.process.pid)
    for actor in ("ray::ServeReplica:clarity:ingress", "ray::JobsActor"):
        assert any(title.startswith(actor) for title in on_head), (actor, on_head)
        assert not any(title.startswith(actor) for title in on_worker), (actor, on_worker)
    # The upscaler replicas, one per node, each holding its node's `gpu_slot`.
    for node in (on_head, on_worker):
        assert sum(title.startswith("ray::ServeReplica:clarity:upscaler") for title in node) == 1, node


def test_a_url_result_is_fetched_through_the_server(server):
    result = edit(server.sdk(), png(40, 32), response_format="url")
    url = result.data[0].url
    assert url.startswith(f"{server.url}/v1/files/")
    fetched = httpx.get(url, timeout=30)  # no key: the unguessable name is the credential
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (80, 64)


def test_refusals_have_openai_shape(server):
    with pytest.raises(openai.BadRequestError) as bad:
        edit(server.sdk(), png(40, 32), creativity=7)  # refused by the replica's parse
    assert bad.value.body["param"] == "creativity"
    with pytest.raises(openai.NotFoundError):
        server.sdk().images.edit(model="dall-e-2", image=("a.png", png(8, 8), "image/png"), prompt="x")
    anonymous = httpx.post(f"{server.url}/v1/images/edits", files={"image": ("a.png", png(8, 8), "image/png")})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # the cluster's metrics need the key too


def test_a_streamed_edit_and_a_job_keep_their_state_in_the_shared_store(server):
    events = list(server.sdk().images.edit(model="clarity-upscaler", image=("a.png", png(40, 32), "image/png"),
                                           prompt="x", stream=True, partial_images=1,
                                           extra_body={"num_inference_steps": 6, "creativity": 1}))
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert decoded(events[-1].b64_json).size == (80, 64)

    form = {"prompt": "x", "response_format": "b64_json", **{name: str(value) for name, value in FAST.items()}}
    job = server.http.post("/v1/jobs", files={"image": ("a.png", png(40, 32), "image/png")}, data=form).json()
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
        job = server.http.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["result"]["size"] == "80x64" and job["result"]["data"][0]["b64_json"]
    assert server.http.get("/v1/jobs").json()["data"][0]["id"] == job["id"]
    # The store's own errors cross from the job actor whole: a finished job cannot be cancelled.
    cancelled = server.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 409 and cancelled.json()["error"]["code"] == "job_finished"
    assert server.http.delete(f"/v1/jobs/{job['id']}").status_code == 200
    assert server.http.get(f"/v1/jobs/{job['id']}").json()["error"]["code"] == "job_not_found"


def test_a_job_sends_its_webhooks_signed_from_the_job_actor(server):
    receiver = Receiver([200])
    try:
        form = {"prompt": "x", "response_format": "b64_json", "webhook_url": receiver.url,
                "webhook_events": "started,completed", **{name: str(value) for name, value in FAST.items()}}
        refused = server.http.post("/v1/jobs", files={"image": ("a.png", png(24, 24), "image/png")},
                                   data={**form, "webhook_url": "http://10.1.2.3/hook"})  # off --webhook-allow
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook_url"
        job = server.http.post("/v1/jobs", files={"image": ("a.png", png(24, 24), "image/png")}, data=form).json()
        deadline = time.monotonic() + 120
        while len(receiver.received) < 2:
            assert time.monotonic() < deadline, f"webhooks received: {receiver.received}"
            time.sleep(0.2)
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
    deliveries = [Webhook(WEBHOOK_SECRET).verify(body, headers) for _, headers, body in receiver.received]
    # A job this small ends before the runner's watcher looks: its started event is sent with its completed one.
    assert sorted(delivery["type"] for delivery in deliveries) == ["job.completed", "job.started"]
    assert {delivery["data"]["id"] for delivery in deliveries} == {job["id"]}
    finished = server.http.get(f"/v1/jobs/{job['id']}").json()
    assert finished["status"] == "succeeded" and deliveries[-1]["data"]["result"] == finished["result"]


def test_load_beyond_the_queue_gets_429_queue_full(server):
    barrier = threading.Barrier(10)

    def run(index: int) -> httpx.Response:
        barrier.wait()
        return server.http.post("/v1/images/edits", files={"image": ("a.png", png(48, 48, index), "image/png")},
                                data={"prompt": "x", "num_inference_steps": "10", "creativity": "1",
                                      "response_format": "b64_json"})

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(run, range(10)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            error = response.json()["error"]
            assert (error["code"], error["type"]) == ("queue_full", "rate_limit_error")
            assert int(response.headers["retry-after"]) > 0
        else:
            assert decoded(response.json()["data"][0]["b64_json"]).size == (96, 96)


def test_a_client_that_disconnects_stops_its_upscale(server):
    started = "started: model clarity-upscaler, 160x120"  # a size no other test uses
    with pytest.raises(httpx.TimeoutException):  # its 100 steps would take about 40 s
        server.http.post("/v1/images/edits", files={"image": ("a.png", png(160, 120), "image/png")},
                         data={"prompt": "x", "num_inference_steps": "100", "creativity": "1"}, timeout=4)
    request_id = server.session.wait_for(rf"request (\S+) {started}", 30)[1]
    server.session.wait_for(rf"request {re.escape(request_id)} stopped: its client disconnected", 30)


def test_a_worker_node_killed_mid_request_costs_a_503_that_the_sdk_retries(server, cluster):
    answers: list[httpx.Response] = []

    def record(response: httpx.Response) -> None:
        response.read()
        answers.append(response)

    # The SDK's own retries, with a hook that sees every answer it gets, retried ones included.
    client = server.sdk(max_retries=2, http_client=httpx.Client(timeout=120, event_hooks={"response": [record]}))
    started = "started: model clarity-upscaler, 72x56"  # a size no other test uses

    def run(seed: int) -> str:
        return edit(client, png(72, 56), num_inference_steps=80, creativity=1, seed=seed).size

    with ThreadPoolExecutor(2) as pool:
        results = [pool.submit(run, seed) for seed in (1, 2)]
        deadline = time.monotonic() + 60
        while server.session.text().count(started) < 2:  # one on each node's replica (one edit each at a time)
            assert time.monotonic() < deadline, "the two edits did not start"
            time.sleep(0.2)
        cluster.worker.kill()
        assert [result.result() for result in results] == ["144x112", "144x112"]
    failed = [answer for answer in answers if answer.status_code != 200]
    assert len(failed) == 1 and len(answers) == 3, [answer.status_code for answer in answers]
    assert failed[0].status_code == 503 and failed[0].json()["error"]["code"] == "worker_restarted"
    assert int(failed[0].headers["retry-after"]) > 0
    for seed in (3, 4, 5):  # later requests: the head's replica alone
        assert edit(server.sdk(), png(24, 24), seed=seed).size == "48x48"


def test_sigterm_removes_the_application_and_ray_serve_and_exits_0(server):
    server.session.process.send_signal(signal.SIGTERM)
    assert server.session.process.wait(60) == 0, server.session.text()[-3000:]
    with pytest.raises(httpx.TransportError):  # it started Ray Serve, so it stopped it: the port is closed
        server.http.get("/health", timeout=10)
