"""One study at a time in a work dir: the lock `aemnist run` holds on it.

The lock is an ``flock`` on ``WORKDIR/.aemnist.lock``, a file that holds the holder's process
id. The kernel releases an ``flock`` when the process that took it ends, however it ends
(``kill -9`` included), so a lock file a dead process left behind is simply taken over: only
a live holder keeps a second run out. The file itself stays; it is truncated when the lock is
released in an orderly way.

Only the standard library: `aemnist run` takes the lock before it imports torch or MLflow.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = ".aemnist.lock"


class WorkdirLocked(RuntimeError):
    """Another live process holds the work dir's lock; the message names its process id."""

    def __init__(self, workdir: Path, holder: int | None) -> None:
        self.workdir = workdir
        self.holder = holder
        who = f"process {holder}" if holder else "another process"
        super().__init__(
            f"work dir {workdir} is in use by {who} (another `aemnist run`; it holds "
            f"{workdir / LOCK_NAME}): wait for it to finish or stop it, or pick another "
            f"--workdir"
        )


class WorkdirLock:
    """The held lock of one work dir; ``release()`` (or the end of the process) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # while still held: no reader sees a stale id as the holder's
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(path: Path) -> int | None:
    """The process id written in the lock file ``path``; None when there is none."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_workdir(workdir: Path, wait_for_id: float = 1.0) -> WorkdirLock:
    """Take the lock of ``workdir`` (an existing, writable folder) for this process, at once,
    or raise ``WorkdirLocked`` naming the live process that holds it. A lock file whose
    process has ended is taken over."""
    path = workdir / LOCK_NAME
    # O_CLOEXEC: no child process this one execs inherits the lock (and outlives us with it).
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        # The holder writes its id right after taking the lock: give it a moment to.
        deadline = time.monotonic() + wait_for_id
        while (holder := read_holder(path)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        raise WorkdirLocked(workdir, holder) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return WorkdirLock(path, fd)


def sqlite_url(path: Path, driver: str = "sqlite") -> str:
    """A SQLite database file as a SQLAlchemy URL, whose path ends at the first ``?`` (a query
    string follows) and is percent-decoded: ``%`` and ``?`` are escaped, so that a work dir
    holding them keeps its database. Nothing else is (``#`` and spaces read as they are):
    MLflow 3 creates the store's folder from the URL's text without decoding it, and would
    leave an empty folder of the escaped name beside the work dir."""
    text = str(path.resolve())
    return f"{driver}:///" + text.replace("%", "%25").replace("?", "%3F")


# The work-dir locks this process holds, until it ends (the kernel then releases them): task
# threads a signal cut short may still write to the work dir while the process winds down.
_held: dict[Path, WorkdirLock] = {}


def hold_workdir(workdir: Path) -> WorkdirLock:
    """Hold the lock of ``workdir`` until this process ends, taking it unless this process
    holds it already (the command line takes it before the flow that also asks runs, and a
    deployment run's flow takes it itself); raises ``WorkdirLocked``."""
    workdir = workdir.resolve()
    if workdir not in _held:
        lock = lock_workdir(workdir)
        _held[workdir] = lock
        atexit.register(lock.release)  # an orderly exit empties the file
    return _held[workdir]
