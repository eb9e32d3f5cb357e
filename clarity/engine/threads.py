"""How many torch threads a process upscaling on the CPU uses (`--threads`).

torch's default is one thread per CPU the process may run on, whatever else shares them. Two
cases make that wrong for a server: several workers on one machine (`--workers-per-device 2`
on the CPU), each taking every core, so that the cores are oversubscribed and every job slows;
and a container whose CPU quota is smaller than the host it sees (Kubernetes `limits.cpu: 4` on
a 64-core node), where torch's 64 threads are throttled to 4 cores' time. `--threads 0` (auto)
therefore takes, in this order:

1. `OMP_NUM_THREADS`, when set: the operator's, or the runtime's (Ray sets it for each actor
   from the CPUs it reserves, 1 when it reserves none) — torch itself already follows it;
2. else the CPUs this process may use (its affinity, capped by the cgroup's CPU quota) divided
   among the `workers` processes that share them, at least 1.

`--threads N` sets N whatever the environment says. What a busy machine's other programs take
is not known here; README (Performance, "Threads") has the measurements on a quiet and a loaded
machine.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from clarity.errors import ParamError

logger = logging.getLogger(__name__)

#: cgroup v2's CPU limit ("max 100000" when unlimited) and cgroup v1's pair of files.
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_quota(v2: Path = CGROUP_V2_CPU_MAX, v1_quota: Path = CGROUP_V1_QUOTA,
                     v1_period: Path = CGROUP_V1_PERIOD) -> float | None:
    """CPUs' worth of time the container may use (quota / period), or None when it has no limit.

    Read by hand: neither the standard library (before Python 3.13's `os.process_cpu_count`, which
    still ignores quotas) nor psutil reads cgroup quotas, and the two file formats are one line each.
    """
    try:
        quota, period = v2.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = v1_quota.read_text().strip(), v1_period.read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        cpus = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return cpus if cpus > 0 else None


def usable_cpus() -> float:
    """CPUs this process may use: its affinity mask, capped by the container's CPU quota."""
    cpus: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return min(cpus, quota) if quota is not None else cpus


def auto_threads(workers: int = 1) -> int:
    """`--threads 0`: `OMP_NUM_THREADS` if set to a positive number, else `usable_cpus() / workers`, at least 1."""
    from_environment = os.environ.get("OMP_NUM_THREADS", "")
    if from_environment.isdigit() and int(from_environment) > 0:
        return int(from_environment)
    return max(1, math.floor(usable_cpus() / max(workers, 1)))


def set_cpu_threads(threads: int, workers: int = 1) -> int:
    """Set torch's intra-op threads for this process to `threads`, or `auto_threads(workers)` when it is 0.

    Returns the count set. Process-wide: call it once per process, before the first job.
    """
    if threads < 0:
        raise ParamError("threads", f"--threads must be 0 (auto) or a positive number; got {threads}")
    count = threads or auto_threads(workers)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    logger.info("torch uses %d CPU threads (--threads %s, %d worker(s) sharing %g CPUs)", count,
                threads or "auto", workers, usable_cpus())
    return count
