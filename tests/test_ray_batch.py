"""`clarity upscale --ray`: a batch as a Ray Data job on a real two-node cluster on loopback, into SeaweedFS.

The cluster of tests/ray_cluster.py (one `gpu_slot` per node, so one batch actor per node running the
tiny model on the CPU) and a real S3 server (tests/s3_server.py). The command under test is run as a
process of its own (the driver), so that it can be killed. Tests run in file order on one cluster: the
worker-node kill comes last. The head kill comes first, on two clusters of its own started one after the other
(before the module's is started, so that no more than two nodes share the machine), into a local folder.
Marked `cluster`.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_test_image
from PIL import Image
from ray_cluster import Cluster, Session, titles, two_node_cluster
from s3_server import SeaweedS3

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.cluster

BUCKET = "batch"
SIZES = [(24, 16), (32, 24), (16, 16), (40, 24), (24, 32), (32, 32)]
LARGER = 8
#: A driver whose head died exits once Ray gives up reaching the GCS: after `RAY_gcs_rpc_server_reconnect_timeout_s`,
#: 60 s by default (left so: at 10 s, a driver on this loaded machine exited with its head alive), plus a margin.
HEAD_LOSS_SECONDS = 60 + 45
REPORT = re.compile(r"done: (\d+) written, (\d+) skipped, (\d+) failed")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_node_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.wait_ready()
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Six small images, `in-<n>.png` of the sizes in SIZES."""
    folder = tmp_path_factory.mktemp("inputs")
    for index, size in enumerate(SIZES):
        make_test_image(*size, seed=index).save(folder / f"in-{index}.png")
    return folder


@pytest.fixture(scope="module")
def larger_inputs(tmp_path_factory) -> Path:
    """Eight 48x40 images, `big-<n>.png`: each takes a few seconds, so that both nodes' actors get work."""
    folder = tmp_path_factory.mktemp("larger")
    for index in range(LARGER):
        make_test_image(48, 40, seed=10 + index).save(folder / f"big-{index}.png")
    return folder


def batch_command(cluster: Cluster, weights: Path, inputs: list[Path], output: str, steps: int) -> list[str]:
    """`clarity upscale --ray` into `output`, one actor per `gpu_slot`, `steps` denoising steps."""
    return [sys.executable, "-m", "clarity.cli", "upscale", "--ray", cluster.address, *map(str, inputs),
            "-o", output, "--weights", str(weights), "--replica-resource", "gpu_slot",
            "--device", "cpu", "--num-inference-steps", str(steps), "--creativity", "0.5", "--seed", "1"]


def driver(cluster: Cluster, s3: SeaweedS3, weights: Path, inputs: list[Path], prefix: str, log: str,
           steps: int) -> Session:
    """`clarity upscale --ray` into s3://batch/<prefix>/."""
    command = batch_command(cluster, weights, inputs, f"s3://{BUCKET}/{prefix}/", steps)
    return Session(command, cluster.root / log, env=s3.environment)


def finish(session: Session, seconds: float = 240) -> tuple[int, str]:
    """The driver's exit code and output, once it exits."""
    try:
        code = session.process.wait(seconds)
    except subprocess.TimeoutExpired:
        session.kill()
        pytest.fail(f"the driver did not finish in {seconds:g} s:\n{session.text()[-4000:]}")
    return code, session.text()


