"""The official OpenAI JavaScript SDK (`openai` on npm, pinned in tests/js), and curl, against a real server.

Needs Node and `npm ci --prefix tests/js` (part of the README's test command); without Node the
tests are skipped with that reason.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess

import pytest
from conftest import ROOT, ServerProcess, make_test_image
from PIL import Image

KEY = "sk-js-sdk-test"
FAST = {"num_inference_steps": 2, "creativity": 0.5}
JS = ROOT / "tests" / "js"

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js for the JavaScript SDK")


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    if not (JS / "node_modules" / "openai").is_dir():
        pytest.fail("the JavaScript SDK is not installed: run `npm ci --prefix tests/js`")
    with ServerProcess(tiny_weights, tmp_path_factory.mktemp("js") / "server.log", ["--api-key", KEY]) as process:
        yield process


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("js-input") / "photo.png"
    make_test_image(40, 32).save(path)
    return path


def sdk_call(server, image_path, key: str = KEY, **request) -> dict:
    """`client.images.edit({image, prompt, ...request})` in Node; its response or error as a dict."""
    command = ["node", str(JS / "sdk_call.mjs"), f"{server.url}/v1", key, str(image_path), json.dumps(request)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout.splitlines()[-1])


def test_an_edit_returns_the_upscaled_image_and_its_request_id(server, image_path):
    result = sdk_call(server, image_path, model="clarity-upscaler", response_format="b64_json", **FAST)
    assert result["ok"], result
    response = result["response"]
    image = Image.open(io.BytesIO(base64.b64decode(response["data"][0]["b64_json"])))
    assert image.size == (80, 64) and response["size"] == "80x64"
    assert result["request_id"].startswith("req_")  # the id the server's log lines carry


def test_a_streamed_edit_yields_partial_images_then_the_result(server, image_path):
    result = sdk_call(server, image_path, stream=True, partial_images=2, num_inference_steps=6, creativity=0.5)
    assert result["ok"], result
    events = result["events"]
    assert [event["type"] for event in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [event["partial_image_index"] for event in events[:2]] == [0, 1]
    image = Image.open(io.BytesIO(base64.b64decode(events[-1]["b64_json"])))
    assert image.size == (80, 64) and events[-1]["size"] == "80x64"


def test_a_url_result_can_be_fetched(server, image_path):
    result = sdk_call(server, image_path, scale_factor=3, **FAST)
    assert result["ok"], result
    fetched = server.http.get(result["response"]["data"][0]["url"])
    assert Image.open(io.BytesIO(fetched.content)).size == (120, 96)


@pytest.mark.parametrize(
    ("request_fields", "status", "error_class", "param"),
    [
        ({"creativity": 7}, 400, "BadRequestError", "creativity"),
        ({"size": "20x20"}, 400, "BadRequestError", "size"),  # a box smaller than the image
        ({"model": "dall-e-2"}, 404, "NotFoundError", "model"),
    ],
)
def test_errors_reach_the_sdk_as_its_own_classes_naming_the_field(server, image_path, request_fields, status,
                                                                  error_class, param):
    result = sdk_call(server, image_path, **{**FAST, **request_fields})
    assert not result["ok"]
    assert (result["status"], result["class"], result["param"]) == (status, error_class, param), result


def test_a_wrong_key_is_an_authentication_error(server, image_path):
    result = sdk_call(server, image_path, key="sk-wrong", **FAST)
    assert (result["ok"], result["status"], result["class"]) == (False, 401, "AuthenticationError"), result


@pytest.mark.parametrize("size", ["256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "auto"])
def test_every_sdk_size_fits_a_non_square_photo(server, image_path, size):
    # The photo is 40x32: the output is the largest upscale that fits in the box, at most 16x.
    result = sdk_call(server, image_path, size=size, response_format="b64_json", num_inference_steps=1,
                      creativity=0.3)
    assert result["ok"], result
    width, height = Image.open(io.BytesIO(base64.b64decode(result["response"]["data"][0]["b64_json"]))).size
    assert result["response"]["size"] == f"{width}x{height}"
    box = (2 * 40, 2 * 32) if size == "auto" else tuple(int(side) for side in size.split("x"))
    assert width <= box[0] and height <= box[1] and abs(width / height - 40 / 32) < 0.02
    assert width == min(box[0], 16 * 40) or height == min(box[1], 16 * 32)


def test_curl_with_a_size_box(server, image_path):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: the README's examples use it (apt-get install curl)")
    command = ["curl", "-sS", f"{server.url}/v1/images/edits", "-H", f"Authorization: Bearer {KEY}",
               "-F", "model=clarity-upscaler", "-F", f"image=@{image_path}", "-F", "prompt=a photo",
               "-F", "size=1024x1024", "-F", "response_format=b64_json", "-F", "num_inference_steps=1"]
    body = json.loads(subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout)
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert image.size == (640, 512) and body["size"] == "640x512"  # 16x, the most that fits and is allowed
