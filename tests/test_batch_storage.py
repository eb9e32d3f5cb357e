"""A cluster batch's planning and commits (clarity/serving/ray/batch_storage.py), without a cluster, and the
CLI's refusals of `--ray` combinations (before any connection)."""

from __future__ import annotations

import pytest
from conftest import make_test_image

from clarity.cli import main
from clarity.errors import ParamError
from clarity.serving.ray import batch_storage
from clarity.serving.ray.batch_report import BatchReport


def test_inputs_are_listed_and_named_after_their_stem(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    sources = batch_storage.list_sources([str(tmp_path / "in"), str(tmp_path / "missing.png")])
    assert [s.rsplit("/", 1)[1] for s in sources] == ["a.jpg", "b.png", "missing.png"]
    items = batch_storage.plan_items(sources, "s3://out/run/", "webp")
    assert [item.target for item in items] == ["s3://out/run/a.webp", "s3://out/run/b.webp",
                                               "s3://out/run/missing.webp"]
    local = batch_storage.plan_items(sources[:1], str(tmp_path / "out"), "png")
    assert local[0].target == str(tmp_path / "out" / "a.png")


def test_two_inputs_with_one_result_name_are_refused(tmp_path):
    with pytest.raises(ParamError, match="would both be written to s3://out/a.png"):
        batch_storage.plan_items(["/x/a.png", "/y/a.jpg"], "s3://out", "png")


def test_a_local_commit_is_whole_never_overwrites_and_leaves_no_partial(tmp_path):
    target = tmp_path / "out" / "a.png"
    assert batch_storage.commit(str(target), b"first") is True
    assert batch_storage.commit(str(target), b"second") is False  # a later attempt of the same image
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["a.png"]
    assert batch_storage.existing([str(target), str(tmp_path / "out" / "b.png")]) == {str(target)}


def test_partials_left_by_killed_attempts_are_removed(tmp_path):
    (tmp_path / ".a.png.0123456789ab.partial").write_bytes(b"half")
    (tmp_path / ".other.png.0123456789ab.partial").write_bytes(b"not ours")
    assert batch_storage.remove_partials([str(tmp_path / "a.png")]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [".other.png.0123456789ab.partial"]


def test_the_report_counts_and_paces_each_node():
    rows = [{"source": "a", "status": "written", "node": "10.0.0.1", "seconds": 2.0, "error": ""},
            {"source": "b", "status": "exists", "node": "10.0.0.2", "seconds": 0.5, "error": ""},
            {"source": "c", "status": "failed", "node": "10.0.0.2", "seconds": 0.5, "error": "image: broken"}]
    report = BatchReport.of(planned=6, skipped=1, missing=["/m.png"], rows=rows, seconds=9.0)
    assert (report.written, report.skipped, report.redone, report.unreported) == (1, 1, 1, 1)
    assert report.failed == [("/m.png", "no such file"), ("c", "image: broken")] and not report.ok
    lines = report.lines()
    assert lines[0].startswith("done: 1 written, 1 skipped, 2 failed (6 images")
    assert "node 10.0.0.2: 2 image(s), 1.0 s busy, 2.00 images/s" in lines


@pytest.mark.parametrize("extra, message", [
    (["--server", "http://127.0.0.1:9"], "not with --server or --overwrite"),
    (["--overwrite"], "not with --server or --overwrite"),
    (["--replicas", "0"], "replicas: must be at least 1"),
    (["--replica-resource", "GPU=-1"], "replica_resource"),
])
def test_ray_refuses_what_cannot_work_before_connecting(tmp_path, tiny_weights, capsys, extra, message):
    make_test_image(8, 8).save(tmp_path / "a.png")
    code = main(["upscale", str(tmp_path / "a.png"), "-o", "s3://out/x/", "--ray", "127.0.0.1:9",
                 "--weights", str(tiny_weights), *extra])
    assert code == 2 and message in capsys.readouterr().err


def test_s3_places_need_ray(tmp_path, capsys):
    make_test_image(8, 8).save(tmp_path / "a.png")
    assert main(["upscale", str(tmp_path / "a.png"), "-o", "s3://out/x/"]) == 2
    assert "s3:// inputs and outputs need --ray" in capsys.readouterr().err
