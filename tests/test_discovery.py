"""The discovery file `aemnist server` leaves in its work dir: private, and ignored once
stale or malformed (its running, answering case: tests/test_shared_server_e2e.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import refused_port

from deployments.discovery import (
    ENDPOINTS,
    Endpoints,
    find_servers,
    remove_endpoints,
    server_dir,
    write_endpoints,
)


def exited_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    server_dir(tmp_path).mkdir()
    return tmp_path


def test_endpoints_file_is_written_private_and_removed_only_by_its_own_server(
    workdir: Path,
) -> None:
    endpoints = Endpoints("http://127.0.0.1:4200/api", "http://127.0.0.1:5000", os.getpid())
    path = write_endpoints(workdir, endpoints)
    assert path == workdir / "server" / ENDPOINTS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {
        "prefect_api_url": "http://127.0.0.1:4200/api",
        "mlflow_tracking_uri": "http://127.0.0.1:5000",
        "pid": os.getpid(),
    }
    remove_endpoints(workdir, os.getpid() + 1)  # another server's stop leaves it
    assert path.exists()
    remove_endpoints(workdir, os.getpid())
    assert not path.exists()


def test_a_file_left_by_a_server_that_is_gone_is_ignored(workdir: Path) -> None:
    with refused_port() as port:
        api = f"http://127.0.0.1:{port}/api"
        # Its process has exited (a server killed with SIGKILL).
        write_endpoints(workdir, Endpoints(api, "http://127.0.0.1:5000", exited_pid()))
        assert find_servers(workdir) is None
        # Its process id now names a live process (reused), but no Prefect API answers.
        write_endpoints(workdir, Endpoints(api, "http://127.0.0.1:5000", os.getpid()))
        assert find_servers(workdir, patience=1.0) is None


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"prefect_api_url": "http://127.0.0.1:1/api", "pid": 1}',
        '{"prefect_api_url": "file:///etc", "mlflow_tracking_uri": "http://h", "pid": 1}',
        '{"prefect_api_url": "http://h/api", "mlflow_tracking_uri": "http://h", "pid": "x"}',
        '{"prefect_api_url": "http://h/api", "mlflow_tracking_uri": "http://h", "pid": -1}',
    ],
)
def test_a_malformed_endpoints_file_is_ignored(workdir: Path, content: str) -> None:
    (server_dir(workdir) / ENDPOINTS).write_text(content)
    assert find_servers(workdir) is None


def test_no_endpoints_file_finds_no_servers(tmp_path: Path) -> None:
    assert find_servers(tmp_path) is None
