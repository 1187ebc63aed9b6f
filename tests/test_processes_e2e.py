"""One process tree, stopped as a whole: `aemnist run` and `aemnist server` stopped by SIGTERM,
SIGHUP, Ctrl-C or `kill -9` at start-up, mid-run or while serving leave no process behind;
one run at a time in a work dir; `ui` on a busy port and `status` on an unreachable tracking
server answer in seconds with one line.

Each command runs in a session of its own (the test's ``start_new_session``). Its servers
keep that session (each leads a process group of its own inside it), so a process left
behind, even one whose parent has died, is found by its session id; every descendant seen
while the command ran is checked as well, in case one left the session.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import (
    FOREIGN_ORIGIN,
    REPO_ROOT,
    cli_env,
    http_status,
    preflight,
    refused_port,
    run_cli,
    smoke_run,
)

from aemnist.faults import pause_marker
from aemnist.workdir import LOCK_NAME, WorkdirLocked, lock_workdir, read_holder

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="walks Linux's /proc for the processes left"
)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """State, session id and start time (clock ticks since boot) of ``pid``; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[3]), int(fields[19])


def _children(pid: int) -> list[int]:
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in path.read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


class Launched:
    """An `aemnist` command in a session of its own, its stdout and stderr in files."""

    def __init__(self, args: list[str], env: dict[str, str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout", logs / "stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", *args],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.seen: dict[int, int] = {}  # every descendant seen: pid -> start time
        self.signalled_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.stderr()

    def look(self) -> list[int]:
        """Record the descendants running now; returns them."""
        tree, found = [self.pid], []
        for parent in tree:
            for child in _children(parent):
                if (stat := _stat(child)) is not None:
                    self.seen.setdefault(child, stat[2])
                    tree.append(child)
                    found.append(child)
        return found

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.process.poll() is None, (
                f"exited with {self.process.returncode} before {what}:\n{self.output()[-4000:]}"
            )
            assert time.monotonic() < deadline, (
                f"no {what} in {timeout:g} s:\n{self.output()[-4000:]}"
            )
            self.look()
            time.sleep(0.1)
        self.look()

    def wait_for_text(self, text: str, timeout: float) -> None:
        self.wait_until(lambda: text in self.output(), repr(text), timeout)

    def wait_for_child(self, timeout: float = 60) -> None:
        self.wait_until(lambda: bool(self.look()), "child process", timeout)

    def send(self, sig: int, group: bool = False) -> None:
        self.look()
        self.signalled_at = time.monotonic()
        (os.killpg if group else os.kill)(self.pid, sig)

    def finish(self, timeout: float = 90) -> tuple[int, float]:
        """Its exit code, and the seconds from the signal to its exit."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(
                f"still running {timeout:g} s after the signal:\n{self.output()[-4000:]}"
            ) from None
        return code, time.monotonic() - (self.signalled_at or self.started)

    def left(self) -> list[int]:
        """Processes still running (zombies aside) in its session or among those seen."""
        left = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
                pid = int(entry.name)
                running = stat[0] != "Z"
                if running and (stat[1] == self.pid or self.seen.get(pid) == stat[2]):
                    left.append(pid)
        return left

    def left_after(self, wait: float) -> list[str]:
        """What is still running once ``wait`` seconds have passed (or sooner, nothing)."""
        deadline = time.monotonic() + wait
        while (left := self.left()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [f"{pid} {_command_line(pid)}" for pid in left]

    def kill_all(self) -> None:
        for pid in [self.pid, *self.left()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Prefect home for the module's runs: its database is created once."""
    return tmp_path_factory.mktemp("processes") / "prefect-home"


@pytest.fixture
def launch(tmp_path: Path, home: Path) -> Iterator[Callable[..., Launched]]:
    launched: list[Launched] = []

    def start(args: list[str], env: dict[str, str] | None = None, name: str = "cmd") -> Launched:
        command = Launched(args, cli_env(home, env), tmp_path / f"logs-{name}")
        launched.append(command)
        return command

    yield start
    for command in launched:  # a failed test leaves nothing running either
        if command.process.poll() is None or command.left():
            command.kill_all()


def report(probe: str, code: int, seconds: float, command: Launched, left: list[str]) -> None:
    first = next(iter(command.stderr().splitlines()), "")
    print(f"\nPROBE | {probe} | exit {code} | {seconds:.1f} s | left {len(left)} | {first}")


def signal_line(sig: signal.Signals) -> str:
    return f"aemnist: {sig.name} received: stopping"


# --- aemnist run ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sig", "group", "delay"),
    [(signal.SIGTERM, False, 0.0), (signal.SIGHUP, False, 3.0), (signal.SIGINT, True, 5.0)],
    ids=["SIGTERM", "SIGHUP", "ctrl-c"],
)
def test_run_stopped_at_start_up_leaves_no_process(
    launch: Callable[..., Launched],
    tmp_path: Path,
    mnist_mirror: Path,
    sig: signal.Signals,
    group: bool,
    delay: float,
) -> None:
    # Right after its temporary Prefect server is launched, or seconds later (the server
    # starting up, the run importing torch and MLflow and opening its store). Ctrl-C: SIGINT
    # to its process group, as a terminal sends it (its servers have groups of their own).
    run = launch(smoke_run(tmp_path / "w", mnist_mirror), name="run")
    run.wait_for_child()
    time.sleep(delay)
    run.send(sig, group=group)
    code, seconds = run.finish()
    left = run.left_after(2)
    what = f"{sig.name}{' to its group' if group else ''}"
    report(f"run, {what} {delay:g} s after its first child", code, seconds, run, left)
    assert left == []
    assert code == 128 + sig
    assert signal_line(sig) in run.stderr()
    assert "Traceback" not in run.stderr()
    assert seconds < 60


def test_run_killed_at_start_up_takes_its_server_with_it(
    launch: Callable[..., Launched], tmp_path: Path, mnist_mirror: Path
) -> None:
    # kill -9 runs no handler: the kernel's parent-death signal stops the server.
    run = launch(smoke_run(tmp_path / "w", mnist_mirror), name="run")
    run.wait_for_child()
    time.sleep(3)
    run.send(signal.SIGKILL)
    code, _ = run.finish()
    started = time.monotonic()
    left = run.left_after(60)  # a server finishes its start-up before it acts on SIGTERM
    report("run, SIGKILL 3 s after its first child", code, time.monotonic() - started, run, left)
    assert code == -signal.SIGKILL
    assert left == []


def test_run_paused_mid_grid_holds_its_work_dir_and_a_sigterm_stops_it_all(
    launch: Callable[..., Launched], tmp_path: Path, mnist_mirror: Path, home: Path
) -> None:
    workdir = tmp_path / "w"
    run = launch(
        smoke_run(workdir, mnist_mirror),
        {"AEMNIST_FAULT": "pause:grid:fold=0,epoch=1"},
        name="run",
    )
    # Parked at a known point: a fold-0 grid task, its epoch 1 trained, sleeps until killed.
    marker = pause_marker("grid", epoch=1, fold=0)
    run.wait_for_text(marker, timeout=240)

    # A second run on the same work dir stops at once, naming the first's process id.
    second = run_cli(smoke_run(workdir, mnist_mirror), home=home, timeout=120)
    lines = second.stderr.strip().splitlines()
    print(f"\nPROBE | second run on a locked work dir | exit {second.returncode} | "
          f"{second.seconds:.1f} s | left ? | {lines[0] if lines else ''}")  # fmt: skip
    assert second.returncode == 2, second.stderr[-3000:]
    assert len(lines) == 1, second.stderr[-3000:]
    assert f"is in use by process {run.pid}" in lines[0]
    assert second.seconds < 30
    assert read_holder(workdir / LOCK_NAME) == run.pid

    run.send(signal.SIGTERM)
    code, seconds = run.finish()
    left = run.left_after(2)
    report("run, SIGTERM mid-grid (paused task)", code, seconds, run, left)
    assert left == []
    assert code == 128 + signal.SIGTERM
    assert signal_line(signal.SIGTERM) in run.stderr()
    # The lock died with it (flock), though its file still names it: the next run takes over.
    assert read_holder(workdir / LOCK_NAME) == run.pid

    rerun = launch(
        smoke_run(workdir, mnist_mirror), {"AEMNIST_FAULT": "pause:grid:fold=0"}, name="rerun"
    )
    # Its fold-0 tasks restore epoch 1 from their checkpoints: this pause is at their start.
    rerun.wait_for_text(pause_marker("grid", fold=0), timeout=240)
    assert read_holder(workdir / LOCK_NAME) == rerun.pid
    rerun.send(signal.SIGHUP)
    code, seconds = rerun.finish()
    left = rerun.left_after(2)
    report("run, SIGHUP mid-grid (paused task, stale lock taken over)", code, seconds, rerun,
           left)  # fmt: skip
    assert left == []
    assert code == 128 + signal.SIGHUP
    assert signal_line(signal.SIGHUP) in rerun.stderr()


# --- aemnist server ------------------------------------------------------------------------


def server_args(workdir: Path) -> list[str]:
    return ["server", "--workdir", str(workdir), "--prefect-port", "0", "--mlflow-port", "0"]


@pytest.mark.parametrize(
    ("sig", "both"), [(signal.SIGTERM, True), (signal.SIGHUP, False)], ids=["SIGTERM", "SIGHUP"]
)
def test_server_stopped_during_start_up_leaves_no_process(
    launch: Callable[..., Launched], tmp_path: Path, sig: signal.Signals, both: bool
) -> None:
    # Once the Prefect server is launched (the MLflow server not yet: MLflow is imported
    # first), or once both are, neither answering yet.
    server = launch(server_args(tmp_path / "w"), name="server")
    wanted = 2 if both else 1
    server.wait_until(lambda: len(_children(server.pid)) >= wanted, "servers", timeout=120)
    server.send(sig)
    code, seconds = server.finish()
    left = server.left_after(2)
    launched = "both servers" if both else "the Prefect server"
    report(f"server, {sig.name} once {launched} launched", code, seconds, server, left)
    assert left == []
    assert code == 128 + sig
    assert signal_line(sig) in server.stderr()
    assert "Traceback" not in server.stderr()


def test_server_on_loopback_without_auth_refuses_other_sites_and_a_sighup_stops_it_all(
    launch: Callable[..., Launched], tmp_path: Path
) -> None:
    # SIGHUP: a closed terminal, which once left both servers running. (A SIGTERM takes the
    # same way out; test_production_e2e's stack ends with one.) One server start costs a
    # minute on a busy machine: one signal here, and the checks of a server without
    # authentication (test_production_e2e's stack has it on) while it serves.
    sig = signal.SIGHUP
    server = launch(server_args(tmp_path / "w"), name="server")
    server.wait_for_text("Ctrl-C stops both servers", timeout=240)
    assert len(server.seen) >= 2  # both servers, and their workers
    output = server.output()
    assert "Access: no authentication (loopback only" in output
    api = re.search(r"export PREFECT_API_URL=(\S+)", output).group(1)
    mlflow = re.search(r"export MLFLOW_TRACKING_URI=(\S+)", output).group(1)
    # Reads need no setup on loopback.
    assert http_status(f"{api}/admin/version") == 200
    # A web page of another site can neither read the API (no CORS preflight passes) nor
    # write to it: a write needs a CSRF token, which only a page CORS lets read can fetch.
    assert preflight(f"{api}/deployments/") == 400
    assert http_status(f"{api}/work_pools/", "POST", {"Origin": FOREIGN_ORIGIN}, b"{}") == 403
    assert http_status(f"{api}/flows/filter", "POST", body=b"{}") == 403  # no token: no write
    # The Prefect UI calls the API of the server that served it, on any host and port.
    ui = api.removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=30) as response:
        assert json.load(response)["api_url"] == "/api"
    # MLflow's server blocks another site's writes.
    experiments = f"{mlflow}/api/2.0/mlflow/experiments/create"
    body = json.dumps({"name": "from-elsewhere"}).encode()
    assert http_status(experiments, "POST", {"Origin": FOREIGN_ORIGIN}, body) == 403
    server.send(sig)
    code, seconds = server.finish()
    left = server.left_after(2)
    report(f"server, {sig.name} after printing its URLs", code, seconds, server, left)
    assert left == []
    assert code == 0  # stopping is how a server ends
    assert "Stopping the servers." in server.output()


