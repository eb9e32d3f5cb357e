"""Url-mode results in S3-compatible storage, against a real S3 server (SeaweedFS on 127.0.0.1).

The store on its own (save, find, expiry, quota, conditional writes, what it never touches), the
`--results` option's checks, and two real server processes sharing one bucket: a URL one of them
made is served by the other, as replicas behind a load balancer would be.
"""

from __future__ import annotations

import io
import pickle
import sys
import time
import uuid
from urllib.parse import urlsplit

import openai
import pytest
from conftest import ServerProcess, make_test_image
from PIL import Image
from s3_server import SeaweedS3

from clarity.api.config import ServerConfig
from clarity.api.results import S3ResultStore, StorageFull, open_result_store
from clarity.api.results.s3 import S3Location
from clarity.errors import ParamError

BUCKET = "clarity-results"
#: Fast engine settings for every request.
FAST = {"num_inference_steps": 2, "creativity": 0.5}
#: The result TTL of the second replica: short, so that a test can watch a URL expire.
SHORT_TTL = 5


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """SeaweedFS with a bucket, and boto3's environment variables pointing at it for this module."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.wait_ready()
        server.client().create_bucket(Bucket=BUCKET)
    except Exception as error:
        server.stop()
        pytest.fail(f"SeaweedFS could not be started: {error}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.environment.items():
            patch.setenv(name, value)
        yield server
    server.stop()


@pytest.fixture
def location(s3) -> str:
    """A prefix of the bucket no other test uses."""
    return f"s3://{BUCKET}/store-{uuid.uuid4().hex[:8]}"


def png(width: int = 40, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    make_test_image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def put(s3: SeaweedS3, location: str, name: str, data: bytes) -> str:
    """An object `name` under `location`'s prefix put there by someone else; its key."""
    key = S3Location.parse(location).key(name)
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=data)
    return key


def exists(s3: SeaweedS3, key: str) -> bool:
    return s3.client().list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0) > 0


# --- the store ------------------------------------------------------------------------------------


def test_a_saved_result_is_one_object_found_whole_and_typed(s3, location):
    store = S3ResultStore(location, ttl_seconds=60)
    data = png()
    name = store.save(data, "png")
    key = S3Location.parse(location).key(name)
    assert s3.client().head_object(Bucket=BUCKET, Key=key)["ContentType"] == "image/png"
    found = store.find(name)
    assert found.size == len(data) and found.read_bytes() == data
    # Handed to a worker process, it opens a client of its own there.
    assert pickle.loads(pickle.dumps(store)).find(name).read_bytes() == data
    assert store.find("A" * 43 + ".png") is None  # never stored
    assert store.find("../" + name) is None and store.find(name + "\n") is None


def test_a_name_is_never_overwritten(s3, location, monkeypatch):
    """The PUT is conditional (If-None-Match: *): a second write of a name is refused by the server."""
    from clarity.api.results import store as names

    store = S3ResultStore(location, ttl_seconds=60)
    monkeypatch.setattr(names.secrets, "token_urlsafe", lambda size: "B" * 43)
    name = store.save(b"first", "png")
    with pytest.raises(FileExistsError):
        store.save(b"second", "png")
    assert store.find(name).read_bytes() == b"first"


def test_expired_results_are_not_served_and_are_purged_leaving_other_objects(s3, location):
    keeper = S3ResultStore(location, ttl_seconds=60)
    name = keeper.save(b"result", "png")
    foreign = put(s3, location, "notes.txt", b"not a result")
    deeper = put(s3, location, "sub/" + "C" * 43 + ".png", b"below the prefix")
    time.sleep(0.6)
    # The same objects under a store whose TTL has passed (LastModified has whole seconds, rounded down,
    # so the age it gives is never short).
    expiring = S3ResultStore(location, ttl_seconds=0.5)
    assert expiring.find(name) is None
    assert keeper.find(name).read_bytes() == b"result"  # not deleted by a read
    assert expiring.purge_expired() == 1
    assert keeper.find(name) is None
    assert exists(s3, foreign) and exists(s3, deeper)  # only its own names are listed and deleted


def test_the_quota_counts_every_replica_and_frees_with_expiry(s3, location):
    first = S3ResultStore(location, ttl_seconds=60, max_bytes=3000)
    other_replica = S3ResultStore(location, ttl_seconds=60, max_bytes=3000)
    first.save(bytes(2000), "png")
    with pytest.raises(StorageFull, match="full"):
        first.save(bytes(2000), "png")  # its own write counted without listing again
    other_replica.check_room()  # 2000 of 3000 used: there is room
    with pytest.raises(StorageFull, match="full"):
        other_replica.save(bytes(2000), "png")  # its listing shows the first replica's result
    time.sleep(0.6)
    expiring = S3ResultStore(location, ttl_seconds=0.5, max_bytes=3000)
    expiring.save(bytes(2000), "png")  # the expired one is deleted to make room


def test_a_bucket_that_cannot_be_used_stops_the_server_at_start(s3, tmp_path):
    with pytest.raises(ParamError) as caught:
        open_result_store("s3://no-such-bucket/results", tmp_path, 60, 1000)
    assert caught.value.param == "results"
    assert "s3://no-such-bucket/results/" in str(caught.value) and s3.endpoint in str(caught.value)
    assert isinstance(open_result_store(f"s3://{BUCKET}/results", tmp_path, 60, 1000), S3ResultStore)


