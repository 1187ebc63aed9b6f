"""A Dask cluster of another Unix user: a scheduler and two 1-thread workers started from
Dask's own command line as ``nobody`` (uid 65534), each in folders of its own that nobody
else's files are in, with an environment built from nothing (no variable of the test
process leaks in).

This is what "Dask workers with no shared file system" looks like on one machine: the
workers run the same Python and packages as the flow (as every machine of a real cluster
does, from its own install), and reach the flow's data only through what the run hands
them (servers, an object store), never through the flow's work dir, which is root's.

It needs root (to become another user) and util-linux's ``setpriv``; without them the tests
that use it are skipped and say so.

What the other user needs to run the project, and how it gets it:

- The venv's packages: read in place (``site-packages`` of the test's venv must be readable
  by all, as a pip install leaves it).
- The interpreter: the venv's ``bin/python`` is a link to the base interpreter. Where the
  other user cannot use that one as it is (pyenv's under /root, 0700: exec may fail, or, as
  on this project's machines, the loader silently falls back to Debian's libpython and
  stdlib of another patch release), its standard library and shared library are staged into
  the cluster's folder (hard links, else copies) beside a venv-like folder whose
  ``site-packages`` is the test's. The fixture checks that the workers' ``sys.version`` is
  the test's, byte for byte.
- The project's code: the tree under test (REPO_ROOT) through PYTHONPATH, where the other
  user can read it; else a copy of its packages in the cluster's folder.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.cli import OFFLINE_DEFAULTS

REPO_ROOT = Path(__file__).parents[1]
NOBODY = 65534
# The project's packages (pyproject's [tool.setuptools] packages, top-level ones).
PACKAGES = ("aemnist", "tasks", "flows", "deployments")
WORKERS = ("worker-0", "worker-1")
START_TIMEOUT = 180.0


def as_other_user(
    command: list[str], uid: int = NOBODY, own_view_of: tuple[Path, ...] = ()
) -> list[str]:
    """``command`` run as ``uid`` (and its group), with no supplementary groups; with
    ``own_view_of``, in a mount namespace of its own where each of those folders is an
    empty file system of ``uid``'s (tmpfs): what a process on another machine sees at the
    same path."""
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    if not own_view_of:
        return drop
    options = f"mode=0700,uid={uid},gid={uid}"
    mounts = " && ".join(
        f"mount -t tmpfs -o {options} aemnist-other-machine {shlex.quote(str(p))}"
        for p in own_view_of
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{mounts} && exec "$@"', "sh", *drop]  # fmt: skip


def skip_unless_root_with_setpriv() -> None:
    """Skip, saying why, where this process cannot start another user's processes."""
    if os.geteuid() != 0:
        pytest.skip(
            "starting the Dask cluster as another Unix user needs root (these tests run as "
            f"uid {os.geteuid()}): run them as root, as CI on a throwaway machine does"
        )
    if shutil.which("setpriv") is None:
        pytest.skip("the other user's Dask cluster needs util-linux's setpriv, not on PATH")
    try:
        pwd.getpwuid(NOBODY)
    except KeyError:
        pytest.skip(f"no user with uid {NOBODY} (nobody) on this machine")


