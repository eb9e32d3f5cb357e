"""Clarity's `/metrics` on Ray: the merge of the nodes' exports (no cluster), and one edit through a server on the
two-node loopback cluster counted in the cluster's `/metrics` (marked `cluster`).

The unit tests feed the merge what Ray's metrics agents export (the shape below was read from Ray 2.60's agent:
`ray_` in front of the name, Ray's tags beside the metric's labels, one series per process), parsed by
prometheus_client's parser as the ingress parses it, and read the rendered text back with the same parser.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from conftest import FAST, free_port, make_test_image
from ray_cluster import HEAD_IP, Session, two_node_cluster

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")

from clarity.api.metrics import METRIC_NAMES, METRICS_PATH, use_multiprocess_dir  # noqa: E402
from clarity.serving.ray import metrics as ray_metrics  # noqa: E402

KEY = "metrics-key"
MODEL = "clarity-upscaler"
OTEL = 'otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",otel_scope_version=""'


@pytest.fixture(autouse=True)
def _multiprocess_mode_first() -> None:
    """These tests import prometheus_client, which picks its mode on its first import; a LitServe server started
    later in this process needs multiprocess mode, so its folder is set first, as that server would set it."""
    use_multiprocess_dir()


def ray_tags(node: str, worker: str) -> str:
    return (f'Component="core_worker",NodeAddress="{node}",SessionName="session_1",Version="2.60.0",'
            f'WorkerId="{worker}",{OTEL}')


def node_export(node: str, workers: dict[str, dict[str, float]]) -> str:
    """What one node's agent exports for `workers`: per worker id, its edits (200), its clarity_jobs (queued),
    its queue waits (a histogram with two of SPECS' bounds shown) and its running upscales."""
    lines = ["# HELP ray_tasks Ray's own.", "# TYPE ray_tasks gauge", f'ray_tasks{{{ray_tags(node, "x")}}} 7.0',
             "# HELP ray_clarity_edits_total Edits.", "# TYPE ray_clarity_edits_total counter"]
    lines += [f'ray_clarity_edits_total{{{ray_tags(node, w)},model="{MODEL}",status="200"}} {v["edits"]}'
              for w, v in workers.items()]
    lines += ["# HELP ray_clarity_jobs Jobs.", "# TYPE ray_clarity_jobs gauge"]
    lines += [f'ray_clarity_jobs{{{ray_tags(node, w)},status="queued"}} {v["jobs"]}' for w, v in workers.items()]
    lines += ["# HELP ray_clarity_requests_running Running.", "# TYPE ray_clarity_requests_running gauge"]
    lines += [f'ray_clarity_requests_running{{{ray_tags(node, w)}}} {v["running"]}' for w, v in workers.items()]
    lines += ["# HELP ray_clarity_queue_wait_seconds Waits.", "# TYPE ray_clarity_queue_wait_seconds histogram"]
    for worker, values in workers.items():
        tags = ray_tags(node, worker)
        for le, count in (("0.1", values["fast"]), ("1.0", values["waits"]), ("+Inf", values["waits"])):
            lines.append(f'ray_clarity_queue_wait_seconds_bucket{{{tags},le="{le}"}} {count}')
        lines.append(f'ray_clarity_queue_wait_seconds_count{{{tags}}} {values["waits"]}')
        lines.append(f'ray_clarity_queue_wait_seconds_sum{{{tags}}} {values["wait_sum"]}')
    return "\n".join(lines) + "\n"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


HEAD = {"w1": {"edits": 2, "jobs": 3, "running": 1, "fast": 1, "waits": 2, "wait_sum": 0.6},
        "w2": {"edits": 1, "jobs": 0, "running": 0, "fast": 0, "waits": 1, "wait_sum": 0.55}}
WORKER = {"w3": {"edits": 4, "jobs": 2, "running": 1, "fast": 2, "waits": 3, "wait_sum": 0.9}}


def merged_text(*exports: str | None) -> str:
    """The ingress's rendering of the nodes' `exports` (None: a node not read)."""
    return ray_metrics.merged_exposition({f"http://node{i}/metrics": text for i, text in enumerate(exports)}).decode()


def test_series_that_differ_by_ray_tags_only_are_summed_under_clarity_names():
    found = samples(merged_text(node_export("127.0.0.2", HEAD), node_export("127.0.0.3", WORKER)))
    assert found[("clarity_edits_total", frozenset({("model", MODEL), ("status", "200")}))] == 7
    assert found[("clarity_requests_running", frozenset())] == 2  # livesum: every process's
    assert found[("clarity_jobs", frozenset({("status", "queued")}))] == 3  # livemostrecent: the largest
    names = {name for name, _ in found}
    assert not any(name.startswith("ray_") for name in names)
    assert all(label in {"model", "status", "le"} for _, labels in found for label, _ in labels)
    assert found[("clarity_metrics_unreadable_nodes", frozenset())] == 0


def test_histograms_add_up_bucket_by_bucket():
    found = samples(merged_text(node_export("127.0.0.2", HEAD), node_export("127.0.0.3", WORKER)))

    def bucket(le: str) -> float:
        return found[("clarity_queue_wait_seconds_bucket", frozenset({("le", le)}))]

    assert (bucket("0.1"), bucket("1.0"), bucket("+Inf")) == (3, 6, 6)
    assert found[("clarity_queue_wait_seconds_count", frozenset())] == 6
    assert found[("clarity_queue_wait_seconds_sum", frozenset())] == pytest.approx(2.05)


def test_a_node_not_read_is_counted_and_the_others_are_served():
    found = samples(merged_text(node_export("127.0.0.2", HEAD), None, "not prometheus text {\n"))
    assert found[("clarity_edits_total", frozenset({("model", MODEL), ("status", "200")}))] == 3
    assert found[("clarity_metrics_unreadable_nodes", frozenset())] == 2


def test_only_clarity_families_of_their_own_type_are_kept():
    from prometheus_client.parser import text_string_to_metric_families

    # Ray's own metrics, and a family of a Clarity name but another type (as Ray < 2.10 exported counters).
    text = (f'# TYPE ray_clarity_edits_total gauge\nray_clarity_edits_total{{{ray_tags("a", "w")}}} 5.0\n'
            f'# TYPE ray_clarity_jobs gauge\nray_clarity_jobs{{{ray_tags("a", "w")},status="failed"}} 1.0\n'
            f'# TYPE ray_tasks gauge\nray_tasks{{{ray_tags("a", "w")}}} 7.0\n')
    merged = ray_metrics.merge(text_string_to_metric_families(text))
    assert set(merged) == {"clarity_jobs"}
    assert set(merged) <= METRIC_NAMES


# --- on the two-node loopback cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(tiny_weights) -> Iterator[str]:
    """`clarity serve --ray` on a two-node cluster of its own, one upscaler replica per node (as
    tests/test_ray_serving.py starts it)."""
    with two_node_cluster() as cluster:
        port = free_port()
        command = [sys.executable, "-m", "clarity.cli", "serve", "--ray", cluster.address, "--weights",
                   str(tiny_weights), "--host", HEAD_IP, "--port", str(port), "--proxy-location", "HeadOnly",
                   "--replica-resource", "gpu_slot", "--replicas", "2", "--accelerator", "cpu", "--api-key", KEY,
                   "--data-dir", str(cluster.root / "data")]
        session = Session(command, cluster.root / "server.log")
        try:
            session.wait_for("serving clarity-upscaler .* through Ray Serve", 240)
            yield f"http://{HEAD_IP}:{port}"
        finally:
            session.kill()


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    make_test_image(width, height).save(buffer, "PNG")
    return buffer.getvalue()


#: Seconds Ray's agents take at most to receive a process's values: `metrics_report_interval_ms`, 10 s by
#: default (the cluster keeps it); the scrape reads the agents.
EXPORT_INTERVAL = 10
EDITS = "/v1/images/edits"
EDIT_LABELS = frozenset({("model", MODEL), ("status", "200")})


@pytest.mark.cluster
def test_an_edit_is_counted_in_the_clusters_metrics(server_url):
    with httpx.Client(base_url=server_url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
        assert httpx.get(f"{server_url}{METRICS_PATH}").status_code == 401  # the key, like every route
        form = {"prompt": "x", "response_format": "b64_json", **{name: str(value) for name, value in FAST.items()}}
        edited = http.post(EDITS, files={"image": ("a.png", png(24, 16), "image/png")}, data=form)
        assert edited.status_code == 200, edited.text
        answered = time.monotonic()
        expected = {  # from the ingress, an upscaler replica, the job actor, both replicas' model loads
            ("clarity_http_requests_total", frozenset({("route", EDITS), ("status", "200")})): 1,
            ("clarity_edits_total", EDIT_LABELS): 1,
            ("clarity_output_images_total", frozenset({("model", MODEL)})): 1,
            ("clarity_jobs", frozenset({("status", "queued")})): 0,
            ("clarity_model_load_seconds_count", frozenset({("model", MODEL)})): 2,
            ("clarity_metrics_unreadable_nodes", frozenset()): 0,
        }
        while {key: (found := samples(http.get(METRICS_PATH).text)).get(key) for key in expected} != expected:
            assert time.monotonic() - answered < 3 * EXPORT_INTERVAL, {key: found.get(key) for key in expected}
            time.sleep(0.5)
        print(f"\nthe edit was in /metrics {time.monotonic() - answered:.1f} s after its answer")
        # A gauge recorded once stays: Ray's agents drop a series that no export renewed for two intervals, so
        # one set at the edit's end, exported up to an interval later, is gone three intervals on unless renewed.
        time.sleep(max(0.0, answered + 3 * EXPORT_INTERVAL + 3 - time.monotonic()))
        assert samples(http.get(METRICS_PATH).text).get(("clarity_requests_running", frozenset())) == 0