# --- ui and status -------------------------------------------------------------------------


def test_ui_on_a_busy_port_fails_at_once_with_one_line(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "mlflow.db").touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            ["ui", "--workdir", str(workdir), "--port", str(port)], tmp_path / "home", timeout=60
        )
    lines = result.stderr.strip().splitlines()
    print(f"\nPROBE | ui --port on a busy port | exit {result.returncode} | "
          f"{result.seconds:.1f} s | left 0 | {lines[0] if lines else ''}")  # fmt: skip
    assert result.returncode == 2
    assert lines == [
        f"aemnist: error: cannot start the MLflow UI on 127.0.0.1:{port}: the port is in use "
        f"(Address already in use); stop whatever listens there or pick another port with --port"
    ]
    assert result.seconds < 20


def test_status_with_an_unreachable_tracking_server_answers_in_seconds(
    tmp_path: Path,
) -> None:
    with refused_port() as port:
        uri = f"http://127.0.0.1:{port}"
        result = run_cli(
            ["status", "--profile", "smoke", "--workdir", str(tmp_path / "w")],
            tmp_path / "home",
            env={"MLFLOW_TRACKING_URI": uri},
            timeout=60,
        )
    lines = result.stderr.strip().splitlines()
    print(f"\nPROBE | status, MLFLOW_TRACKING_URI refused | exit {result.returncode} | "
          f"{result.seconds:.1f} s | left 0 | {lines[0] if lines else ''}")  # fmt: skip
    assert result.returncode == 2
    assert len(lines) == 1, result.stderr
    assert f"MLflow tracking server {uri} is unreachable" in lines[0]
    assert result.seconds < 20