def _own(path: Path, uid: int) -> Path:
    """A folder (made if missing) that only ``uid`` may enter."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(0o700)
    return path


@dataclass(frozen=True)
class UserFolders:
    """One process's own folders, all ``uid``'s, 0700."""

    root: Path
    home: Path
    tmp: Path
    local: Path  # Dask's --local-directory

    @classmethod
    def make(cls, root: Path, uid: int) -> UserFolders:
        _own(root, uid)
        return cls(root, _own(root / "home", uid), _own(root / "tmp", uid),
                   _own(root / "local", uid))  # fmt: skip

    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.home),
            "PREFECT_HOME": str(self.home / ".prefect"),
            "MPLCONFIGDIR": str(self.home / ".matplotlib"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "TMPDIR": str(self.tmp),
        }


@dataclass(frozen=True)
class Runtime:
    """How the other user runs this project: an interpreter and the environment that makes
    it the test's Python with the test's packages and the tree under test."""

    python: Path
    env: dict[str, str]
    staged_interpreter: bool  # the base interpreter was staged (see the module's docstring)
    code: Path  # the folder on the workers' PYTHONPATH holding the project's packages


def _probe(python: Path, env: dict[str, str], uid: int) -> subprocess.CompletedProcess[str]:
    """What ``python`` says, run as ``uid``: its version and where the project comes from."""
    script = "import sys, aemnist; print(repr(sys.version)); print(aemnist.__file__)"
    return subprocess.run(
        as_other_user([str(python), "-c", script], uid),
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links refused: a copy does the same
        shutil.copy2(source, target)


def _stage_interpreter(folder: Path) -> tuple[Path, dict[str, str]]:
    """The test's base interpreter (its binary, shared library and standard library with
    its compiled modules; not its own site-packages or test suite) under ``folder``, and a
    venv-like folder beside it whose site-packages is the test venv's: returns that venv's
    python and the variables that make the loader take the staged libpython."""
    base, purelib = Path(sys.base_prefix), Path(sysconfig.get_paths()["purelib"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prefix, venv = folder / "python", folder / "venv"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (prefix / "bin").mkdir(parents=True)
    executable = Path(os.path.realpath(sys.executable))
    _link_or_copy(str(executable), str(prefix / "bin" / version))
    libdir = Path(sysconfig.get_config_var("LIBDIR") or base / "lib")
    (prefix / "lib").mkdir()
    for library in libdir.glob("libpython*.so*"):
        _link_or_copy(str(library), str(prefix / "lib" / library.name))
    shutil.copytree(
        stdlib,
        prefix / "lib" / version,
        ignore=shutil.ignore_patterns("site-packages", "test"),
        copy_function=_link_or_copy,
        symlinks=True,
    )
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(prefix / "bin" / version)
    (venv / "lib" / version).mkdir(parents=True)
    (venv / "lib" / version / "site-packages").symlink_to(purelib)
    (venv / "pyvenv.cfg").write_text(
        f"home = {prefix / 'bin'}\ninclude-system-site-packages = false\n"
        f"version = {'.'.join(map(str, sys.version_info[:3]))}\n"
    )
    for path in (folder, prefix, venv):
        path.chmod(0o755)
    return venv / "bin" / "python", {"LD_LIBRARY_PATH": str(prefix / "lib")}


def other_user_runtime(folder: Path, uid: int = NOBODY) -> Runtime:
    """How ``uid`` runs the test's Python, packages and code (see the module's docstring);
    ``folder`` (root's, readable by all) takes what has to be staged. Fails, naming the
    path, where the venv's packages are out of the other user's reach."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    if sys.prefix == sys.base_prefix:
        pytest.skip("the other user's Dask cluster reuses the test's venv: run the tests in one")
    base_env = {
        # What `aemnist` sets for itself on these offline machines; `dask worker` does not.
        **OFFLINE_DEFAULTS,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",  # the tree is not theirs to write
        "PYTHONPATH": str(REPO_ROOT),
    }
    expected_module = str(REPO_ROOT / "aemnist" / "__init__.py")
    python, staged, extra = Path(sys.executable), False, {}
    seen = _probe(python, base_env, uid)
    if seen.stdout.splitlines()[:1] != [repr(sys.version)]:
        python, extra = _stage_interpreter(folder / "interpreter")
        staged = True
        seen = _probe(python, {**base_env, **extra}, uid)
    lines = seen.stdout.splitlines()
    if lines[:1] != [repr(sys.version)]:
        pytest.fail(
            f"uid {uid} cannot run this Python ({sys.version}) with the venv's packages in "
            f"{purelib}: {(seen.stdout + seen.stderr).strip()[-2000:]}; every folder on that "
            f"path must be readable by all (chmod o+rx)",
            pytrace=False,
        )
    code = REPO_ROOT
    if lines[1:2] != [expected_module]:
        # The tree under test is out of the other user's reach (a parent folder of its
        # clone is private): its packages are copied, as another machine has its own.
        code = folder / "code"
        for package in PACKAGES:
            shutil.copytree(
                REPO_ROOT / package, code / package,
                ignore=shutil.ignore_patterns("__pycache__"),
            )  # fmt: skip
        subprocess.run(["chmod", "-R", "a+rX", str(code)], check=True)
        base_env["PYTHONPATH"] = str(code)
        seen = _probe(python, {**base_env, **extra}, uid)
        if seen.stdout.splitlines()[1:2] != [str(code / "aemnist" / "__init__.py")]:
            pytest.fail(
                f"uid {uid} does not import the copy of the project in {code}: "
                f"{(seen.stdout + seen.stderr).strip()[-2000:]}",
                pytrace=False,
            )
    return Runtime(python, {**base_env, **extra}, staged, code)


class Process:
    """One of the other user's processes, its output in a log file of root's."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path,
                 logs: Path) -> None:  # fmt: skip
        self.name, self.log = name, logs / f"{name}.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            output = self.output()
            if match := re.search(pattern, output):
                return match
            assert self.process.poll() is None, (
                f"{self.name} exited with {self.process.returncode} before {pattern!r}:\n"
                f"{output[-4000:]}"
            )
            assert time.monotonic() < deadline, (
                f"{self.name}: no {pattern!r} in {timeout:g} s:\n{output[-4000:]}"
            )
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM to its process group (a worker's nanny and its worker process), then
        SIGKILL if it lingers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@dataclass
class OtherUserCluster:
    address: str  # tcp://127.0.0.1:PORT
    workers: dict[str, str]  # worker name (worker-0, worker-1) -> its address
    folders: dict[str, UserFolders]  # worker name -> its own folders
    uid: int
    runtime: Runtime
    logs: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of every process's log, for assertion messages."""
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}"
            for log in sorted(self.logs.glob("*.log"))
        )


