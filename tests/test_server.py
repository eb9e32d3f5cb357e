"""The OpenAI-compatible server, driven through the official `openai` SDK as a user would.

One LitServe server (with an API key, one CPU worker on the tiny model) serves the whole
module; a second one without workers or a key covers the open and not-ready cases cheaply.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from conftest import edit_handler, make_test_image, running_server
from fastapi.testclient import TestClient
from PIL import Image
from starlette.routing import Route

import clarity
from clarity.api.config import ServerConfig
from clarity.api.http import is_open
from clarity.api.results import LocalResultStore
from clarity.api.wire import known_fields
from clarity.errors import ParamError
from clarity.serving.litserve.server import build_server

KEY = "sk-test-clarity"
#: Request body limit of the test server (bytes): far above the test images, cheap to exceed.
LIMIT = 1_000_000
#: Fast engine settings for every request (well under a second on two cores).
FAST = {"num_inference_steps": 2, "creativity": 0.5}


def png_bytes(width: int = 40, height: int = 32, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_test_image(width, height, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def http(tiny_weights, tmp_path_factory):
    """A TestClient on a running server with auth on (the SDK uses it as its http_client)."""
    with running_server(tiny_weights, tmp_path_factory.mktemp("outputs"), api_key=KEY,
                        max_payload_mb=LIMIT / 1e6) as client:
        yield client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(api_key=KEY, base_url="http://testserver/v1", http_client=http, max_retries=0)


def edit(client, image: bytes | tuple | list | None = None, **kwargs):
    """`client.images.edit` with the fast settings merged into extra_body."""
    extra = {**FAST, **kwargs.pop("extra_body", {})}
    image = image if image is not None else ("photo.png", png_bytes(), "image/png")
    return client.images.edit(model="clarity-upscaler", image=image, prompt=kwargs.pop("prompt", "a photo"),
                              extra_body=extra, **kwargs)


# --- the happy path ------------------------------------------------------------------------------


def test_sdk_edit_returns_b64_image_at_twice_the_size(client):
    response = edit(client, prompt="sharp details", response_format="b64_json")
    assert len(response.data) == 1
    item = response.data[0]
    image = decode(item.b64_json)
    assert image.format == "PNG" and image.size == (80, 64)
    assert item.revised_prompt == "sharp details"
    assert response.size == "80x64" and response.output_format == "png"
    assert response.created > time.time() - 60


def test_url_mode_is_the_default_and_the_url_serves_the_image(client, http):
    response = edit(client, image=png_bytes())  # raw bytes: the SDK sends `upload`, octet-stream
    url = response.data[0].url
    assert url.startswith("http://testserver/v1/files/")
    # Result URLs are capabilities: fetched without the API key, like OpenAI's signed URLs.
    fetched = http.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (80, 64)
    # A guessed name is not found, and the error has OpenAI's shape.
    missing = http.get("/v1/files/" + "A" * 43 + ".png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"


@pytest.mark.parametrize(("output_format", "pil_format"),
                         [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP"), ("avif", "AVIF"), ("gif", "GIF")])
def test_every_output_format_decodes_at_the_right_size(client, output_format, pil_format):
    response = edit(client, response_format="b64_json", output_format=output_format, output_compression=80)
    image = decode(response.data[0].b64_json)
    assert image.format == pil_format
    assert image.size == (80, 64)
    assert response.output_format == output_format


def test_scale_factor_and_size_set_the_output_size(client):
    tripled = edit(client, response_format="b64_json", extra_body={"scale_factor": 3})
    assert decode(tripled.data[0].b64_json).size == (120, 96)
    sized = edit(client, response_format="b64_json", size="60x48")
    assert decode(sized.data[0].b64_json).size == (60, 48)
    assert sized.size == "60x48"
    agreeing = edit(client, response_format="b64_json", size="120x96", extra_body={"scale_factor": 3})
    assert decode(agreeing.data[0].b64_json).size == (120, 96)


#: The sizes the typed SDKs offer, and the output each gives a 48x32 photo and a 32x48 one: the largest
#: upscale that fits in the box, at most 16x.
SDK_SIZES = [
    ("256x256", (256, 171), (171, 256)),
    ("512x512", (512, 341), (341, 512)),
    ("1024x1024", (768, 512), (512, 768)),
    ("1536x1024", (768, 512), (512, 768)),
    ("1024x1536", (768, 512), (512, 768)),
    ("auto", (96, 64), (64, 96)),
]


@pytest.mark.parametrize(("size", "landscape", "portrait"), SDK_SIZES)
def test_size_is_a_box_the_output_fits_in_for_every_sdk_size(client, size, landscape, portrait):
    for photo, expected in (((48, 32), landscape), ((32, 48), portrait)):
        response = edit(client, image=("photo.png", png_bytes(*photo), "image/png"), size=size,
                        response_format="b64_json", extra_body={"num_inference_steps": 1, "creativity": 0.3})
        assert decode(response.data[0].b64_json).size == expected
        assert response.size == f"{expected[0]}x{expected[1]}"  # the real output size


def test_seed_changes_pixels_and_n_gives_consecutive_seeds(client):
    def pixels(response, index=0):
        return np.asarray(decode(response.data[index].b64_json), dtype=np.int16)

    first = edit(client, response_format="b64_json", extra_body={"seed": 7})
    again = edit(client, response_format="b64_json", extra_body={"seed": 7})
    other = edit(client, response_format="b64_json", extra_body={"seed": 8})
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 0.5

    pair = edit(client, response_format="b64_json", n=2, extra_body={"seed": 7})
    assert [item.model_extra["seed"] for item in pair.data] == [7, 8]
    assert np.array_equal(pixels(pair, 0), pixels(first))
    assert np.array_equal(pixels(pair, 1), pixels(other))


def test_models_list_has_the_openai_shape(client, http):
    assert [model.id for model in client.models.list()] == ["clarity-upscaler"]
    body = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert body["object"] == "list"
    assert body["data"][0]["object"] == "model" and body["data"][0]["owned_by"] == "clarity"


# --- errors the SDK turns into typed exceptions --------------------------------------------------


def test_out_of_range_creativity_names_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, extra_body={"creativity": 2})
    assert caught.value.status_code == 400
    assert caught.value.param == "creativity"
    assert "<= 1" in caught.value.message


def test_unknown_field_suggests_the_nearest_one(client):
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, extra_body={"creativty": 0.4})
    assert caught.value.param == "creativty"
    assert "did you mean 'creativity'" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, extra_body={"output_formt": "png"})
    assert "did you mean 'output_format'" in caught.value.message


@pytest.mark.parametrize(("field", "text"), [("n", "\u0663"), ("n", "1_000"), ("seed", "1_000"),
                                           ("seed", "\u0661\u0662"), ("creativity", "nan"),
                                           ("output_compression", "9e1")])
def test_numbers_are_plain_ascii_decimals_in_every_field(client, field, text):
    # Python's int() and float() take Arabic-Indic digits (n=\u0663 gave 3 images), underscores and
    # nan; a form field does not.
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, extra_body={field: text})
    assert caught.value.param == field


def test_error_messages_echo_a_short_prefix_and_integer_limits(client):
    for digits in (60, 5000):  # a number over the limit; one too long to read as a number at all
        with pytest.raises(openai.BadRequestError) as caught:
            edit(client, extra_body={"seed": "7" * digits})
        assert caught.value.param == "seed" and len(caught.value.message) < 200
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, extra_body={"seed": "7" * 60})
    assert "<= 4294967295" in caught.value.message


def test_a_file_that_is_not_an_image_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, image=b"this is not an image")  # the SDK names it `upload`
    assert caught.value.param == "image"


def test_two_images_are_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, image=[("a.png", png_bytes(), "image/png"), ("b.png", png_bytes(), "image/png")])
    assert caught.value.param == "image"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.edit(model="dall-e-2", image=("a.png", png_bytes(), "image/png"), prompt="x")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "20x20"}, "size"),  # a box smaller than the 40x32 image
        ({"size": "400x30"}, "size"),  # no room for the image's height
        ({"size": "60x48", "extra_body": {"scale_factor": 3}}, "size"),  # a 120x96 output does not fit
        ({"size": "big"}, "size"),
        ({"n": 5}, "n"),
        ({"output_format": "bmp"}, "output_format"),
        ({"response_format": "json"}, "response_format"),
        ({"mask": ("mask.png", png_bytes(20, 20), "image/png")}, "mask"),  # not the input's shape
        ({"mask": ("mask.png", b"not an image", "image/png")}, "mask"),
    ],
)
def test_invalid_openai_fields_name_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client, **kwargs)
    assert caught.value.param == param


def test_mask_keeps_its_opaque_area_as_the_original(client):
    # Opaque left half, transparent right half: OpenAI's "transparent = edit".
    mask = Image.new("RGBA", (40, 32), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 20, 32))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    source = png_bytes()
    result = decode(edit(client, image=source, mask=("mask.png", buffer.getvalue(), "image/png"),
                         response_format="b64_json").data[0].b64_json)
    original = Image.open(io.BytesIO(source)).convert("RGB").resize((80, 64), Image.Resampling.LANCZOS)
    # The edge at column 40 is softened by a Gaussian of radius 5: compare well clear of it.
    assert np.array_equal(np.asarray(result)[:, :20], np.asarray(original)[:, :20])
    assert not np.array_equal(np.asarray(result)[:, 60:], np.asarray(original)[:, 60:])


def test_a_stream_flag_that_is_not_a_boolean_is_refused_naming_it(http):
    response = http.post(
        "/v1/images/edits",
        headers={"Authorization": f"Bearer {KEY}"},
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"model": "clarity-upscaler", "prompt": "x", "stream": "maybe"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"


# --- auth ----------------------------------------------------------------------------------------


def test_wrong_key_is_an_authentication_error(http):
    wrong = openai.OpenAI(api_key="sk-wrong", base_url="http://testserver/v1", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        edit(wrong)
    assert caught.value.status_code == 401
    assert "sk-wrong" not in caught.value.message


def test_every_route_but_the_open_ones_needs_the_key(http):
    for path in ["/health", "/openapi.json", "/docs", "/redoc", "/docs/assets/swagger-ui.css", "/",
                 "/playground/params.json", "/playground/playground.js"]:
        assert http.get(path).status_code == 200, path
    # Every route the app has, whoever added it (LitServe, the API core), unless OPEN_PATHS names it.
    guarded = {(method, route.path) for route in http.app.routes if isinstance(route, Route)
               for method in route.methods - {"HEAD"} if not is_open(route.path)}
    assert {("GET", "/info"), ("GET", "/v1/models"), ("POST", "/v1/images/edits")} <= guarded
    for method, path in sorted(guarded):
        response = http.request(method, re.sub(r"\{[^}]+\}", "x", path))
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_open_without_the_key_and_load_nothing_from_elsewhere(http, page):
    response = http.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>Clarity API</title>" in response.text
    assets = re.findall(r'<(?:script|link)[^>]*?(?:src|href)="([^"]+)"', response.text)
    assert assets and not [url for url in assets if not url.startswith("/") or url.startswith("//")], assets
    assert "cdn." not in response.text and "fonts.googleapis" not in response.text
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for url in assets:
        served = http.get(url)
        assert served.status_code == 200, url
        assert served.headers["content-type"].startswith(types[os.path.splitext(url)[1]]), url


def test_openapi_schema_describes_the_public_api_only(http):
    schema = http.get("/openapi.json").json()  # no key
    assert schema["info"]["title"] == "Clarity"
    assert schema["info"]["version"] == clarity.__version__
    assert set(schema["paths"]) == {"/v1/images/edits", "/v1/models", "/v1/models/{model_id}",
                                    "/v1/files/{name}", "/health", "/v1/jobs", "/v1/jobs/{job_id}",
                                    "/v1/jobs/{job_id}/cancel"}
    assert set(schema["paths"]["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "text/event-stream" in schema["paths"]["/v1/images/edits"]["post"]["responses"]["200"]["content"]
    job_form = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(job_form["properties"]) == {*known_fields(), "webhook_url", "webhook_events"}
    edits = schema["paths"]["/v1/images/edits"]["post"]
    form = edits["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == set(known_fields()) and form["required"] == ["image"]
    assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(edits["responses"])
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "The server's API key (`--api-key`)."}
    assert edits["security"] == [{"bearerAuth": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert "/info" not in json.dumps(schema["paths"])


def test_unknown_route_is_a_404_in_openai_shape(http):
    response = http.get("/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404
    assert "message" in response.json()["error"]


# --- a server without a key, and without workers -------------------------------------------------


@pytest.fixture(scope="module")
def open_http(tiny_weights, tmp_path):
    """No key, a 1 kB body limit, and no inference workers started (so never ready)."""
    config = ServerConfig(weights=tiny_weights, accelerator="cpu", output_dir=tmp_path, max_payload_mb=0.001)
    server = build_server(config)
    return TestClient(server.app)


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory):
    return tmp_path_factory.mktemp("open")


def test_without_a_key_routes_are_open(open_http):
    assert open_http.get("/v1/models").json()["data"][0]["id"] == "clarity-upscaler"


def test_not_ready_is_a_503_the_sdk_may_retry(open_http):
    client = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=open_http, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        edit(client, image=("a.png", png_bytes(8, 8), "image/png"))
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"]


def test_body_over_the_limit_is_a_413_before_any_work(open_http):
    response = open_http.post("/v1/images/edits", files={"image": ("a.png", png_bytes(), "image/png")})
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]


def test_body_over_the_limit_is_a_413_even_without_a_content_length(http):
    boundary = "clarityboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def chunks():  # a generator body is sent chunked, with no Content-Length to check up front
        yield head
        for _ in range(LIMIT // 65536 + 2):
            yield bytes(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = http.post(
        "/v1/images/edits",
        content=chunks(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"


# --- result URLs a remote client can open --------------------------------------------------------


def _url_for(http, headers: dict[str, str]) -> str:
    response = http.post("/v1/images/edits", files={"image": ("a.png", png_bytes(16, 16), "image/png")},
                         data={"prompt": "x", **FAST}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["url"]


def test_result_urls_follow_the_host_the_client_came_by(tiny_weights, tmp_path_factory):
    with running_server(tiny_weights, tmp_path_factory.mktemp("by-host"), public_url=None) as http:
        url = _url_for(http, {"Host": "gpu-box.studio.lan:8000"})
        assert url.startswith("http://gpu-box.studio.lan:8000/v1/files/")  # never localhost
        assert http.get(urlsplit(url).path).status_code == 200
        # Forwarded headers count only from proxies the server is told to trust.
        forged = {"Host": "gpu-box", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "elsewhere.example"}
        assert _url_for(http, forged).startswith("http://gpu-box/v1/files/")
    with running_server(tiny_weights, tmp_path_factory.mktemp("proxied"), public_url=None,
                        forwarded_allow_ips=("*",)) as http:
        proxied = {"Host": "127.0.0.1:8000", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "upscale.studio.com"}
        assert _url_for(http, proxied).startswith("https://upscale.studio.com/v1/files/")


def test_forwarded_headers_are_trusted_by_address_or_network():
    from clarity.api.http import ForwardedHeaders

    def scope(client: str) -> dict:
        headers = [(b"host", b"10.0.0.5:8000"), (b"x-forwarded-proto", b"https, http"),
                   (b"x-forwarded-host", b"photos.example, internal")]
        return {"type": "http", "scheme": "http", "headers": headers, "client": (client, 50000)}

    forwarded = ForwardedHeaders(["10.1.0.0/16", "192.168.0.7"])
    assert forwarded.base_url(scope("10.1.2.3")) == "https://photos.example"
    assert forwarded.base_url(scope("192.168.0.7")) == "https://photos.example"
    assert forwarded.base_url(scope("192.168.0.8")) == "http://10.0.0.5:8000"
    assert ForwardedHeaders().base_url(scope("10.1.2.3")) == "http://10.0.0.5:8000"
    with pytest.raises(ParamError) as caught:
        ServerConfig(forwarded_allow_ips=("proxy.example",))
    assert caught.value.param == "forwarded_allow_ips"


# --- pieces --------------------------------------------------------------------------------------


def test_file_store_expires_results_and_ignores_foreign_names(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    (folder / "notes.txt").write_text("not ours")
    store = LocalResultStore(folder, ttl_seconds=60)
    name = store.save(b"data", "png")
    assert store.find(name).read_bytes() == b"data"
    assert store.find("../notes.txt") is None and store.find("notes.txt") is None
    old = time.time() - 120
    os.utime(folder / name, (old, old))
    os.utime(folder / "notes.txt", (old, old))
    assert store.find(name) is None and not (folder / name).exists()
    store.purge_expired()
    assert (folder / "notes.txt").exists()


def test_the_store_keeps_to_its_quota_expired_results_first(tmp_path_factory):
    from clarity.api.results import StorageFull

    folder = tmp_path_factory.mktemp("quota")
    store = LocalResultStore(folder, ttl_seconds=60, max_bytes=3000)
    first = store.save(bytes(2000), "png")
    with pytest.raises(StorageFull, match="full"):
        store.save(bytes(2000), "png")
    old = time.time() - 120
    os.utime(folder / first, (old, old))  # expired: deleted to make room
    assert store.find(store.save(bytes(2000), "png")) is not None
    assert not (folder / first).exists()


def test_the_files_route_serves_regular_files_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("links")
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.txt"
    secret.write_text("not a result")
    name = "A" * 43 + ".png"  # a valid token name
    (folder / name).symlink_to(secret)
    (folder / ("B" * 43 + ".png")).mkdir()
    store = LocalResultStore(folder, ttl_seconds=60)
    assert store.find(name) is None and store.find("B" * 43 + ".png") is None


def test_url_results_have_a_disk_quota_and_expire_on_a_timer(tiny_weights, tmp_path_factory, monkeypatch):
    from clarity.serving.litserve import server

    monkeypatch.setattr(server, "PURGE_INTERVAL", 0.2)
    outputs = tmp_path_factory.mktemp("timer")
    with running_server(tiny_weights, outputs, result_ttl_seconds=1) as http:
        client = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0)
        edit(client)
        assert len(list(outputs.glob("*.png"))) == 1
        time.sleep(2.5)  # no other request: the timer deletes it
        assert list(outputs.glob("*.png")) == []
    full = tmp_path_factory.mktemp("full")
    (full / ("A" * 43 + ".png")).write_bytes(bytes(1_500_000))  # earlier results, not yet expired
    with running_server(tiny_weights, full, max_result_mb=1) as http:
        client = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            edit(client)  # refused before any work
        assert caught.value.status_code == 503 and caught.value.code == "storage_full"
        assert "retry-after" in caught.value.response.headers
        assert edit(client, response_format="b64_json").data[0].b64_json  # inline results need no storage
    with running_server(tiny_weights, tmp_path_factory.mktemp("tiny-quota"), max_result_mb=0.001) as http:
        client = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            edit(client)  # the result itself is over the quota: found out after the work, not retried
        assert caught.value.status_code == 507 and caught.value.code == "storage_full"
        assert caught.value.response.headers["x-should-retry"] == "false"


def test_serve_exits_at_once_without_weights(tmp_path_factory, capsys):
    from clarity.cli import main

    missing = tmp_path_factory.mktemp("empty") / "none"
    assert main(["serve", "--weights", str(missing)]) == 1
    assert "clarity weights tiny" in capsys.readouterr().err


def test_engine_failure_is_a_500_without_internals(tiny_weights, tmp_path_factory):
    from clarity.api.errors import APIError
    from clarity.api.wire import EditRequest
    from clarity.params import UpscaleParams

    class Broken:
        def upscale(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory at /secret/path")

    handler = edit_handler(tiny_weights, tmp_path_factory.mktemp("out"))
    handler.upscalers = {"clarity-upscaler": Broken()}
    with pytest.raises(APIError) as caught:
        handler.run(EditRequest(image=make_test_image(8, 8), params=UpscaleParams()))
    assert caught.value.status == 500
    error = caught.value.body["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]


def test_an_upscale_over_the_compute_budget_is_stopped_with_a_504(tiny_weights, tmp_path_factory):
    import dataclasses

    from clarity import UpscaleParams
    from clarity.api.errors import APIError
    from clarity.api.wire import EditRequest

    handler = edit_handler(tiny_weights, tmp_path_factory.mktemp("out"), max_compute_seconds=1e-9)
    handler.load("cpu")
    request = EditRequest(image=Image.open(io.BytesIO(png_bytes())), params=UpscaleParams(**FAST))
    with pytest.raises(APIError) as caught:
        handler.run(request)
    assert caught.value.status == 504
    assert caught.value.body["error"]["code"] == "compute_timeout"
    handler.config = dataclasses.replace(handler.config, max_compute_seconds=None)
    result = handler.run(request)  # without a budget the same request completes
    assert result.image.size == (80, 64)



# --- several models ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights_root(tiny_weights, tmp_path_factory):
    """A weights root with two different tiny models: the default (linked in) and `other` (another seed)."""
    from clarity.testing.tiny import save_tiny_weights

    root = tmp_path_factory.mktemp("root")
    (root / "models").mkdir()
    (root / "models" / "clarity-upscaler").symlink_to(tiny_weights)
    save_tiny_weights(root / "models" / "other", seed=1)
    return root


@pytest.fixture(scope="module")
def multi(weights_root, tmp_path_factory):
    """The SDK on a server of both models of `weights_root` (no key)."""
    with running_server(weights_root, tmp_path_factory.mktemp("multi-outputs")) as http_client:
        yield openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http_client,
                            max_retries=0)


def _pixels(client, **fields) -> np.ndarray:
    """The b64 result of one fast, seeded edit with extra form `fields` (model, sd_model, ...)."""
    response = client.images.edit(image=("a.png", png_bytes(), "image/png"), prompt="x", response_format="b64_json",
                                  extra_body={**FAST, "seed": 3, **fields})
    return np.asarray(decode(response.data[0].b64_json), dtype=np.int16)


def test_every_model_of_the_root_is_listed(multi):
    assert [model.id for model in multi.models.list()] == ["clarity-upscaler", "other"]
    assert multi.models.retrieve("other").id == "other"
    with pytest.raises(openai.NotFoundError):
        multi.models.retrieve("nope")


def test_model_and_its_sd_model_alias_select_the_model(multi):
    default = _pixels(multi)
    assert np.array_equal(_pixels(multi, model="clarity-upscaler"), default)
    other = _pixels(multi, model="other")
    # Different weights, same seed and settings: a different image (the tiny models differ only
    # in their random UNet and ControlNet, so not by much).
    assert not np.array_equal(other, default)
    assert np.array_equal(_pixels(multi, sd_model="other"), other)
    assert np.array_equal(_pixels(multi, model="other", sd_model="other"), other)


def test_unknown_or_conflicting_model_names_the_field(multi):
    with pytest.raises(openai.NotFoundError) as caught:
        _pixels(multi, sd_model="juggernaut_reborn")
    assert caught.value.code == "model_not_found" and caught.value.param == "sd_model"
    assert "`clarity-upscaler`, `other`" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        _pixels(multi, model="other", sd_model="clarity-upscaler")
    assert caught.value.param == "sd_model"


def test_models_and_default_model_choose_what_is_served(weights_root, tmp_path_factory):
    server = build_server(ServerConfig(weights=weights_root, models=("other",), accelerator="cpu",
                                       output_dir=tmp_path_factory.mktemp("only-other")))
    http_client = TestClient(server.app)
    assert [entry["id"] for entry in http_client.get("/v1/models").json()["data"]] == ["other"]
    assert http_client.get("/v1/models/clarity-upscaler").status_code == 404
    assert http_client.get("/info").json()["model"]["default_model"] == "other"
    with pytest.raises(ParamError, match="default_model"):
        build_server(ServerConfig(weights=weights_root, models=("other",), default_model="clarity-upscaler"))


def test_serve_flags_choose_the_models(weights_root, monkeypatch, capsys):

    from clarity.cli import serve
    from clarity.serving.litserve import server

    built: dict = {}
    monkeypatch.setattr(server, "serve", lambda config: built.update(config=config) or 0)  # not run
    assert serve.main(["--weights", str(weights_root), "--models", "other, clarity-upscaler",
                       "--default-model", "other"]) == 0
    assert (built["config"].models, built["config"].default_model) == (("other", "clarity-upscaler"), "other")
    assert serve.main(["--weights", str(weights_root), "--models", "juggernaut"]) == 1
    assert "no model 'juggernaut'" in capsys.readouterr().err


@pytest.mark.parametrize(("status", "code", "retried"), [(504, "compute_timeout", False), (504, "queue_timeout", True),
                                                         (503, "worker_restarted", True), (500, None, False)])
def test_the_sdk_retries_only_what_may_succeed_on_a_retry(status, code, retried):
    import asyncio

    from fastapi import FastAPI, HTTPException
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request

    from clarity.api.errors import error_body
    from clarity.api.http import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)
    request = Request({"type": "http", "method": "POST", "path": "/v1/images/edits", "headers": []})
    error = HTTPException(status, detail=error_body(status, "x", code=code))
    response = asyncio.run(app.exception_handlers[StarletteHTTPException](request, error))
    # The openai SDKs retry 5xx unless told `x-should-retry: false`, after `Retry-After` if given.
    assert (response.headers.get("x-should-retry") != "false") is retried
    assert ("retry-after" in response.headers) is retried
