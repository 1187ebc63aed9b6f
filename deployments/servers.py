"""Server processes: the stack's Prefect and MLflow servers (`aemnist server`), the MLflow UI
(`aemnist ui`) and the temporary Prefect server of one `aemnist run`.

All of them are launched by ``launch_server`` and waited for by ``wait_until_answers``. A
server asked for port 0 binds a free port itself; the port it got is read from the listening
socket of its process (or of one of its children), so that no port is picked here and taken
by someone else before the server binds it.

Only the standard library at import time: `aemnist run` launches its temporary server from
here before it imports torch, MLflow or Prefect.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from deployments.stack import LOOPBACK, PREFECT_API_ENV, PROJECT_ROOT, StackError

# Prefect's state types outside its TERMINAL_STATES (prefect.states): a task run in one of
# these has not reached its final state.
UNFINISHED_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


@dataclass
class Service:
    """A server running as a child process; ``port`` is 0 until the port it bound is known."""

    name: str
    host: str  # where a client on this machine reaches it
    port: int
    health_path: str
    process: subprocess.Popen[bytes]
    log: Path | None  # None: its output is ours and it is in our process group

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.url}{self.health_path}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; to its whole process group when it
        has one of its own (it then reaches the workers a server starts)."""
        if not self.alive():
            return
        send = os.killpg if self.log is not None else os.kill
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                send(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def launch_server(
    name: str,
    command: list[str],
    env: Mapping[str, str],
    host: str,
    port: int,
    health_path: str,
    log: Path | None = None,
) -> Service:
    """Start ``command``, a server bound to ``host``:``port`` (0: a free port of its choice).
    With a ``log``, the server writes there and runs from the repo root in a process group of
    its own, which ``Service.stop`` signals whole (a server's own workers included); without,
    it shares our output and our process group, so that a Ctrl-C reaches it as it reaches us."""
    output = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        output = log.open("ab")
    try:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=PROJECT_ROOT if log is not None else None,
            start_new_session=log is not None,
        )
    finally:
        if output is not None:
            output.close()
    return Service(name, client_host(host), port, health_path, process, log)


def client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    return LOOPBACK if host in ("0.0.0.0", "", "::") else host


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