@contextmanager
def other_user_cluster(
    env: dict[str, str] | None = None, uid: int = NOBODY, own_view_of: tuple[Path, ...] = ()
) -> Iterator[OtherUserCluster]:
    """A scheduler and two 1-thread workers (with Dask's default nanny) as ``uid``, plain
    TCP on 127.0.0.1, each in folders of its own (home, Prefect home, Matplotlib's and
    Dask's folders, TMPDIR) under a fresh folder in the system's temporary folder (pytest's
    is root's 0700, which the other user could not enter). ``env`` adds variables to every
    process's environment (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_*): nothing else of the
    test process's reaches them. ``own_view_of``: folders (which must exist) that each
    worker sees as an empty file system of its own, as on a machine of its own."""
    skip_unless_root_with_setpriv()
    if own_view_of and shutil.which("unshare") is None:
        pytest.skip("a worker's own view of a folder needs util-linux's unshare, not on PATH")
    root = Path(tempfile.mkdtemp(prefix="aemnist-other-user-"))
    processes: list[Process] = []
    try:
        root.chmod(0o755)  # root's; the other user may enter, not write
        logs = root / "logs"
        logs.mkdir(mode=0o700)  # the processes write through descriptors opened here
        runtime = other_user_runtime(root, uid)
        dask = [str(runtime.python), "-m"]

        def start(
            name: str, command: list[str], hidden: tuple[Path, ...] = ()
        ) -> tuple[Process, UserFolders]:
            folders = UserFolders.make(root / name, uid)
            process_env = {**runtime.env, **folders.env(), **(env or {})}
            process = Process(name, as_other_user([*dask, *command], uid, hidden), process_env,
                              folders.root, logs)  # fmt: skip
            processes.append(process)
            return process, folders

        scheduler, _ = start(
            "scheduler",
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0"],
        )  # fmt: skip
        # Port 0: the scheduler binds a free port and logs it.
        address = scheduler.wait_for(r"Scheduler at:\s+(tcp://127\.0\.0\.1:\d+)\s",
                                     START_TIMEOUT).group(1)  # fmt: skip
        folders: dict[str, UserFolders] = {}
        for name in WORKERS:
            _, folders[name] = start(
                name,
                ["distributed.cli.dask_worker", address, "--name", name, "--nthreads", "1",
                 "--host", "127.0.0.1", "--no-dashboard",
                 "--local-directory", str(root / name / "local")],
                own_view_of,
            )  # fmt: skip
        from distributed import Client

        with Client(address, timeout=START_TIMEOUT) as client:
            try:
                client.wait_for_workers(len(WORKERS), timeout=START_TIMEOUT)
            except TimeoutError:
                pytest.fail(
                    f"the other user's Dask workers did not join in {START_TIMEOUT:g} s:\n"
                    + "\n".join(p.output()[-3000:] for p in processes),
                    pytrace=False,
                )
            workers = {
                info["name"]: worker for worker, info in client.scheduler_info()["workers"].items()
            }
        yield OtherUserCluster(address, workers, folders, uid, runtime, logs)
    finally:
        for process in reversed(processes):
            process.stop()
        shutil.rmtree(root, ignore_errors=True)


def run_on(client: object, worker: str, function: Callable[..., object], *args: object) -> object:
    """``function(*args)`` on one worker (by address); its result or its exception."""
    future = client.submit(function, *args, workers=[worker], allow_other_workers=False,  # type: ignore[attr-defined]
                           pure=False)  # fmt: skip
    return future.result(timeout=120)
