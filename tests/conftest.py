"""Shared fixtures: the tiny SD-shaped model, written and loaded once per test session.

Every test runs on the tiny random model (see clarity/testing/tiny.py), saved to disk and
loaded back through the same loader as real weights, with no network.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
from PIL import Image

# No test may reach a model hub: fail loudly instead of downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Settings that keep a test upscale well under a second on two CPU cores.
FAST = {"num_inference_steps": 4, "creativity": 0.5}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from clarity.testing.tiny import save_tiny_weights

    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="session")
def upscaler(tiny_weights):
    from clarity import Upscaler

    return Upscaler.from_pretrained(tiny_weights, device="cpu")


def make_test_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic image with structure (gradients, a disc, stripes) and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 3) ** 2
    blue = np.where(disc, 220.0, 40.0) + 30 * np.sin(x / 2.0)
    array = np.stack([red, green, blue], axis=-1) + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return image.convert(mode) if mode != "RGB" else image


@pytest.fixture
def image():
    return make_test_image(40, 32)


@contextlib.contextmanager
def running_server(weights, output_dir, **options) -> Iterator:
    """A TestClient on an in-process server (LitServe's test harness), once its worker is ready.

    The SDKs can use the client as their `http_client` with base_url "http://testserver/v1".
    """
    from fastapi.testclient import TestClient
    from litserve.utils import wrap_litserve_start

    from clarity.api.config import ServerConfig
    from clarity.serving.litserve.server import build_server

    # Its own job store: a server in a test never resumes another test's jobs.
    options = {"public_url": "http://testserver", "data_dir": Path(tempfile.mkdtemp(prefix="clarity-data-")),
               **options}
    server = build_server(ServerConfig(weights=weights, accelerator="cpu", output_dir=output_dir, **options))
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:
            # Read by the worker spawned here: two torch threads per worker on a busy two-core
            # machine slow a tiny upscale from 0.1 s to several seconds.
            patch.setenv("OMP_NUM_THREADS", "1")
            started = stack.enter_context(wrap_litserve_start(server))
        client = stack.enter_context(TestClient(started.app))
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the inference worker did not become ready"
            time.sleep(0.2)
        yield client


def edit_handler(weights, output_dir, **options):
    """The API core's handler for the models in `weights`, under a `ServerConfig` of `options` (nothing loaded)."""
    from clarity.api.config import ServerConfig
    from clarity.api.handler import EditHandler
    from clarity.api.results import LocalResultStore
    from clarity.models.catalogue import Catalogue

    return EditHandler(ServerConfig(weights=weights, **options), Catalogue.discover(weights),
                       LocalResultStore(output_dir))


# --- a real server process ----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
#: Torch threads per inference worker. One keeps timings predictable on a loaded two-core
#: machine, where OpenMP threads spinning at barriers were seen to slow each request tenfold.
ONE_THREAD = "1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python server.py ...options` on 127.0.0.1, its output in a log file; on a free port, or on `port` (a
    test that restarts a server gives it its predecessor's, so that its clients find it again)."""

    def __init__(self, weights: Path, log: Path, options: list[str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        if "--data-dir" not in options:  # its own job store, unless a test restarts a server on one
            options = ["--data-dir", str(log.parent / f"data-{self.port}"), *options]
        command = [sys.executable, str(ROOT / "server.py"), "--weights", str(weights), "--host", "127.0.0.1",
                   "--port", str(self.port), "--accelerator", "cpu", *options]
        env = {**os.environ, "OMP_NUM_THREADS": ONE_THREAD}
        with open(log, "wb") as output:
            # Its own session, so that stop() can end it and all its children.
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=env)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_healthy(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.3)

    def inference_worker_pid(self) -> int:
        import psutil

        for child in psutil.Process(self.process.pid).children(recursive=True):
            if any("spawn_main" in part for part in child.cmdline()):
                return child.pid
        raise AssertionError("no inference worker process found")

    def __enter__(self) -> ServerProcess:
        """The server, once healthy (stopped again if it never is)."""
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
