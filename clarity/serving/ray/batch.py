"""The driver of `clarity upscale --ray ADDRESS INPUTS... -o OUTPUT`: a batch as a Ray Data job.

    clarity upscale --ray auto s3://in/ -o s3://out/ --weights /srv/weights --scale 2

It lists the inputs (local files and folders on a filesystem every node shares, or `s3://` objects and
prefixes), skips those whose result exists, connects to the cluster and runs one Ray Data job:
`map_batches` over one row per image with `batch_upscaler.BatchUpscaler` actors, one per unit of the
replica resource (a GPU by default), each loading the model once. Each result is committed atomically
by the actor (batch_storage), so a node that dies costs only its images in flight (Ray Data runs them
again elsewhere) and a driver that dies costs a re-run of the same command, which skips what was
committed. Completed rows stream back to the driver (its progress bar) and make the report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from clarity.errors import ClarityError, ParamError
from clarity.serving.ray import batch_storage
from clarity.serving.ray.batch_actor import ModelSpec
from clarity.serving.ray.batch_report import BatchReport
from clarity.serving.ray.config import CPU, GPU, parse_resource

#: boto3's settings that travel from the driver's environment to the job's workers (a worker's own
#: environment is its node's `ray start`'s), so that the actors reach the same storage as the driver.
FORWARDED_ENV_PREFIXES = ("AWS_",)


@dataclass(frozen=True)
class ClusterSpec:
    """Which cluster, and how many actors hold what: `resource` as for `clarity serve --ray`'s replicas."""

    address: str
    resource: str = GPU
    actors: int | None = None  # default: one per unit of `resource` in the cluster


def plan(inputs: list[str], output: str, output_format: str) -> tuple[list[batch_storage.Item], set[str]]:
    """The batch's items, and the targets of those already done. Refuses a single output file: a cluster
    batch writes into a folder or prefix."""
    if not batch_storage.is_s3(output) and os.path.isfile(output):
        raise ParamError("output", f"{output} is a file; with --ray, give an output folder or s3:// prefix")
    try:
        items = batch_storage.plan_items(batch_storage.list_sources(inputs), output, output_format)
        return items, batch_storage.existing([item.target for item in items])
    except ParamError:
        raise
    except Exception as error:  # boto3's: no endpoint, refused credentials, no such bucket
        if type(error).__module__.startswith(("botocore", "boto3")):
            raise ClarityError(f"cannot list the batch's inputs or outputs in S3: {error}") from error
        raise


def upscale_on_ray(inputs: list[str], output: str, spec: ModelSpec, cluster: ClusterSpec,
                   on_row: Callable[[dict], None], on_plan: Callable[[int, int], None]) -> BatchReport:
    """Upscale every input not done yet on the cluster; the report. `on_plan(todo, skipped)` hears the plan
    before the job starts, `on_row` each completed row as it arrives."""
    started = time.perf_counter()
    items, done = plan(inputs, output, spec.output_format)
    missing = [item.source for item in items
               if item.target not in done and not batch_storage.is_s3(item.source) and not os.path.isfile(item.source)]
    todo = [item for item in items if item.target not in done and item.source not in missing]
    on_plan(len(todo), len(done))
    rows = _run_job(todo, spec, cluster, on_row) if todo else []
    batch_storage.remove_partials([item.target for item in todo])
    return BatchReport.of(len(items), len(done), missing, rows, time.perf_counter() - started)


def _run_job(todo: list[batch_storage.Item], spec: ModelSpec, cluster: ClusterSpec,
             on_row: Callable[[dict], None]) -> list[dict]:
    """Connect to the cluster and run the job over `todo`; every output row."""
    import ray

    ray.init(address=cluster.address, runtime_env={"env_vars": forwarded_environment()},
             log_to_driver=False, logging_level="WARNING")
    try:
        rows = []
        for row in _rows(todo, spec, cluster):
            on_row(row)
            rows.append(row)
        return rows
    finally:
        ray.shutdown()


def _rows(todo: list[batch_storage.Item], spec: ModelSpec, cluster: ClusterSpec) -> Iterator[dict]:
    """The Ray Data job's output rows, as they complete: one block per image, so that a lost node costs
    only the images it held."""
    import ray

    from clarity.serving.ray.batch_actor import BatchUpscaler

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts images
    context.print_on_execution_start = False
    dataset = ray.data.from_items([{"source": item.source, "target": item.target} for item in todo],
                                  override_num_blocks=len(todo))
    actors = ray.data.ActorPoolStrategy(size=actor_count(cluster, ray.cluster_resources()))
    dataset = dataset.map_batches(BatchUpscaler, fn_constructor_kwargs={"spec": spec}, batch_size=1,
                                  batch_format="numpy", compute=actors,
                                  **actor_resources(cluster.resource))
    for row in dataset.iter_rows():
        yield {key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()}


def actor_count(cluster: ClusterSpec, cluster_resources: dict[str, float]) -> int:
    """`cluster.actors`, else one actor per unit of the resource in the cluster; a `ParamError` naming
    `replica_resource` if there is not one unit."""
    if cluster.actors is not None:
        return cluster.actors
    name, amount = parse_resource(cluster.resource)
    count = int(cluster_resources.get(name, 0) // amount)
    if count < 1:
        raise ParamError("replica_resource", f"the cluster has {cluster_resources.get(name, 0):g} {name}, not"
                         f" enough for one batch actor holding {amount:g}")
    return count


def actor_resources(resource: str) -> dict:
    """`map_batches`' resource arguments for one actor holding `resource`."""
    name, amount = parse_resource(resource)
    if name == GPU:
        return {"num_gpus": amount}
    if name == CPU:
        return {"num_cpus": amount}
    return {"resources": {name: amount}}


def device_for(resource: str, device: str | None) -> str:
    """Where the actors run the model: `device` if given, else CUDA on GPU actors and the CPU otherwise."""
    if device is not None:
        return device
    return "cuda" if parse_resource(resource)[0] == GPU else "cpu"


def forwarded_environment() -> dict[str, str]:
    """The driver's storage settings (boto3's `AWS_*` variables) for the job's workers."""
    return {name: value for name, value in os.environ.items() if name.startswith(FORWARDED_ENV_PREFIXES)}