# --- the option -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["http://bucket/results", "s3://", "s3:///results", "s3://Bad_Bucket/x",
                                   "s3://bucket/x?versionId=1", "/srv/results"])
def test_results_must_name_an_s3_bucket(value):
    with pytest.raises(ParamError) as caught:
        ServerConfig(results=value)
    assert caught.value.param == "results"


def test_results_and_output_dir_do_not_go_together(tmp_path):
    with pytest.raises(ParamError, match="output-dir") as caught:
        ServerConfig(results="s3://bucket/results", output_dir=tmp_path)
    assert caught.value.param == "results"


def test_locations_are_a_bucket_and_a_prefix_ending_in_a_slash():
    assert S3Location.parse("s3://bucket") == S3Location("bucket", "")
    assert S3Location.parse("s3://bucket/") == S3Location("bucket", "")
    assert S3Location.parse("s3://bucket/a/b/") == S3Location("bucket", "a/b/")
    assert S3Location.parse("s3://my.bucket-1/results").key("x.png") == "results/x.png"


def test_without_boto3_serve_exits_at_once_saying_what_to_install(monkeypatch, capsys):
    from clarity.cli import main

    monkeypatch.setitem(sys.modules, "boto3", None)  # what an import of a missing package does
    assert main(["serve", "--results", "s3://bucket/results"]) == 2
    assert "pip install -e '.[s3]'" in capsys.readouterr().err


# --- two server processes on one bucket ------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas(s3, tiny_weights, tmp_path_factory):
    """Two servers with `--results` on the same prefix; the second keeps results only `SHORT_TTL` seconds."""
    folder = tmp_path_factory.mktemp("replicas")
    results = ["--results", f"s3://{BUCKET}/served"]
    servers = [ServerProcess(tiny_weights, folder / "a.log", results),
               ServerProcess(tiny_weights, folder / "b.log", [*results, "--result-ttl-seconds", str(SHORT_TTL)])]
    try:
        for server in servers:
            server.wait_healthy()
        yield servers
    finally:
        for server in servers:
            server.stop()


def url_edit(server: ServerProcess) -> str:
    """A url-mode edit through the official SDK; the URL of its result."""
    client = openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)
    response = client.images.edit(model="clarity-upscaler", image=("photo.png", png(), "image/png"),
                                  prompt="a photo", response_format="url", extra_body=FAST)
    return response.data[0].url


def test_a_url_made_by_one_replica_is_served_by_the_other(s3, replicas):
    first, second = replicas
    url = url_edit(first)
    assert url.startswith(first.url + "/v1/files/")
    path = urlsplit(url).path
    here, there = first.http.get(path), second.http.get(path)
    assert here.status_code == there.status_code == 200, there.text
    assert there.headers["content-type"] == "image/png"
    assert there.content == here.content
    assert int(there.headers["content-length"]) == len(there.content)
    key = S3Location.parse(f"s3://{BUCKET}/served").key(path.rsplit("/", 1)[-1])
    assert s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read() == there.content
    with Image.open(io.BytesIO(there.content)) as image:
        assert image.format == "PNG" and image.size == (80, 64)


def test_a_result_url_expires_after_the_ttl(replicas):
    first, second = replicas
    path = urlsplit(url_edit(first)).path
    made = time.monotonic()
    assert second.http.get(path).status_code == 200
    time.sleep(max(0.0, made + SHORT_TTL + 1.5 - time.monotonic()))  # LastModified has whole seconds
    gone = second.http.get(path)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"


def test_a_name_never_stored_is_a_404_in_openais_shape(replicas):
    answer = replicas[1].http.get("/v1/files/" + "D" * 43 + ".png")
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "file_not_found" and error["type"] == "invalid_request_error" and error["message"]


def test_an_unreachable_bucket_is_a_503_to_retry_and_b64_still_works(tiny_weights, tmp_path):
    # Its own S3 server, killed midway: the module's serves the other tests.
    (tmp_path / "seaweedfs").mkdir()
    s3 = SeaweedS3(tmp_path / "seaweedfs")
    try:
        s3.wait_ready()
        s3.client().create_bucket(Bucket=BUCKET)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in s3.environment.items():
                patch.setenv(name, value)  # read by the server process started here
            server = ServerProcess(tiny_weights, tmp_path / "server.log", ["--results", f"s3://{BUCKET}/down"])
        with server:
            stored = urlsplit(url_edit(server)).path
            s3.stop()
            client = openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0)
            with pytest.raises(openai.InternalServerError) as refused:
                client.images.edit(model="clarity-upscaler", image=("photo.png", png(), "image/png"),
                                   prompt="a photo", response_format="url", extra_body=FAST)
            assert refused.value.status_code == 503 and refused.value.body["code"] == "storage_unavailable"
            assert refused.value.response.headers["retry-after"]
            assert "endpoint" not in refused.value.body["message"]  # where the bucket lives stays in the log
            inline = client.images.edit(model="clarity-upscaler", image=("photo.png", png(), "image/png"),
                                        prompt="a photo", response_format="b64_json", extra_body=FAST)
            assert inline.data[0].b64_json
            fetched = server.http.get(stored)
            assert fetched.status_code == 503 and fetched.json()["error"]["code"] == "storage_unavailable"
    finally:
        s3.stop()
