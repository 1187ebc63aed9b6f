"""Server processes: the stack's Prefect and MLflow servers (`aemnist server`), the MLflow UI
(`aemnist ui`) and the temporary Prefect server of one `aemnist run`.

All of them are launched by ``launch_server`` and waited for by ``wait_until_answers``. A
server asked for port 0 binds a free port itself; the port it got is read from the listening
socket of its process (or of one of its children), so that no port is picked here and taken
by someone else before the server binds it.

One process tree, stopped as a whole. Each server runs in a process group of its own (its
workers with it) inside our session, and is stopped by signalling that group; on Linux it
also gets SIGTERM from the kernel when this process dies, however it dies (``kill -9``
included). A command that starts servers calls ``handle_stop_signals`` first: SIGINT,
SIGTERM and SIGHUP then raise ``Stopped`` in the main thread, so that the command unwinds,
and every server still running is stopped by ``stop_children`` (at the latest at exit); a
process that has not ended ``grace`` seconds after the signal (a flow waiting for a task
thread, say) stops its servers and exits at once.

Only the standard library at import time: `aemnist run` launches its temporary server from
here before it imports torch, MLflow or Prefect.
"""

from __future__ import annotations

import _thread
import atexit
import base64
import contextlib
import fcntl
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
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aemnist.workdir import sqlite_url
from deployments.auth import (
    PREFECT_AUTH_ENV,
    Credentials,
    mlflow_auth,
    prefect_server_env,
    without_client_credentials,
)
from deployments.stack import LOOPBACK, PREFECT_API_ENV, PROJECT_ROOT, StackError

# Prefect's state types outside its TERMINAL_STATES (prefect.states): a task run in one of
# these has not reached its final state.
UNFINISHED_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


# Where a user points Prefect's server at a database of their own: it wins over ours.
DATABASE_ENVS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


