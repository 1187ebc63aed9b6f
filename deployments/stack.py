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
# The deployments' working directory (prefect.yaml's pull step).
ROOT_ENV = "AEMNIST_ROOT"
# The runs' environment that the deployments record from the deploying shell.
JOB_ENV = ("AEMNIST_MNIST_MIRROR", "MLFLOW_TRACKING_URI")
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
    """Apply deployments/prefect.yaml from the repo root, its `{{ $NAME }}` placeholders
    taken from ``env``: the pull step's AEMNIST_ROOT (the repo root unless ``env`` names
    another) and the runs' environment (JOB_ENV). Returns the deployment names
    ("study/smoke", ...).

    A variable of JOB_ENV that ``env`` lacks is left out of the deployments (Prefect would
    record it empty, which would hide the worker's own); one whose URL carries credentials
    is refused, as Prefect stores and shows job variables."""
    from aemnist.data import has_secrets, redact_url

    for name in JOB_ENV:
        if has_secrets(env.get(name)):
            raise StackError(
                f"{name}={redact_url(env[name])} carries credentials or a query string, which "
                f"the deployments would store in Prefect as a job variable: unset it in this "
                f"shell and set it in the environment of `aemnist worker` instead"
            )
    command = [
        *_prefect_executable(), "--no-prompt", "deploy", "--all",
        "--prefect-file", str(PREFECT_FILE),
    ]  # fmt: skip
    deploy_env = {ROOT_ENV: str(PROJECT_ROOT), **env}
    proc = subprocess.run(
        command, cwd=PROJECT_ROOT, env=deploy_env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()
        raise StackError(
            f"`prefect deploy` of {PREFECT_FILE} failed (exit {proc.returncode}):\n    "
            + "\n    ".join(output[-12:])
        )
    _drop_unset_job_env([name for name in JOB_ENV if not env.get(name)])
    return deployment_names()


def _drop_unset_job_env(unset: list[str]) -> None:
    """Remove from the study's deployments the job variables ``unset`` that `prefect deploy`
    recorded as empty strings."""
    if not unset:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))
        ):
            variables = dict(deployment.job_variables or {})
            job_env = {k: v for k, v in (variables.get("env") or {}).items() if k not in unset or v}
            client.update_deployment(
                deployment.id, DeploymentUpdate(job_variables={**variables, "env": job_env})
            )


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
