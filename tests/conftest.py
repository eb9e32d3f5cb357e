"""Shared fixtures: the tiny SD-shaped model, written and loaded once per test session.

Every test runs on the tiny random model (see clarity/models/tiny.py), saved to disk and
loaded back through the same loader as real weights, with no network.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

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
    from clarity.models.tiny import save_tiny_weights

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

    from clarity.serving.app import build_server

    server = build_server(weights, accelerator="cpu", output_dir=output_dir, public_url="http://testserver",
                          **options)
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