@dataclass
class Service:
    """A server running as a child process, the leader of its own process group; ``port`` is
    0 until the port it bound is known."""

    name: str
    host: str  # where a client on this machine reaches it
    port: int
    health_path: str
    process: subprocess.Popen[bytes]
    log: Path | None  # None: its output is ours
    # Called before it is signalled to stop, while it still answers.
    before_stop: Callable[[], None] | None = None
    grace: float = 15.0  # seconds between its SIGTERM and its SIGKILL

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.url}{self.health_path}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to its process group (its own workers included), SIGKILL ``grace`` seconds
        later; then whatever its group still holds once the server itself has exited (a
        worker it left behind) gets SIGKILL too. A stop signal does not interrupt it."""
        with _uninterrupted():
            if self.alive():
                if self.before_stop is not None:
                    self.before_stop()
                for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
                    _signal_group(self.process.pid, sig)
                    try:
                        self.process.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            _clear_group(self.process.pid)
            with _children_lock:
                if self in _children:
                    _children.remove(self)


def launch_server(
    name: str,
    command: list[str],
    env: Mapping[str, str],
    host: str,
    port: int,
    health_path: str,
    log: Path | None = None,
) -> Service:
    """Start ``command``, a server bound to ``host``:``port`` (0: a free port of its choice),
    in a process group of its own that ``Service.stop`` (or ``stop_children``) signals whole,
    and that dies with this process. With a ``log``, the server writes there and runs from the
    repo root; without, it shares our output. Call it from the main thread: the kernel's
    parent-death signal follows the thread that started the child."""
    service = launch_child(name, command, env, log)
    service.host, service.port, service.health_path = client_host(host), port, health_path
    return service


def launch_child(
    name: str, command: list[str], env: Mapping[str, str], log: Path | None = None
) -> Service:
    """Start ``command`` as ``launch_server`` does (its own process group, dying with us,
    stopped by ``stop_children``), a process that serves no health URL: a worker."""
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
            # Its own group, in our session: a terminal's Ctrl-C reaches only us, and we
            # stop it; ``stop_children`` finds it however we end.
            process_group=0,
            preexec_fn=_dies_with_parent(),
        )
    finally:
        if output is not None:
            output.close()
    service = Service(name, "", 0, "", process, log)
    with _children_lock:
        _children.append(service)
    return service


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


# --- the command's children, stopped as a whole -----------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_children: list[Service] = []  # launched and not yet stopped, in launch order
_children_lock = threading.RLock()


def _dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when we die (Linux's
    ``prctl(PR_SET_PDEATHSIG)``), so that no server outlives a `kill -9` of this process or
    a signal that lands before our handlers could act; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # we died between the fork and the prctl
            os._exit(1)

    return preexec


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # gone (a zombie leader counts as gone)
        pass


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """State, parent id, process group and session of ``pid`` from /proc; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def _live(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (not gone, not a zombie waiting to be reaped)."""
    return [pid for pid in pids if (stat := _proc_stat(pid)) is not None and stat[0] != "Z"]


def _group_members(pgid: int) -> list[int]:
    if not Path("/proc/self/stat").exists():
        return []
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            if stat[2] == pgid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def _clear_group(pgid: int, wait: float = 2.0) -> None:
    """Once a group's leader has exited: let what it left in its group exit (they had the
    group's SIGTERM), for up to ``wait`` seconds, then SIGKILL the rest."""
    deadline = time.monotonic() + wait
    while _group_members(pgid):
        if time.monotonic() > deadline:
            _signal_group(pgid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _stop_descendants(wait: float = 2.0) -> None:
    """SIGTERM every process below this one that is still running (what a library started:
    a Dask worker, say), SIGKILL after ``wait`` seconds."""
    if not Path("/proc/self/task").exists():
        return
    pids = _live(_process_tree(os.getpid())[1:])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (pids := _live(pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not pids:
            return


def stop_children() -> None:
    """Stop every server this process launched and has not stopped, the last first; after a
    stop signal, every other process below this one too. Registered to run at exit."""
    with _children_lock, _uninterrupted():
        while _children:
            _children[-1].stop()  # removes itself
        if _received is not None:
            _stop_descendants()


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """A stop signal arriving meanwhile is noted, not raised: stopping is what it asks for,
    and a stop cut short would leave a server running."""
    global _stopping
    with _signal_lock:
        _stopping += 1
    try:
        yield
    finally:
        with _signal_lock:
            _stopping -= 1


atexit.register(stop_children)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by the first SIGINT, SIGTERM or SIGHUP once
    ``handle_stop_signals`` is installed; as a KeyboardInterrupt, no ``except Exception``
    swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_received: int | None = None  # the first stop signal received
_raised = False  # whether our handler has raised ``Stopped``
_stopping = 0  # how many threads are in ``stop_children``
_grace = math.inf
_signal_lock = threading.RLock()
_signalled = threading.Event()
_deadline: threading.Thread | None = None


def stop_signal() -> int | None:
    """The stop signal this process received, if any."""
    return _received


def stop_exit_code(signum: int) -> int:
    """A shell's exit status for a process ended by ``signum``: 128 + its number."""
    return 128 + signum


def handle_stop_signals(grace: float) -> None:
    """Before a command starts its first child: SIGINT, SIGTERM and SIGHUP each raise
    ``Stopped`` in the main thread (once; later ones are noted only) and write one line to
    stderr. Should the process still be running ``grace`` seconds later, its servers are
    stopped and it exits with status 128 + the signal's number.

    A library may put its own handler in place for a while (Prefect's flow engine turns
    SIGTERM into its TerminationSignal); the signal is still seen, through the wake-up
    file descriptor every Python signal handler writes to, so the deadline holds."""
    global _grace, _deadline
    _grace = grace
    if _deadline is None:
        # Started now, not from a handler: starting a thread there could deadlock on the
        # lock of a thread start the signal interrupted.
        _deadline = threading.Thread(target=_exit_after_grace, name="stop-deadline", daemon=True)
        _deadline.start()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    if sys.unraisablehook is not _unraisable:
        global _previous_unraisable
        _previous_unraisable = sys.unraisablehook
        sys.unraisablehook = _unraisable
        threading.Thread(target=_raise_again, name="stop-again", daemon=True).start()
    with contextlib.suppress(ValueError, OSError):  # the deadline then rests on our handler
        read, write = os.pipe()
        os.set_blocking(write, False)
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        if previous != -1:  # someone else's: leave it theirs
            signal.set_wakeup_fd(previous)
            os.close(read)
            os.close(write)
            return
        threading.Thread(target=_watch, args=(read,), name="stop-signals", daemon=True).start()


def _on_signal(signum: int, frame: object) -> None:
    global _raised
    _note(signum)
    with _signal_lock:
        if _raised or _stopping:
            return
        _raised = True
    raise Stopped(signum)


_previous_unraisable = sys.unraisablehook
_dropped: list[int] = []  # the signal of a Stopped that Python dropped, to raise again
_dropped_event = threading.Event()


def _unraisable(unraisable: Any) -> None:
    """A ``Stopped`` raised while a finalizer or a weakref callback ran (a garbage collection
    the signal happened to interrupt) is dropped by Python, with a traceback on stderr: have
    it raised again in the main thread instead, silently."""
    if isinstance(unraisable.exc_value, Stopped):
        _dropped.append(unraisable.exc_value.signum)
        _dropped_event.set()
        return
    _previous_unraisable(unraisable)


def _raise_again() -> None:
    """From a thread of its own, once the main thread has left the callback (a simulated
    signal from inside it would run the handler there again): the stop once more."""
    global _raised
    while True:
        _dropped_event.wait()
        time.sleep(0.05)
        _dropped_event.clear()
        signum = _dropped.pop()
        with _signal_lock:
            _raised = False
        _thread.interrupt_main(signum)


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in STOP_SIGNALS:
                _note(signum)


def _say(line: str) -> None:
    """One line to stderr, straight to the file descriptor: safe in a signal handler and
    after a SIGHUP closed the terminal."""
    with contextlib.suppress(OSError):
        os.write(2, f"{line}\n".encode())


def _note(signum: int) -> None:
    """The first stop signal: say so and start the deadline."""
    global _received
    with _signal_lock:
        if _received is not None:
            return
        _received = signum
    name = signal.Signals(signum).name
    _say(f"aemnist: {name} received: stopping (and every process it started)")
    _signalled.set()


def _main_thread_joins_threads() -> bool:
    """Whether the main thread waits for other threads to end: in a thread pool's shutdown
    (a flow's task runner leaving) or in the interpreter's exit."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    while frame is not None:
        code = frame.f_code
        if (code.co_name == "shutdown" and code.co_filename == _POOL_MODULE) or (
            code.co_name == "_shutdown" and code.co_filename == threading.__file__
        ):
            return True
        frame = frame.f_back
    return False


# Where a thread pool's ``shutdown`` is defined (the standard library's, next to threading).
_POOL_MODULE = os.path.join(
    os.path.dirname(threading.__file__), "concurrent", "futures", "thread.py"
)
# Seconds the main thread must be seen waiting for other threads before the wait is cut short.
JOINING_FOR = 1.0


def _exit_after_grace() -> None:
    """After a stop signal: once ``grace`` seconds have passed, or sooner once the main thread
    has done all but wait for other threads (a task thread mid-epoch, or paused, is not waited
    for), stop every child and exit."""
    _signalled.wait()
    signum = _received
    assert signum is not None
    name = signal.Signals(signum).name
    deadline = time.monotonic() + _grace
    joining_since = None
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not _main_thread_joins_threads():
            joining_since = None
        elif joining_since is None:
            joining_since = time.monotonic()
        elif time.monotonic() - joining_since >= JOINING_FOR:
            _say("aemnist: not waiting for the task threads still running: stopping now")
            break
    else:
        _say(f"aemnist: still running {_grace:g} s after {name}: stopping its processes now")
    stop_children()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(stop_exit_code(signum))


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


def start_prefect_server(
    state_dir: Path,
    host: str,
    port: int,
    env: Mapping[str, str],
    credentials: Credentials | None = None,
    database_url: str | None = None,
) -> Service:
    """A Prefect server (API and UI) with its database in ``state_dir``, or at
    ``database_url`` (PostgreSQL; it holds a password, so it goes through the environment):
    CSRF protection on, no cross-origin requests but its own UI's, its UI pointed at its own
    API; with ``credentials``, every request but the health check needs the auth string."""
    server_env = {
        **without_client_credentials(env),
        "PREFECT_HOME": str(state_dir / "prefect-home"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": (
            database_url or sqlite_url(state_dir / "prefect.db", "sqlite+aiosqlite")
        ),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **prefect_server_env(port, credentials),
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
    workdir: Path,
    state_dir: Path,
    host: str,
    port: int,
    env: Mapping[str, str],
    credentials: Credentials | None = None,
    backend_store_uri: str | None = None,
    artifacts: str | None = None,
) -> Service:
    """An MLflow tracking server on the work dir's store: the same SQLite database and
    artifact folder that `aemnist run` uses without a server, so local and deployed runs
    show side by side. Artifacts are served through the server (mlflow-artifacts:/), so
    workers that do not share this file system can log them. With ``credentials``, MLflow's
    basic-auth app asks every request but the health check for them. ``backend_store_uri``
    (a PostgreSQL database) replaces the SQLite database; it holds a password, so it goes
    through the environment (MLflow's MLFLOW_BACKEND_STORE_URI), not the command line that
    `ps` shows. ``artifacts`` (a URL such as s3://bucket/prefix) replaces the artifact
    folder: the server stores what it is sent there with the credentials of its own
    environment (for S3 the usual AWS_* variables), so its clients need none."""
    from aemnist.tracking import embedded_tracking_uri  # imports MLflow: only when needed

    command = [
        sys.executable, "-m", "mlflow", "server",
        "--artifacts-destination", artifacts or str(workdir / "mlartifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server_env = {
        k: v for k, v in without_client_credentials(env).items() if k != "MLFLOW_TRACKING_URI"
    }
    server_env["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri or embedded_tracking_uri(workdir)
    if credentials is not None:
        auth_args, auth_env = mlflow_auth(state_dir, credentials)
        command += auth_args
        server_env.update(auth_env)
    return launch_server(
        "MLflow server", command, server_env, host, port, "/health",
        state_dir / "mlflow-server.log",
    )  # fmt: skip


def require_prefect_api(command: str) -> str:
    """The Prefect API this process talks to; it must be a running server that accepts our
    credentials (PREFECT_API_AUTH_STRING), if it asks for any."""
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
    check_prefect_credentials(api)
    return api


def check_prefect_credentials(api_url: str) -> None:
    """Raise one clear error when the Prefect API refuses this process's credentials."""
    try:
        prefect_request(api_url, "/admin/version", timeout=10)
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            raise StackError(
                f"the Prefect server at {api_url} answered {exc.code} to a version request: "
                f"is PREFECT_API_URL the API of a Prefect server (ending in /api)?"
            ) from None
        given = "was refused" if os.environ.get(PREFECT_AUTH_ENV) else "is not set"
        raise StackError(
            f"the Prefect server at {api_url} asks for credentials and {PREFECT_AUTH_ENV} "
            f"{given}: load the ones `aemnist server --auth` wrote (`set -a; . "
            f"WORKDIR/server/credentials.env; set +a`)"
        ) from None
    except (urllib.error.URLError, OSError, ValueError):
        pass  # it answered its health check a moment ago: the client says what went wrong


# CSRF tokens this process holds, by API URL: (client id, token).
_csrf_tokens: dict[str, tuple[str, str]] = {}


def prefect_request(
    api_url: str,
    path: str,
    body: object | None = None,
    timeout: float = 30.0,
    auth: str | None = None,
) -> Any:
    """A request to the Prefect API as Prefect's own client makes it: basic auth with
    ``auth`` ("user:password"; default: PREFECT_API_AUTH_STRING, if set); a POST (``body``)
    carries a CSRF token, fetched once per server, for a server with CSRF protection on.
    Returns the decoded JSON answer (None for an empty one); raises urllib's errors."""
    headers = {"Content-Type": "application/json"}
    if auth := auth or os.environ.get(PREFECT_AUTH_ENV):
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    for attempt in (1, 2):
        csrf = {} if body is None else _csrf_headers(api_url, headers, timeout)
        request = urllib.request.Request(f"{api_url}{path}", data=data, headers=headers | csrf)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = response.read()
                return json.loads(answer) if answer else None  # 204: no content
        except urllib.error.HTTPError as exc:
            if exc.code != 403 or not csrf or attempt == 2:
                raise
            _csrf_tokens.pop(api_url, None)  # expired (after an hour): fetch a new one


def _csrf_headers(api_url: str, headers: dict[str, str], timeout: float) -> dict[str, str]:
    if api_url not in _csrf_tokens:
        client = str(uuid.uuid4())
        request = urllib.request.Request(f"{api_url}/csrf-token?client={client}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                _csrf_tokens[api_url] = (client, json.load(response)["token"])
        except urllib.error.HTTPError as exc:
            if exc.code != 422:  # 422: CSRF protection is off there
                raise
            _csrf_tokens[api_url] = ("", "")
    client, token = _csrf_tokens[api_url]
    return {"Prefect-Csrf-Client": client, "Prefect-Csrf-Token": token} if token else {}


def wait_for_task_runs(api_url: str, since: datetime, limit: float) -> None:
    """Wait, at most ``limit`` seconds, until the Prefect API at ``api_url`` counts no task
    run in an unfinished state among the flow runs that started after ``since``. Task runs
    reach the server as events, which its task-run recorder writes one by one: once every
    task run it holds is final, it has written the last events it was sent. Returns at once
    when the server does not answer."""
    body = {
        "flow_runs": {"start_time": {"after_": since.isoformat()}},
        "task_runs": {"state": {"type": {"any_": list(UNFINISHED_STATES)}}},
    }
    deadline = time.monotonic() + limit
    while True:
        try:
            timeout = max(deadline - time.monotonic(), 0.5)
            if prefect_request(api_url, "/task_runs/count", body, timeout=timeout) == 0:
                return
        except (OSError, ValueError, KeyError):  # it is gone, or answers no count
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


# Beside a SQLite database that temporary servers open: held from a server's launch until it
# answers. Two runs started at once on one database (the same PREFECT_HOME) would otherwise
# both create its tables, and the second fails ("no such index", measured 2026-11-27).
START_LOCK = ".aemnist-server-start.lock"


def hold_start_lock(path: Path) -> int:
    """An open descriptor holding ``path``'s exclusive lock, taken once another temporary
    server on the same database has answered (polled, so a stop signal still acts)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            time.sleep(0.05)


class TemporaryPrefectServer:
    """One run's temporary Prefect server: the uvicorn process Prefect's own temporary
    server runs (prefect.server.api.server.SubprocessASGIServer), launched without importing
    the server's code here. It starts before this process imports torch, MLflow and Prefect,
    so their seconds and the server's overlap; `ready()` waits for its health check. The
    whole process, and the worker processes it starts (Dask's), is pointed at it: they would
    otherwise each start a temporary server of their own."""

    def __init__(self, database: Path | None = None) -> None:
        self.database = database
        self.starting: int | None = None  # the start lock's descriptor, until it answers
        self.service = self._launch()
        # Stopped by ``stop_children`` at exit (or on a stop signal), after the process's last
        # logs and events are shipped to it: Prefect registers their flush at exit after this
        # module registered ``stop_children``, and exit handlers run last-in first-out.
        self.service.before_stop = self._settle
        self.service.grace = 60.0
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
            **without_client_credentials(os.environ),
            # No UI: no cross-origin request at all; CSRF protection on, as on every server.
            **prefect_server_env(0, None),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        if any(name in env for name in DATABASE_ENVS):
            folder = None  # a database of the user's
        elif self.database is not None:
            # Its flow runs stay browsable after it stops: `aemnist server` opens this file.
            url = sqlite_url(self.database, "sqlite+aiosqlite")
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url
            folder = self.database.parent
        else:
            # Prefect's default database, in PREFECT_HOME, which `prefect server start` opens
            # too; Prefect's CLI creates that folder, the server alone does not.
            folder = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder is not None:
            self.starting = hold_start_lock(folder / START_LOCK)
        return launch_server("temporary Prefect server", command, env, LOOPBACK, 0, "/api/health")

    def _await(self) -> None:
        """In a thread (it mostly sleeps): poll the server until it answers, then send the
        request every client opens with, whose first answer takes the server most of a
        second (measured 0.75 s against 0.01 s after). Errors go to ``ready()``."""
        try:
            self._poll()
        except Exception as exc:  # raised in the main thread by ready()
            self.error = StackError(f"the temporary Prefect server could not start: {exc}")
        finally:
            if self.starting is not None:  # its database is ready: the next may start
                os.close(self.starting)

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

    def _settle(self) -> None:
        if self.answered:  # let it record the last task-run events this process shipped on
            # its way out; its task-run recorder, stopped mid-write, loses them and logs the
            # cancelled write as an error. A bounded wait: a run cut short can leave task
            # runs that never finish, and one stopped by a signal waits less.
            limit = 5.0 if stop_signal() is None else 1.0
            wait_for_task_runs(self.api_url, self.launched_at, limit=limit)

    def stop(self) -> None:
        """Stop the server. A server still creating its database finishes that first
        (uvicorn completes its start-up before it acts on SIGTERM): it is never killed
        mid-migration, unless that takes over a minute."""
        self.service.stop()
