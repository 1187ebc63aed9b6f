"""An S3-compatible server on loopback for the tests: moto's server mode in a process of its
own. The code under test talks to it as to any S3 service (s3fs, pyarrow, boto3 through
``AWS_ENDPOINT_URL``); only the endpoint and the credentials (any will do) are moto's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

# Seconds moto has to answer after its start (about 2 s here; a busy two-core machine is slower).
START_TIMEOUT = 60.0
# Fake credentials: moto accepts any, and a real service would refuse these.
ACCESS_KEY, SECRET_KEY = "aemnist-test-key", "aemnist-test-secret"
REGION = "us-east-1"
# What points the AWS clients (boto3, botocore, s3fs) at a store or at credentials: removed
# from the environment of a process that must have none (``without_aws``).
AWS_PREFIXES = ("AWS_", "BOTO_", "MLFLOW_S3_")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def without_aws(env: dict[str, str]) -> dict[str, str]:
    """``env`` with no AWS credentials, endpoint or profile: a client that reaches S3 only
    through a server (MLflow's artifact proxy). The shared config and credentials files point
    at nothing, so that a developer's ~/.aws cannot lend it any either."""
    clean = {k: v for k, v in env.items() if not k.startswith(AWS_PREFIXES)}
    clean["AWS_CONFIG_FILE"] = clean["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    clean["AWS_EC2_METADATA_DISABLED"] = "true"  # no second-long probe of an instance role
    return clean


class S3Server:
    """moto's S3 server on 127.0.0.1 at a free port, started by the constructor; a context
    manager that stops it (its whole process group) on exit.

    ``env`` is what a process needs to use it: the endpoint, the credentials and the region,
    and nothing of the user's ~/.aws."""

    def __init__(self, log: Path) -> None:
        self.log = log
        for _ in range(3):  # another process may take the free port before moto binds it
            self.port = _free_port()
            self.endpoint = f"http://127.0.0.1:{self.port}"
            with log.open("ab") as sink:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stopped whole
                )
            if self._wait_until_answers():
                break
            self.stop()
        else:
            raise RuntimeError(f"moto's S3 server did not start; its log {log}:\n{self._tail()}")
        self.env = without_aws({}) | {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }
        self._client: Any = None

    def _wait_until_answers(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        return False

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    @property
    def client(self) -> Any:
        """A boto3 S3 client on this server (boto3 is imported only by tests that use it)."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
            )
        return self._client

    def make_bucket(self, name: str) -> str:
        """Create the bucket ``name``; returns its URL (``s3://name``)."""
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The keys in ``bucket`` under ``prefix``, sorted."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        """Stop moto's process group: SIGTERM, then SIGKILL after 10 s."""
        if self.process.poll() is not None:
            return
        with suppress(ProcessLookupError):  # it may end between the poll and the signal
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
