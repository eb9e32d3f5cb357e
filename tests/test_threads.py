"""`--threads`: torch's CPU threads per process (clarity/engine/threads.py).

The quota parser reads files in the formats of cgroup v2 and v1; the rest runs in fresh
processes, since torch's thread count is process-wide: a model loaded with auto threads, with
workers sharing the CPUs, with OMP_NUM_THREADS set, and pinned to one CPU by `taskset`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from clarity import SpeedOptions
from clarity.engine.threads import auto_threads, cgroup_cpu_quota, usable_cpus
from clarity.errors import ParamError

#: Loads the tiny model with the given speed options and workers, prints what it reports and what torch uses.
LOAD = """
import json, sys, torch
from clarity import SpeedOptions, Upscaler
threads, workers = int(sys.argv[1]), int(sys.argv[2])
upscaler = Upscaler.from_pretrained(sys.argv[3], device="cpu", speed=SpeedOptions(threads=threads), cpu_workers=workers)
print(json.dumps({"reported": upscaler.acceleration.cpu_threads, "torch": torch.get_num_threads()}))
"""


def load_in_fresh_process(weights, threads: int, workers: int, omp: str | None = None,
                          prefix: tuple[str, ...] = ()) -> dict[str, int]:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    done = subprocess.run([*prefix, sys.executable, "-c", LOAD, str(threads), str(workers), str(weights)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cgroup_quotas_are_read_in_both_formats(tmp_path):
    v2, quota, period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    v2.write_text("max 100000\n")
    assert cgroup_cpu_quota(v2, quota, period) is None  # unlimited
    v2.write_text("250000 100000\n")
    assert cgroup_cpu_quota(v2, quota, period) == 2.5
    v2.unlink()  # cgroup v1
    quota.write_text("-1\n")
    period.write_text("100000\n")
    assert cgroup_cpu_quota(v2, quota, period) is None
    quota.write_text("150000\n")
    assert cgroup_cpu_quota(v2, quota, period) == 1.5
    quota.unlink()  # neither
    assert cgroup_cpu_quota(v2, quota, period) is None


def test_auto_divides_the_usable_cpus_among_workers_unless_omp_num_threads_is_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = usable_cpus()
    assert auto_threads(1) == max(1, int(cpus))
    assert auto_threads(2) == max(1, int(cpus / 2))
    assert auto_threads(10_000) == 1  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert auto_threads(2) == 3


def test_a_negative_thread_count_is_refused_naming_the_flag():
    with pytest.raises(ParamError, match="--threads") as refused:
        SpeedOptions(threads=-1)
    assert refused.value.param == "threads"


def test_the_loaded_model_reports_and_uses_the_threads_the_policy_chose(tiny_weights):
    cpus = int(usable_cpus())
    assert load_in_fresh_process(tiny_weights, 0, 1) == {"reported": cpus, "torch": cpus}
    shared = max(1, cpus // 2)
    assert load_in_fresh_process(tiny_weights, 0, 2) == {"reported": shared, "torch": shared}
    assert load_in_fresh_process(tiny_weights, 0, 2, omp="3") == {"reported": 3, "torch": 3}
    assert load_in_fresh_process(tiny_weights, 5, 2, omp="3") == {"reported": 5, "torch": 5}  # the flag wins


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_auto_follows_the_cpus_the_process_is_pinned_to(tiny_weights):
    assert load_in_fresh_process(tiny_weights, 0, 1, prefix=("taskset", "-c", "0")) == {"reported": 1, "torch": 1}
