"""The production stack on one machine: a Prefect server and an MLflow tracking server as
child processes (their processes: deployments/servers.py), the `aemnist` work pool with the
study's deployments, and a process worker.

Every startup problem (a port in use, a server that does not come up in time, a missing
server or pool, an unreachable tracking server) raises ``StackError`` with one message that
names the thing and the fix, before any training starts.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path("deployments") / "prefect.yaml"
WORK_POOL = "aemnist"
FLOW_NAME = "study"
PREFECT_API_ENV = "PREFECT_API_URL"
LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    """A server, pool or worker cannot start; the message says what to fix."""


def _prefect_executable() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool ``name`` unless it exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pass
        else:
            if pool.type != "process":
                raise StackError(
                    f"work pool {name!r} exists with type {pool.type!r}, not 'process'; "
                    f"delete it (`prefect work-pool delete {name}`) and run `aemnist deploy` again"
                )
            return False
        template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(
            WorkPoolCreate(name=name, type="process", base_job_template=template)
        )
    return True


def work_pool_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            return False
    return True


def deploy_study(env: Mapping[str, str]) -> list[str]:
    """Apply deployments/prefect.yaml from the repo root (so that the recorded working
    directory is the repo root); returns the deployment names ("study/smoke", ...)."""
    command = [
        *_prefect_executable(), "--no-prompt", "deploy", "--all",
        "--prefect-file", str(PREFECT_FILE),
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=PROJECT_ROOT, env=dict(env), capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()
        raise StackError(
            f"`prefect deploy` of {PREFECT_FILE} failed (exit {proc.returncode}):\n    "
            + "\n    ".join(output[-12:])
        )
    return deployment_names()


def deployment_names() -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))
        )
    return sorted(f"{FLOW_NAME}/{d.name}" for d in deployments)


def worker_command(pool: str, limit: int | None, name: str | None) -> list[str]:
    command = [*_prefect_executable(), "worker", "start", "--pool", pool, "--type", "process"]
    if limit:
        command += ["--limit", str(limit)]
    if name:
        command += ["--name", name]
    return command
