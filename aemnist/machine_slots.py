"""Training slots of one machine without a Prefect server: lock files.

Studies that share one Prefect server share its global concurrency limit (tasks/slots.py).
A study on a temporary server of its own (`aemnist run` with no server running) has no limit
in common with another such study, yet both may train on the same GPU: they take slots here
instead, one lock file per slot in a folder of the user's (``$XDG_RUNTIME_DIR`` or the
temporary folder, ``aemnist-slots-UID``), held with ``flock`` for the task's body.

Why lock files: the kernel releases them when their process dies (a killed run leaves no
slot taken), they need no server, and a free one is taken in microseconds (a contended
Prefect limit costs a poll of seconds). They span the processes of one machine, and only
of one user: studies of two users on one GPU do not see each other's slots.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# How often a task waiting for a slot tries them all again.
POLL_S = 0.05


class SlotError(RuntimeError):
    """The slot folder cannot be used (not the user's own, or open to others)."""


@dataclass(frozen=True)
class MachineSlots:
    """``count`` slots named ``name`` on this machine (``aemnist-gpu``, ``aemnist-cpu``)."""

    name: str
    count: int


def slot_folder() -> Path:
    """The user's slot folder, created 0700; refused when someone else owns it or it is
    open to others (another user could then hold or fake our slots)."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    folder = base / f"aemnist-slots-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SlotError(
            f"the training-slot folder {folder} is not a private folder of this user "
            f"(owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}); remove it, or "
            f"set XDG_RUNTIME_DIR to a folder only you can write"
        )
    return folder


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s exclusive lock, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def machine_slot(slots: MachineSlots) -> Iterator[int]:
    """Hold one of ``slots`` while the body runs (waiting until one is free); yields its
    number. Locks are per open file, so threads of one process exclude each other too."""
    folder = slot_folder()
    while True:
        for number in range(slots.count):
            fd = _try_lock(folder / f"{slots.name}-{number}.lock")
            if fd is None:
                continue
            try:
                yield number
            finally:
                os.close(fd)  # closing the descriptor releases its lock
            return
        time.sleep(POLL_S)
