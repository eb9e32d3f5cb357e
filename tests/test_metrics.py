"""`/metrics`: real requests through an in-process server (with its spawned worker), scraped and read
with prometheus_client's own text parser; and the Grafana dashboard queries only metrics that exist.

Counts are compared before and after the requests: the pytest process keeps one metrics folder for
every in-process server of the session (see `metrics.use_multiprocess_dir`).
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest
from conftest import make_test_image, running_server

from clarity.api.metrics import METRIC_NAMES, METRICS_PATH

KEY = "sk-test-metrics"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"num_inference_steps": "2", "creativity": "0.5", "response_format": "b64_json"}
EDITS = "/v1/images/edits"
MODEL = "clarity-upscaler"  # the tiny test model's id
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "clarity-dashboard.json"


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    make_test_image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def scrape(http, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of `/metrics`, by (name, labels)."""
    # Imported here, not at the top: prometheus_client picks its multiprocess mode when first
    # imported, and the first in-process server must set it up before (metrics.use_multiprocess_dir).
    from prometheus_client.parser import text_string_to_metric_families

    response = http.get(METRICS_PATH, headers=AUTH if headers is None else headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_real_requests(tiny_weights, tmp_path):
    with running_server(tiny_weights, tmp_path, api_key=KEY) as http:
        before = scrape(http)
        assert http.get(METRICS_PATH).status_code == 401  # the key, like every route
        sizes = [(40, 32), (24, 16)]
        for width, height in sizes:
            files = {"image": ("a.png", png(width, height), "image/png")}
            response = http.post(EDITS, headers=AUTH, files=files, data={**FAST, "prompt": "x"})
            assert response.status_code == 200, response.text
        files = {"image": ("a.png", png(24, 16), "image/png")}
        refused = http.post(EDITS, headers=AUTH, files=files, data={**FAST, "creativity": "7"})
        assert refused.status_code == 400
        assert http.get("/v1/models", headers=AUTH).status_code == 200
        job = http.post("/v1/jobs", headers=AUTH, files={"image": ("a.png", png(24, 16), "image/png")},
                        data={**FAST, "prompt": "x"}).json()
        while http.get(f"/v1/jobs/{job['id']}", headers=AUTH).json()["status"] != "succeeded":
            time.sleep(0.2)
        time.sleep(1.5)  # the runner counts the jobs each second
        after = scrape(http)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("clarity_http_requests_total", route=EDITS, status="200") == 3  # the job's run too
    assert grew("clarity_http_requests_total", route="/v1/jobs", status="202") == 1
    assert value(after, "clarity_jobs", status="succeeded") == 1 and value(after, "clarity_jobs", status="queued") == 0
    assert grew("clarity_http_requests_total", route=EDITS, status="400") == 1
    assert grew("clarity_http_requests_total", route="/v1/models", status="200") == 1
    assert grew("clarity_http_requests_total", route=METRICS_PATH, status="401") == 1
    assert grew("clarity_http_request_duration_seconds_count", route=EDITS) == 4
    assert grew("clarity_edits_total", model=MODEL, status="200") == 3
    assert grew("clarity_edits_total", model="unknown", status="400") == 1
    assert grew("clarity_queue_wait_seconds_count") == 4  # every request a worker took, refused or not
    assert grew("clarity_output_images_total", model=MODEL) == 3
    expected_mp = sum(2 * width * 2 * height for width, height in [*sizes, (24, 16)]) / 1e6  # each doubled
    assert grew("clarity_output_megapixels_total", model=MODEL) == pytest.approx(expected_mp)
    assert grew("clarity_denoising_steps_total", model=MODEL) >= 2  # at least one step per upscale
    assert grew("clarity_denoising_seconds_total", model=MODEL) > 0
    assert value(after, "clarity_model_load_seconds_count", model=MODEL) >= 1
    assert value(after, "clarity_model_load_seconds_sum", model=MODEL) > 0
    assert value(after, "clarity_requests_running") == 0
    assert value(after, "clarity_queue_depth") == 0
    # Every series these requests grew has a route from the app's templates, never a raw path.
    # (Other in-process servers of the same test session record into the same folder.)
    routes = {dict(labels).get("route") for (name, labels), sample in after.items()
              if name == "clarity_http_requests_total" and sample > before.get((name, labels), 0.0)}
    assert routes <= {EDITS, "/v1/models", METRICS_PATH, "/health", "/v1/jobs", "/v1/jobs/{job_id}", "other"}


def test_metrics_public_needs_no_key(tiny_weights, tmp_path):
    with running_server(tiny_weights, tmp_path, api_key=KEY, metrics_public=True) as http:
        samples = scrape(http, headers={})
        assert value(samples, "clarity_model_load_seconds_count", model=MODEL) >= 1
        assert http.get("/v1/models").status_code == 401  # only /metrics is opened


def test_unknown_paths_share_one_route_label(tiny_weights, tmp_path):
    with running_server(tiny_weights, tmp_path) as http:
        before = scrape(http, headers={})
        for path in ("/wp-admin", "/a/b/c", "/v1/files/" + "A" * 43 + ".png"):
            http.get(path)
        after = scrape(http, headers={})
    grew = {dict(labels)["route"]: sample - before.get((name, labels), 0.0)
            for (name, labels), sample in after.items() if name == "clarity_http_requests_total"}
    assert grew["other"] == 2 and grew["/v1/files/{name}"] == 1


def test_the_dashboard_queries_only_metrics_the_server_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(queries) >= 10
    names = {name for query in queries for name in re.findall(r"clarity_\w+", query)}
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}
    assert used and used <= METRIC_NAMES, used - METRIC_NAMES
