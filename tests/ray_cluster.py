"""A real two-node Ray cluster on loopback addresses for tests (tests/test_ray_serving.py, tests/test_ray_batch.py).

A head node (127.0.0.2) and a worker node (127.0.0.3), each a `ray start --block` process in a session
of its own, with explicit ports and one `gpu_slot` each standing for a GPU (on Linux Ray rewrites
127.0.0.1, hence .2 and .3). Killing a node is killing every process of its session with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT, free_port

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
RAY = str(Path(sys.executable).with_name("ray"))
#: Every process of the cluster and of the commands under test: one torch thread (two cores are shared by
#: all), nothing sent anywhere (Ray's usage statistics), every log line of the replicas relayed to the driver.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
STARTED = "Ray runtime started"


def kill_session(session: int) -> None:
    """SIGKILL every process of `session`: a whole Ray node (raylet, agents, its workers and replicas)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def titles(session: int) -> list[str]:
    """The titles (first word of the command line) of every process of `session`. Ray titles an actor's process
    `ray::CLASS` (`ray::CLASS.METHOD` while it runs METHOD); a Serve replica's class is
    `ServeReplica:APP:DEPLOYMENT`."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError):
            if entry.isdigit() and os.getsid(int(entry)) == session:
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
    return found


class Session:
    """A command in a session of its own (its id is its pid), its output in `log`; `env` added to `ENV`."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                            env={**ENV, **(env or {})}, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, seconds: float) -> re.Match:
        deadline = time.monotonic() + seconds
        while (found := re.search(pattern, self.text())) is None:
            assert self.process.poll() is None, self.text()[-4000:]
            assert time.monotonic() < deadline, f"no {pattern!r} after {seconds} s:\n{self.text()[-4000:]}"
            time.sleep(0.2)
        return found

    def kill(self) -> None:
        kill_session(self.process.pid)
        self.process.wait(10)


def node_command(ip: str, head: str | None) -> list[str]:
    """`ray start` for a node on `ip` with its own ports (the head when `head` is None, else joining it)."""
    ports = {"node-manager-port": free_port(), "object-manager-port": free_port(),
             "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
             "runtime-env-agent-port": free_port(), "metrics-export-port": free_port()}
    command = [RAY, "start", "--block", f"--node-ip-address={ip}", "--num-cpus=2", '--resources={"gpu_slot": 1}',
               "--object-store-memory=100000000", "--min-worker-port=0", "--max-worker-port=0",
               "--disable-usage-stats", *(f"--{name}={port}" for name, port in ports.items())]
    if head is None:
        return [*command, "--head", f"--port={free_port()}", f"--ray-client-server-port={free_port()}",
                "--include-dashboard=false", f"--dashboard-host={ip}", f"--dashboard-port={free_port()}"]
    return [*command, f"--address={head}"]


@dataclass
class Cluster:
    address: str
    root: Path
    head: Session
    worker: Session


@contextlib.contextmanager
def two_node_cluster() -> Iterator[Cluster]:
    """A head and a worker node, up; both killed and their folder removed at the end."""
    # Short: Ray's socket paths under it must fit in 107 characters.
    root = Path(tempfile.mkdtemp(prefix="clr-", dir="/tmp"))
    sessions: list[Session] = []
    try:
        command = node_command(HEAD_IP, None)
        port = next(part.split("=")[1] for part in command if part.startswith("--port="))
        sessions.append(head := Session([*command, f"--temp-dir={root / 'ray'}"], root / "head.log"))
        head.wait_for(STARTED, 120)
        address = f"{HEAD_IP}:{port}"
        sessions.append(worker := Session(node_command(WORKER_IP, address), root / "worker.log"))
        worker.wait_for(STARTED, 120)
        yield Cluster(address, root, head, worker)
    finally:
        for session in sessions:
            session.kill()
        shutil.rmtree(root, ignore_errors=True)