def objects(s3: SeaweedS3, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix/`, by key (each listed once, however many PUTs were tried)."""
    client = s3.client()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read() for item in listing}


def counts(output: str) -> tuple[int, int, int]:
    found = REPORT.search(output)
    assert found, output[-4000:]
    return int(found[1]), int(found[2]), int(found[3])


def wait_for_objects(s3: SeaweedS3, prefix: str, count: int, session: Session, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while len(s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/").get("Contents", [])) < count:
        assert session.process.poll() is None, session.text()[-4000:]
        assert time.monotonic() < deadline, session.text()[-4000:]
        time.sleep(0.2)


def upscaling_on(node: Session) -> bool:
    """Whether a batch actor of `node` runs a task (Ray Data's actors run `submit`)."""
    return any(title.startswith("ray::MapWorker(MapBatches(BatchUpscaler)).submit")
               for title in titles(node.process.pid))


def test_a_head_killed_midway_costs_a_rerun_that_skips_what_was_committed(larger_inputs, tiny_weights, tmp_path):
    """On two clusters of its own (the module's stays whole for the tests after), into a local folder that every
    node shares (they share this machine's filesystem)."""
    output = tmp_path / "out"
    with two_node_cluster() as first:
        command = batch_command(first, tiny_weights, [larger_inputs], str(output), steps=40)
        session = Session(command, tmp_path / "first.log")
        deadline = time.monotonic() + 180
        while len(list(output.glob("*.png"))) < 2:
            assert session.process.poll() is None and time.monotonic() < deadline, session.text()[-4000:]
            time.sleep(0.1)
        first.head.kill()  # the GCS, the head's raylet and actor: the whole node
        killed = time.monotonic()
        code, text = finish(session, HEAD_LOSS_SECONDS)
        print(f"the driver exited {code}, {time.monotonic() - killed:.1f} s after the head's kill")
        assert code == 1 and "Failed to connect to GCS" in text, text[-4000:]
    committed = sorted(path.name for path in output.glob("*.png"))  # both nodes gone: nothing more comes
    assert 2 <= len(committed) < LARGER, "the batch finished before the head could be killed midway"
    with two_node_cluster() as second:
        started = time.monotonic()
        code, text = finish(Session(batch_command(second, tiny_weights, [larger_inputs], str(output), steps=40),
                                    tmp_path / "second.log"))
        print(f"re-run with {len(committed)}/{LARGER} committed: {time.monotonic() - started:.1f} s\n{text[-1500:]}")
    assert code == 0, text[-4000:]
    assert counts(text) == (LARGER - len(committed), len(committed), 0), text[-4000:]
    # Every result once, whole, and no temporary file left by the attempts the kill cut short.
    assert sorted(path.name for path in output.iterdir()) == sorted(f"big-{index}.png" for index in range(LARGER))
    for path in output.iterdir():
        assert Image.open(path).size == (96, 80)


def test_a_folder_is_upscaled_into_s3_and_a_bad_image_is_reported(cluster, s3, inputs, tiny_weights,
                                                                                  tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    started = time.monotonic()
    code, output = finish(driver(cluster, s3, tiny_weights, [inputs, broken], "a", "a.log", steps=20))
    print(f"batch of 7 (one broken): {time.monotonic() - started:.1f} s\n{output[-2000:]}")
    assert code == 1, output[-4000:]  # one image failed; the others are done
    assert counts(output) == (6, 0, 1)
    assert re.search(r"failed: \S*broken\.png: .*image", output), output[-4000:]
    results = objects(s3, "a")
    assert sorted(results) == [f"a/in-{index}.png" for index in range(6)]
    for index, (width, height) in enumerate(SIZES):
        assert Image.open(io.BytesIO(results[f"a/in-{index}.png"])).size == (2 * width, 2 * height)
    nodes = re.findall(r"node (127\.0\.0\.\d): (\d+) image", output)
    # One actor per node; the head's often starts first and, on images this small, may do them all.
    assert {node for node, _ in nodes} <= {"127.0.0.2", "127.0.0.3"}, output[-4000:]
    assert sum(int(images) for _, images in nodes) == 7


def test_a_rerun_after_the_driver_was_killed_skips_what_was_committed(cluster, s3, inputs, tiny_weights):
    first = driver(cluster, s3, tiny_weights, [inputs], "c", "c1.log", steps=40)
    wait_for_objects(s3, "c", 2, first)
    first.kill()  # SIGKILL: no cleanup, no report; its actors die with their job
    committed = len(objects(s3, "c"))
    assert committed < len(SIZES), "the driver finished before it could be killed midway"
    started = time.monotonic()
    code, output = finish(driver(cluster, s3, tiny_weights, [inputs], "c", "c2.log", steps=40))
    print(f"re-run after a driver kill: {time.monotonic() - started:.1f} s\n{output[-1500:]}")
    assert code == 0, output[-4000:]
    written, skipped, failed = counts(output)
    assert skipped >= committed and failed == 0 and written + skipped <= len(SIZES)
    redone = re.search(r"(\d+) found already written", output)
    assert written + skipped + (int(redone[1]) if redone else 0) == len(SIZES), output[-4000:]
    assert sorted(objects(s3, "c")) == [f"c/in-{index}.png" for index in range(len(SIZES))]


def test_a_worker_node_killed_midway_costs_no_image_and_writes_none_twice(cluster, s3, larger_inputs, tiny_weights):
    session = driver(cluster, s3, tiny_weights, [larger_inputs], "b", "b.log", steps=40)
    deadline = time.monotonic() + 180
    while not upscaling_on(cluster.worker):  # the worker node's actor holds an image
        assert session.process.poll() is None and time.monotonic() < deadline, session.text()[-4000:]
        time.sleep(0.1)
    cluster.worker.kill()
    killed_with = len(objects(s3, "b"))
    assert killed_with < LARGER, "the batch finished before the node could be killed midway"
    started = time.monotonic()
    code, output = finish(session)
    print(f"killed with {killed_with}/{LARGER} committed; {time.monotonic() - started:.1f} s more to finish\n"
          f"{output[-2000:]}")
    assert code == 0, output[-4000:]
    written, skipped, failed = counts(output)
    redone = re.search(r"(\d+) found already written", output)
    assert (skipped, failed) == (0, 0) and written + (int(redone[1]) if redone else 0) == LARGER, output[-4000:]
    results = objects(s3, "b")  # conditional PUTs: a key is written once or refused, so no duplicates
    assert sorted(results) == sorted(f"b/big-{index}.png" for index in range(LARGER))
    for data in results.values():
        assert Image.open(io.BytesIO(data)).size == (96, 80)