class PortProbe:
    """The TCP port that process ``pid`` or one of its descendants listens on, read from
    Linux's /proc: the socket inodes among the processes' open files, looked up among the
    listening sockets of their network namespace. (A server's own report of its port would
    depend on its log level and format: uvicorn's "running on" line is an INFO message.)

    Reading the socket tables takes milliseconds (the kernel walks every socket of the
    namespace), so ``port()`` reads them only when the processes' sockets have changed since
    its last look, and otherwise at most every ``recheck`` seconds (a socket seen between its
    bind and its listen)."""

    def __init__(self, pid: int, recheck: float = 0.5) -> None:
        if not Path("/proc/self/net/tcp").exists():
            raise StackError(
                "finding the port a server bound needs Linux's /proc; give it a port other than 0"
            )
        self.pid = pid
        self.recheck = recheck
        self.sockets: dict[int, set[str]] = {}
        self.looked_at = -math.inf

    def port(self) -> int | None:
        """The port listened on (the first found, parents first); None while there is none."""
        tree = _process_tree(self.pid)
        sockets = {proc: inodes for proc in tree if (inodes := _socket_inodes(proc))}
        if sockets == self.sockets and time.monotonic() - self.looked_at < self.recheck:
            return None
        self.sockets, self.looked_at = sockets, time.monotonic()
        for proc, inodes in sockets.items():
            for table in ("tcp", "tcp6"):
                try:
                    lines = Path(f"/proc/{proc}/net/{table}").read_text().splitlines()[1:]
                except OSError:  # it has just exited
                    continue
                for line in lines:
                    # sl, local_address (hex ADDR:PORT), rem_address, st (0A: LISTEN), ...,
                    # inode
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                        return int(fields[1].rpartition(":")[2], 16)
        return None


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, parents before children."""
    tree = [pid]
    for parent in tree:  # grows while it is walked
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                tree += [int(child) for child in children.read_text().split()]
            except (OSError, ValueError):  # the thread or process has just exited
                continue
    return tree


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def answers(url: str, timeout: float = 3.0) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until_answers(
    service: Service, deadline: float, interval: float, request_timeout: float = 2.0
) -> bool:
    """Poll ``service`` until its health URL answers (True), it exits or ``deadline`` (on
    the monotonic clock) passes (False; ``service.process.returncode`` tells which). A
    service started on port 0 first gets the port it bound."""
    probe = None if service.port else PortProbe(service.process.pid)
    while True:
        if service.process.poll() is not None:
            return False
        if probe is not None and not service.port:
            service.port = probe.port() or 0
        if service.port and answers(service.health_url, timeout=request_timeout):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def _log_tail(path: Path | None, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines() if path else []
    except OSError:
        return "(no log)"
    return "\n    ".join(text[-lines:]) or "(empty log)"


def wait_until_ready(services: list[Service], timeout: float) -> None:
    """Wait until every service answers its health URL; otherwise stop them all and say
    which did not come up, with the end of its log."""
    deadline = time.monotonic() + timeout
    for service in services:
        if wait_until_answers(service, deadline, interval=0.5):
            continue
        code = service.process.returncode
        at = f" at {service.health_url}" if service.port else ""
        if code is not None:
            problem = f"exited with code {code} before answering{at}"
        else:
            bound = "" if service.port else "it had bound no port yet; "
            problem = (
                f"did not answer{at} within {timeout:g} s ({bound}on a slow or busy machine, "
                f"allow longer with --timeout)"
            )
        for started in services:
            started.stop()
        raise StackError(
            f"the {service.name} {problem}; its log {service.log} ends:\n    "
            f"{_log_tail(service.log)}"
        )


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
    command = [
        sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
    ]  # fmt: skip
    return launch_server(
        "Prefect server", command, server_env, host, port, "/api/health",
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

    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", embedded_tracking_uri(workdir),
        "--artifacts-destination", str(workdir / "mlartifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
    return launch_server(
        "MLflow server", command, server_env, host, port, "/health",
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


def wait_for_task_runs(api_url: str, since: datetime, limit: float) -> None:
    """Wait, at most ``limit`` seconds, until the Prefect API at ``api_url`` counts no task
    run in an unfinished state among the flow runs that started after ``since``. Task runs
    reach the server as events, which its task-run recorder writes one by one: once every
    task run it holds is final, it has written the last events it was sent. Returns at once
    when the server does not answer."""
    body = json.dumps(
        {
            "flow_runs": {"start_time": {"after_": since.isoformat()}},
            "task_runs": {"state": {"type": {"any_": list(UNFINISHED_STATES)}}},
        }
    ).encode()
    deadline = time.monotonic() + limit
    while True:
        request = urllib.request.Request(
            f"{api_url}/task_runs/count",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            timeout = max(deadline - time.monotonic(), 0.5)
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if json.load(response) == 0:
                    return
        except (OSError, ValueError):  # it is gone, or answers no count: nothing to wait for
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


class TemporaryPrefectServer:
    """One run's temporary Prefect server: the uvicorn process Prefect's own temporary
    server runs (prefect.server.api.server.SubprocessASGIServer), launched without importing
    the server's code here. It starts before this process imports torch, MLflow and Prefect,
    so their seconds and the server's overlap; `ready()` waits for its health check. The
    whole process, and the worker processes it starts (Dask's), is pointed at it: they would
    otherwise each start a temporary server of their own."""

    def __init__(self) -> None:
        self.service = self._launch()
        # Stopped after the process's last logs and events are shipped to it: Prefect
        # registers their flush at exit after this, and exit handlers run last-in first-out.
        atexit.register(self.stop)
        self.error: StackError | None = None
        self.answered = False
        self.waiting = threading.Thread(target=self._await, name="prefect-api", daemon=True)
        self.waiting.start()

    @property
    def api_url(self) -> str:
        return f"{self.service.url}/api"

    def _launch(self) -> Service:
        # Where Prefect is installed, without importing it: that alone takes over a second.
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise StackError("Prefect is not installed here: `pip install -e .` installs it")
        # Every flow run of this run starts after this (the server's clock is ours).
        self.launched_at = datetime.now(UTC)
        command = [
            sys.executable, "-m", "uvicorn",
            "--app-dir", str(Path(spec.origin).parent.parent),
            "--factory", "prefect.server.api.server:create_app",
            "--host", LOOPBACK, "--port", "0",
            "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        return launch_server("temporary Prefect server", command, env, LOOPBACK, 0, "/api/health")

    def _await(self) -> None:
        """In a thread (it mostly sleeps): poll the server until it answers, then send the
        request every client opens with, whose first answer takes the server most of a
        second (measured 0.75 s against 0.01 s after). Errors go to ``ready()``."""
        try:
            self._poll()
        except Exception as exc:  # raised in the main thread by ready()
            self.error = StackError(f"the temporary Prefect server could not start: {exc}")

    def _poll(self) -> None:
        timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        # A first answer on a busy machine can take seconds: a request waits up to 10 s.
        deadline = time.monotonic() + timeout
        if not wait_until_answers(self.service, deadline, interval=0.05, request_timeout=10):
            code = self.service.process.returncode
            if code is not None:
                self.error = StackError(
                    f"the temporary Prefect server exited with code {code} before answering "
                    f"(its messages are above); start one with `aemnist server` and set "
                    f"{PREFECT_API_ENV} to it"
                )
            else:
                self.error = StackError(
                    f"the temporary Prefect server did not answer within {timeout:.0f} s "
                    f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); start one with "
                    f"`aemnist server` and set {PREFECT_API_ENV} to it"
                )
            return
        self.answered = True
        answers(f"{self.api_url}/admin/version", timeout=10)

    def ready(self) -> None:
        """Wait until the server answers, then point this process (and its children) at it."""
        self.waiting.join()
        if self.error is not None:
            raise self.error
        from prefect.context import refresh_global_settings_context

        os.environ[PREFECT_API_ENV] = self.api_url
        refresh_global_settings_context()

    def stop(self) -> None:
        """Stop the server. A server still creating its database finishes that first
        (uvicorn completes its start-up before it acts on SIGTERM): it is never killed
        mid-migration."""
        process = self.service.process
        if process.poll() is not None:
            return
        if self.answered:  # let it record the last task-run events this process shipped on
            # its way out; its task-run recorder, stopped mid-write, loses them and logs the
            # cancelled write as an error. A bounded wait: a run cut short can leave task
            # runs that never finish.
            wait_for_task_runs(self.api_url, self.launched_at, limit=5.0)
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # hung in its shutdown, long after any migration
            process.kill()
            process.wait()
