"""`clarity serve --ray`'s options, without a cluster: what each flag becomes in Ray Serve's terms, and the
refusals that come before connecting (the cluster itself: test_ray_serving.py)."""

from __future__ import annotations

import pickle

import pytest

from clarity.api.jobs import Job, JobsFull, WrongState
from clarity.cli import build_parser, main
from clarity.cli.serve import ray_config_from_args
from clarity.errors import ParamError
from clarity.serving.ray.config import RayConfig


def ray_config(*argv: str) -> RayConfig | None:
    return ray_config_from_args(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize(("text", "options"), [
    ("GPU", {"num_gpus": 1.0}),
    ("CPU=4", {"num_cpus": 4.0}),
    ("gpu_slot", {"resources": {"gpu_slot": 1.0}}),
    ("accelerator_type:A100=0.5", {"resources": {"accelerator_type:A100": 0.5}}),
])
def test_the_replica_resource_is_what_each_replica_asks_ray_for(text, options):
    assert RayConfig(replica_resource=text).actor_options() == options


@pytest.mark.parametrize("text", ["", "=2", "GPU=0", "GPU=-1", "CPU=two", "a b"])
def test_a_malformed_replica_resource_is_refused_naming_it(text):
    with pytest.raises(ParamError) as refused:
        RayConfig(replica_resource=text)
    assert refused.value.param == "replica_resource"


def test_replicas_default_to_one_per_unit_of_the_resource_in_the_cluster():
    assert RayConfig().replica_count({"GPU": 3.0, "CPU": 32.0}) == 3
    assert RayConfig(replica_resource="CPU=8").replica_count({"CPU": 20.0}) == 2
    assert RayConfig(replicas=2).replica_count({"GPU": 8.0}) == 2
    with pytest.raises(ParamError, match="--replica-resource CPU=4") as refused:
        RayConfig().replica_count({"CPU": 16.0})
    assert refused.value.param == "replica_resource"


def test_autoscaling_is_passed_to_ray_serve_and_contradictions_are_refused():
    assert RayConfig().autoscaling() is None
    assert RayConfig(max_replicas=4, max_ongoing_requests=2).autoscaling() == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    assert RayConfig(min_replicas=0, max_replicas=4).autoscaling()["min_replicas"] == 0
    assert RayConfig(max_replicas=4).most_replicas({"GPU": 1.0}) == 4
    for options, param in [({"replicas": 2, "max_replicas": 4}, "replicas"), ({"min_replicas": 1}, "min_replicas"),
                           ({"min_replicas": 5, "max_replicas": 4}, "min_replicas"), ({"replicas": 0}, "replicas"),
                           ({"proxy_location": "Nowhere"}, "proxy_location")]:
        with pytest.raises(ParamError) as refused:
            RayConfig(**options)
        assert refused.value.param == param, options


def test_the_models_run_on_cuda_only_on_gpu_replicas():
    assert RayConfig().device("auto") == "cuda"
    assert RayConfig().device("cpu") == "cpu"
    assert RayConfig(replica_resource="gpu_slot").device("auto") == "cpu"
    with pytest.raises(ParamError) as refused:
        RayConfig(replica_resource="CPU=4").device("cuda")
    assert refused.value.param == "accelerator"


def test_the_ray_flags_come_from_the_command_line():
    assert ray_config() is None
    assert ray_config("--ray").address == "local"
    config = ray_config("--ray", "10.0.0.1:6379", "--replica-resource", "gpu_slot", "--max-replicas", "3",
                        "--max-ongoing-requests", "2", "--proxy-location", "HeadOnly")
    assert (config.address, config.replica_resource, config.max_replicas) == ("10.0.0.1:6379", "gpu_slot", 3)
    assert (config.max_ongoing_requests, config.proxy_location) == (2, "HeadOnly")


def test_a_cluster_flag_without_ray_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["serve", "--weights", str(tmp_path), "--replicas", "2"]) == 2
    assert "--replicas places the server on a Ray cluster: add --ray" in capsys.readouterr().err


def test_a_litserve_worker_flag_with_ray_is_refused_naming_the_replica_flags(tmp_path, capsys):
    assert main(["serve", "--weights", str(tmp_path), "--ray", "--workers-per-device", "2"]) == 2
    assert "--workers-per-device places LitServe's workers on one machine" in capsys.readouterr().err
    assert ray_config("--ray", "--devices", "auto").address == "local"  # the default is no mistake


def test_serve_with_ray_hands_both_configs_to_the_ray_driver(tiny_weights, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    from clarity.serving.ray import server

    started: dict = {}
    monkeypatch.setattr(server, "serve_on_ray", lambda config, ray: started.update(config=config, ray=ray) or 0)
    assert main(["serve", "--weights", str(tiny_weights), "--ray", "auto", "--replica-resource", "CPU=2",
                 "--max-queue", "3", "--accelerator", "cpu"]) == 0
    assert started["ray"].address == "auto" and started["ray"].replica_resource == "CPU=2"
    assert started["config"].max_queue == 3


def test_the_job_stores_errors_cross_processes_whole():
    """A shared store (the Ray runtime's job actor) raises them in one process and its caller reads them in another."""
    full = pickle.loads(pickle.dumps(JobsFull("max_jobs", "The server keeps at most 2 jobs.")))
    assert (full.limit, str(full)) == ("max_jobs", "The server keeps at most 2 jobs.")
    job = Job(id="job_1", number=1, kind="job", status="succeeded", model="m", created_at=0.0, started_at=None,
              finished_at=None, expires_at=None, progress=1.0, attempts=1, cancel_requested=False, partial_images=0,
              base_url="http://x", result=None, error=None, webhook_url=None, webhook_events=())
    wrong = pickle.loads(pickle.dumps(WrongState(job, "Job job_1 has already succeeded.")))
    assert (wrong.job, str(wrong)) == (job, "Job job_1 has already succeeded.")