# --- the work-dir lock, as a library -------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from aemnist.workdir import lock_workdir
lock = lock_workdir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_holder_keeps_the_lock_and_a_dead_ones_file_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(WorkdirLocked, match=f"in use by process {holder.pid}"):
            lock_workdir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # Killed: its file still names it, its flock is gone.
    assert read_holder(tmp_path / LOCK_NAME) == holder.pid
    with lock_workdir(tmp_path) as lock:
        assert read_holder(tmp_path / LOCK_NAME) == os.getpid()
        with pytest.raises(WorkdirLocked, match=f"in use by process {os.getpid()}"):
            lock_workdir(tmp_path)  # one holder at a time, this process's own second try too
    assert not lock.held
    assert read_holder(tmp_path / LOCK_NAME) is None  # released in order: emptied
    lock_workdir(tmp_path).release()


def test_a_stop_that_lands_in_a_finalizer_is_raised_again_in_the_main_thread() -> None:
    # A signal can arrive while a weakref callback runs (a garbage collection), where Python
    # drops any exception with a traceback; the stop must still reach the main thread.
    code = (
        "import gc, signal, time, weakref\n"
        "from deployments.servers import Stopped, _on_signal, handle_stop_signals\n"
        "handle_stop_signals(30)\n"
        "class A: pass\n"
        "a = A()\n"
        "ref = weakref.ref(a, lambda r: _on_signal(signal.SIGINT, None))\n"
        "try:\n"
        "    del a\n"
        "    gc.collect()\n"
        "    time.sleep(5)\n"
        "    print('not stopped', flush=True)\n"
        "except Stopped as exc:\n"
        "    print('stopped in the main thread:', exc, flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "stopped in the main thread: SIGINT", proc.stderr
    assert "Traceback" not in proc.stderr
    assert "aemnist: SIGINT received" in proc.stderr
