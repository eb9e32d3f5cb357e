"""The driver of `clarity serve --ray ADDRESS`: the API core deployed on a Ray cluster until stopped.

    ray start --head ...; ray start --address HEAD:6379 ...     (on each machine; README, "Beyond one machine")
    clarity serve --ray auto --weights /srv/weights --api-key "$KEY"

It connects to the cluster (or starts one on this machine), creates the job actor (jobs.py) and
deploys the Serve application `APP_NAME`: the ingress on the head node, the upscaler replicas where
the replica resource is. It then waits for SIGINT or SIGTERM, stops starting jobs, deletes the
application (Ray Serve lets running edits finish within `--shutdown-timeout`), stops Ray Serve if it
started it, and kills the job actor; queued jobs wait in the data folder for the next start. Paths are
made absolute here, as every node reads them: weights and the data folder must exist at the same paths
on the nodes that use them.

A Serve config (KubeRay's RayService, `serve deploy`) deploys the same application through `application`,
which Ray Serve calls on the cluster; Ray Serve then owns the application's lifetime (README, "Several machines").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time

import ray
from ray import serve
from ray.actor import ActorHandle
from ray.serve import Application

from clarity.api.config import ServerConfig
from clarity.api.handler import EditHandler
from clarity.api.results import open_result_store
from clarity.errors import ClarityError
from clarity.models.catalogue import Catalogue
from clarity.serving.ray.config import RayConfig
from clarity.serving.ray.ingress import Ingress
from clarity.serving.ray.jobs import JOBS_ACTOR, NAMESPACE, JobsActor, RayJobStore
from clarity.serving.ray.upscaler import UpscalerReplica

logger = logging.getLogger(__name__)

#: The Serve application's name and its deployments' (`serve status` shows them).
APP_NAME = "clarity"
INGRESS, UPSCALER = "ingress", "upscaler"
#: The resource Ray gives the head node (one unit) and no other, whatever the head's address: `ray.cluster_resources()`
#: and `ray list nodes` show it, and Ray Serve places its own controller by it. Placing by it rather than by the head's
#: `node:<ip>` keeps the ingress and the job actor on a head restarted with another IP (a new head pod).
HEAD_NODE_RESOURCE = "node:__internal_head__"
#: What an ingress replica and the job actor take of `HEAD_NODE_RESOURCE`: nonzero, so that they are placed on the
#: head, and small enough for any number of them.
HEAD_SHARE = 0.001
#: Requests one ingress replica holds at once. It only waits on others (the queue that matters is the
#: upscaler's, --max-queue), and a streamed edit holds its place for the whole upscale.
INGRESS_MAX_ONGOING = 1000
#: Seconds to wait for the name of a previous run's job actor to be free again after killing it.
NAME_FREE_SECONDS = 30


def serve_on_ray(config: ServerConfig, ray_config: RayConfig) -> int:
    """Deploy the API core on the cluster of `ray_config`, serve until stopped, remove it; the exit code."""
    config = _absolute_paths(config)
    ray.init(address=ray_config.address)  # Ray's own words: "local" starts a cluster, "auto" finds this machine's
    try:
        jobs_actor = _start_jobs_actor(config, ray_config)
        owns_serve = not _serve_is_running()
        stop = _stop_on_signals()  # before deploying, which takes as long as loading the models
        try:
            _deploy(config, ray_config, owns_serve)
            stop.wait()
            logger.info("stopping: running edits get up to --shutdown-timeout to finish")
            ray.get(jobs_actor.stop_dispatching.remote())
        finally:
            _undeploy(owns_serve)
            ray.kill(jobs_actor)
    finally:
        ray.shutdown()
    return 0


def application(config: ServerConfig, ray_config: RayConfig) -> Application:
    """The application for a Serve config (KubeRay's RayService `serveConfigV2`, `serve deploy`), built where Ray
    Serve runs its builder (`clarity.cli.serve:ray_application`), on the cluster: the job actor started on the head
    node, the application bound. Ray Serve itself (its proxies' host, port and location) and the application's
    lifetime are the config's; the config must name the application `APP_NAME`, at route prefix `/` (the job
    runner calls the upscaler by that name). The job actor is detached: it outlives the application, and the next
    build replaces it (its jobs stay in the store)."""
    config = _absolute_paths(config)
    catalogue = Catalogue.discover(config.weights, models=config.models, default_model=config.default_model)
    _start_jobs_actor(config, ray_config)
    return build_application(config, ray_config, catalogue)


def _absolute_paths(config: ServerConfig) -> ServerConfig:
    """`config` with its paths absolute, as every node reads them."""
    return dataclasses.replace(config, weights=config.weights.resolve(), data_dir=config.data_path.resolve(),
                               output_dir=config.results_path.resolve())


def _serve_is_running() -> bool:
    """Whether Ray Serve already runs on the cluster: it has proxies or applications (without either, its
    status is empty)."""
    status = serve.status()
    return bool(status.proxies or status.applications)


def _undeploy(owns_serve: bool) -> None:
    """Delete the application (running edits get --shutdown-timeout), then Ray Serve itself if this command
    started it and no other application has come to use it."""
    with contextlib.suppress(Exception):  # nothing deployed yet, or the cluster is gone already
        serve.delete(APP_NAME)
        if owns_serve and not serve.status().applications:
            serve.shutdown()


def head_resource() -> str:
    """`HEAD_NODE_RESOURCE`, once the cluster is seen to have it (else nothing placed by it could ever start)."""
    if HEAD_NODE_RESOURCE not in ray.cluster_resources():
        raise ClarityError(f"the Ray cluster has no {HEAD_NODE_RESOURCE} resource, which Ray gives its head node: is"
                           " the head node alive, and is this Ray 2.60 or later?")
    return HEAD_NODE_RESOURCE


def _start_jobs_actor(config: ServerConfig, ray_config: RayConfig) -> ActorHandle:
    """The job actor on the head node, after killing one a previous run left behind (its jobs stay in the store)."""
    _kill_previous_jobs_actor()
    concurrency = ray_config.most_replicas(ray.cluster_resources()) * ray_config.max_ongoing_requests
    actor = ray.remote(JobsActor).options(
        name=JOBS_ACTOR, namespace=NAMESPACE, lifetime="detached", num_cpus=0, resources={head_resource(): HEAD_SHARE},
        max_restarts=-1,  # a crash loses no job: they are in the store, and the runner recovers them
    ).remote(config, APP_NAME, UPSCALER, concurrency)
    ray.get(actor.call.remote("counts"))  # constructed: the store is open
    return actor


def _kill_previous_jobs_actor() -> None:
    """Kill the job actor of a server that was stopped without cleaning up (SIGKILL), and wait for its name."""
    try:
        previous = ray.get_actor(JOBS_ACTOR, namespace=NAMESPACE)
    except ValueError:  # there is none
        return
    ray.kill(previous)
    deadline = time.monotonic() + NAME_FREE_SECONDS
    while time.monotonic() < deadline:
        try:
            ray.get_actor(JOBS_ACTOR, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)


def build_application(config: ServerConfig, ray_config: RayConfig, catalogue: Catalogue) -> Application:
    """The Serve application: the ingress (on the head node) bound to the upscaler deployment."""
    jobs = RayJobStore()
    results = open_result_store(config.results, config.results_path, config.result_ttl_seconds,
                                config.max_result_bytes)
    handler = EditHandler(config, catalogue, results, jobs)
    autoscaling = ray_config.autoscaling()
    replicas = {"autoscaling_config": autoscaling} if autoscaling else {
        "num_replicas": ray_config.replica_count(ray.cluster_resources())}
    upscaler = serve.deployment(
        UpscalerReplica, name=UPSCALER, ray_actor_options=ray_config.actor_options(),
        max_ongoing_requests=ray_config.max_ongoing_requests, max_queued_requests=config.max_queue,
        graceful_shutdown_timeout_s=config.shutdown_timeout, **replicas,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress), name=INGRESS, num_replicas=ray_config.ingress_replicas,
        # No CPU reserved: it only forwards, and the CPUs are for the replicas (--replica-resource CPU=N).
        ray_actor_options={"num_cpus": 0, "resources": {head_resource(): HEAD_SHARE}},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        graceful_shutdown_timeout_s=config.shutdown_timeout,
    )
    return ingress.bind(handler, upscaler.bind(handler, ray_config.device(config.accelerator)), jobs)


def _deploy(config: ServerConfig, ray_config: RayConfig, owns_serve: bool) -> None:
    """Start Ray Serve with its proxies on `--host`/`--port` if it does not run yet (`owns_serve`), and deploy
    the application; return once every replica is up."""
    catalogue = Catalogue.discover(config.weights, models=config.models, default_model=config.default_model)
    if owns_serve:
        serve.start(proxy_location=ray_config.proxy_location, http_options={"host": config.host, "port": config.port})
    else:
        logger.warning("Ray Serve already runs on this cluster: its proxies keep the host, port and location they"
                       " were started with, whatever --host, --port and --proxy-location say (serve shutdown"
                       " stops them, and every application they serve)")
    try:
        serve.run(build_application(config, ray_config, catalogue), name=APP_NAME, route_prefix="/")
    except RuntimeError as error:  # Serve's report that a deployment failed (its replicas' logs say why)
        raise ClarityError(f"deploying on the Ray cluster failed: {error}") from None
    where = f"http://{config.host}:{config.port}" if owns_serve else "the cluster's Ray Serve proxies"
    logger.info("serving %s (default %s) on %s through Ray Serve", ", ".join(catalogue.models),
                catalogue.default_model, where)
    if not config.api_key:
        logger.warning("no API key set (--api-key or CLARITY_API_KEY): anyone who can reach the port can use it")


def _stop_on_signals() -> threading.Event:
    """An event set by the first SIGINT or SIGTERM; a second Ctrl-C stops at once (KeyboardInterrupt: exit
    code 130)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop
