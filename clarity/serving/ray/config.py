"""`RayConfig`: where `clarity serve --ray` puts the API core on a Ray cluster, each option defined once.

The API's own options stay in `ServerConfig`, the same for both runtimes (`--max-queue` is Ray
Serve's `max_queued_requests` here). These are the cluster's: which cluster, what each upscaler
replica holds, how many there are or how they scale, and where Ray Serve's HTTP proxies listen. No
Ray import: the CLI derives the flags from these fields whether or not Ray is installed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from clarity.errors import ParamError, echo
from clarity.options import option
from clarity.params import check_range

#: `--ray` without an address: start a Ray cluster on this machine for the server's lifetime (Ray's own word
#: for it, as "auto" is for the cluster this machine belongs to).
LOCAL_CLUSTER = "local"
#: Ray's names of its own resources; any other name is a custom resource (`ray start --resources`).
GPU, CPU = "GPU", "CPU"
PROXY_LOCATIONS = ("EveryNode", "HeadOnly")
_RESOURCE = re.compile(r"([A-Za-z_][A-Za-z0-9_.:-]*)(?:=([0-9]+(?:\.[0-9]+)?))?")


def parse_resource(text: str) -> tuple[str, float]:
    """`NAME[=AMOUNT]` as (name, amount): "GPU" -> ("GPU", 1.0), "CPU=4" -> ("CPU", 4.0); a `ParamError` naming
    `replica_resource` otherwise."""
    match = _RESOURCE.fullmatch(text.strip())
    if match is None or (match[2] is not None and float(match[2]) <= 0):
        raise ParamError("replica_resource", f"expected GPU, CPU=N or NAME[=AMOUNT] with a positive amount; got"
                         f" {echo(text)}")
    return match[1], float(match[2] or 1)


@dataclass(frozen=True)
class RayConfig:
    """How the API core is placed on a Ray cluster: the cluster, the upscaler replicas, the proxies."""

    address: str = option(
        LOCAL_CLUSTER, "The Ray cluster: auto (the one this machine belongs to), HOST:PORT of its head, or local"
        " (start one on this machine, for as long as the server runs).", metavar="ADDRESS",
    )
    replica_resource: str = option(
        GPU, "What each upscaler replica holds, so one runs per unit of it: GPU (one GPU each), CPU=N (N CPUs, for"
        " a cluster without GPUs) or NAME[=AMOUNT], a custom resource the nodes were started with"
        " (ray start --resources='{\"NAME\": 1}').", metavar="NAME[=AMOUNT]",
    )
    replicas: int | None = option(
        None, "Upscaler replicas (default: as many as the cluster has units of --replica-resource when the server"
        " starts).", min=1,
    )
    min_replicas: int | None = option(
        None, "With --max-replicas: the fewest upscaler replicas Ray Serve's autoscaler keeps (default 1; 0 lets"
        " it stop them all when idle, and the next request waits for the models to load).", min=0,
    )
    max_replicas: int | None = option(
        None, "Scale the upscaler replicas with the load (Ray Serve's autoscaling, aiming at"
        " --max-ongoing-requests per replica), up to this many.", min=1,
    )
    max_ongoing_requests: int = option(
        1, "Edits one upscaler replica runs at once; more wait in the queue (--max-queue).", min=1,
    )
    ingress_replicas: int = option(
        1, "Ingress replicas (auth, limits, job routes; they forward each edit to an upscaler replica), all on the"
        " head node. --max-queue counts per ingress replica.", min=1,
    )
    proxy_location: str = option(
        PROXY_LOCATIONS[0], "Where Ray Serve's HTTP proxies listen on --host and --port: EveryNode (every node"
        " with a replica) or HeadOnly.", choices=PROXY_LOCATIONS,
    )

    def __post_init__(self) -> None:
        """Refuse out-of-range numbers, unknown choices and contradictions with a `ParamError` naming the option."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise ParamError(f.name, f"must be one of {', '.join(meta['choices'])}; got {echo(str(value))}")
            if isinstance(value, int) and not isinstance(value, bool):
                check_range(f.name, value, meta["min"], meta["max"])
        parse_resource(self.replica_resource)  # now, so that a wrong one is refused before connecting
        if self.replicas is not None and self.max_replicas is not None:
            raise ParamError("replicas", "give either --replicas (a fixed number) or --max-replicas (autoscaling)")
        if self.min_replicas is not None and self.max_replicas is None:
            raise ParamError("min_replicas", "--min-replicas is for autoscaling: give --max-replicas too")
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise ParamError("min_replicas", f"must be at most --max-replicas ({self.max_replicas})")

    @property
    def resource(self) -> tuple[str, float]:
        """`replica_resource` as (name, amount per replica)."""
        return parse_resource(self.replica_resource)

    @property
    def uses_gpu(self) -> bool:
        return self.resource[0] == GPU

    def device(self, accelerator: str) -> str:
        """Where the replicas run the models, for `ServerConfig.accelerator`: CUDA on the GPU each replica holds,
        else the CPU; a `ParamError` naming `accelerator` for CUDA without GPU replicas."""
        if self.uses_gpu and accelerator != "cpu":
            return "cuda"
        if accelerator == "cuda":
            raise ParamError("accelerator", "--accelerator cuda needs GPU replicas (--replica-resource GPU)")
        return "cpu"

    def actor_options(self) -> dict[str, Any]:
        """Ray Serve's `ray_actor_options` for one upscaler replica (Serve adds one CPU where none is named)."""
        name, amount = self.resource
        if name == GPU:
            return {"num_gpus": amount}
        if name == CPU:
            return {"num_cpus": amount}
        return {"resources": {name: amount}}

    def autoscaling(self) -> dict[str, Any] | None:
        """Ray Serve's `autoscaling_config` for the upscaler, or None for a fixed number of replicas."""
        if self.max_replicas is None:
            return None
        return {"min_replicas": 1 if self.min_replicas is None else self.min_replicas,
                "max_replicas": self.max_replicas, "target_ongoing_requests": self.max_ongoing_requests}

    def replica_count(self, cluster_resources: dict[str, float]) -> int:
        """The fixed number of upscaler replicas: `replicas`, else one per unit of the resource in the cluster
        (`ray.cluster_resources()`); a `ParamError` naming `replica_resource` if it has none."""
        if self.replicas is not None:
            return self.replicas
        name, amount = self.resource
        count = int(cluster_resources.get(name, 0) // amount)
        if count < 1:
            hint = " (a cluster without GPUs: --replica-resource CPU=4, say)" if name == GPU else ""
            raise ParamError("replica_resource", f"the cluster has {cluster_resources.get(name, 0):g} {name}, not"
                             f" enough for one upscaler replica holding {amount:g}{hint}")
        return count

    def most_replicas(self, cluster_resources: dict[str, float]) -> int:
        """How many upscaler replicas may run at once: `max_replicas` when autoscaling, else `replica_count`."""
        return self.max_replicas if self.max_replicas is not None else self.replica_count(cluster_resources)
