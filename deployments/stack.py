"""The production stack on one machine: a Prefect server and an MLflow tracking server as
child processes, the `aemnist` work pool with the study's deployments, and a process worker.

Every startup problem (a port in use, a server that does not come up in time, a missing
server or pool, an unreachable tracking server) raises ``StackError`` with one message that
names the thing and the fix, before any training starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = Path("deployments") / "prefect.yaml"
WORK_POOL = "aemnist"
FLOW_NAME = "study"
PREFECT_API_ENV = "PREFECT_API_URL"
LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    """A server, pool or worker cannot start; the message says what to fix."""


@dataclass
class Service:
    """A server started as a child process in its own process group."""

    name: str
    url: str
    health_url: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if not self.alive():
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _prefect_executable() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n    ".join(text[-lines:]) or "(empty log)"


def check_port_free(host: str, port: int, what: str, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves bind: a port in TIME_WAIT is free, one listened on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StackError(
                f"cannot start the {what} on {host}:{port}: the port is in use ({exc.strerror}); "
                f"stop whatever listens there or pick another port with {option}"
            ) from None


def answers(url: str, timeout: float = 3.0) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def launch_service(
    name: str, command: list[str], env: Mapping[str, str], url: str, health_url: str, log: Path
) -> Service:
    """Start ``command`` in its own process group, logging to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=PROJECT_ROOT,
            start_new_session=True,  # its own process group: stop() reaches its children
        )
    return Service(name, url, health_url, process, log)


def wait_until_ready(services: list[Service], timeout: float) -> None:
    """Wait until every service answers its health URL; otherwise stop them all and say
    which did not come up, with the end of its log."""
    deadline = time.monotonic() + timeout
    waiting = list(services)
    while waiting:
        service = waiting[0]
        code = service.process.poll()
        if code is not None:
            problem = f"exited with code {code} before answering at {service.health_url}"
        elif answers(service.health_url, timeout=2.0):
            waiting.pop(0)
            continue
        elif time.monotonic() > deadline:
            problem = (
                f"did not answer at {service.health_url} within {timeout:g} s (on a slow or "
                f"busy machine, allow longer with --timeout)"
            )
        else:
            time.sleep(0.5)
            continue
        for started in services:
            started.stop()
        raise StackError(
            f"the {service.name} {problem}; its log {service.log} ends:\n    "
            f"{_log_tail(service.log)}"
        )


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    return LOOPBACK if host in ("0.0.0.0", "", "::") else host


def start_prefect_server(state_dir: Path, host: str, port: int, env: Mapping[str, str]) -> Service:
    """A Prefect server (API and UI) with its database in ``state_dir``."""
    server_env = {
        **env,
        "PREFECT_HOME": str(state_dir / "prefect-home"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
            f"sqlite+aiosqlite:///{state_dir / 'prefect.db'}"
        ),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_env.pop(PREFECT_API_ENV, None)
    url = f"http://{_client_host(host)}:{port}"
    command = [*_prefect_executable(), "server", "start", "--host", host, "--port", str(port)]
    return launch_service(
        "Prefect server", command, server_env, url, f"{url}/api/health",
        state_dir / "prefect-server.log",
    )  # fmt: skip


def start_mlflow_server(
    workdir: Path, state_dir: Path, host: str, port: int, env: Mapping[str, str]
) -> Service:
    """An MLflow tracking server on the work dir's store: the same SQLite database and
    artifact folder that `aemnist run` uses without a server, so local and deployed runs
    show side by side. Artifacts are served through the server (mlflow-artifacts:/), so
    workers that do not share this file system can log them."""
    from aemnist.tracking import embedded_tracking_uri  # imports MLflow: only when needed

    url = f"http://{_client_host(host)}:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", embedded_tracking_uri(workdir),
        "--artifacts-destination", str(workdir / "mlartifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    return launch_service(
        "MLflow server", command, server_env, url, f"{url}/health",
        state_dir / "mlflow-server.log",
    )  # fmt: skip


def require_prefect_api(command: str) -> str:
    """The Prefect API this process talks to; it must be a running server."""
    api = os.environ.get(PREFECT_API_ENV, "").rstrip("/")
    if not api:
        raise StackError(
            f"`aemnist {command}` needs a Prefect server: start one with `aemnist server` "
            f"and export the PREFECT_API_URL it prints (or point PREFECT_API_URL at an "
            f"existing server)"
        )
    if not answers(f"{api}/health"):
        raise StackError(
            f"no Prefect server answers at PREFECT_API_URL={api}: start it (`aemnist server`) "
            f"or correct PREFECT_API_URL"
        )
    return api


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
