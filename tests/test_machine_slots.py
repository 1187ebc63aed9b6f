"""Training slots without a server (aemnist.machine_slots): lock files that exclude threads
and processes of one machine, and that a killed holder leaves free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

from aemnist.machine_slots import MachineSlots, SlotError, machine_slot, slot_folder


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime


def test_threads_holding_one_slot_never_overlap_and_two_slots_let_two_run() -> None:
    def spans(slots: MachineSlots, n: int) -> list[tuple[float, float]]:
        found: list[tuple[float, float]] = []

        def work() -> None:
            with machine_slot(slots):
                start = time.monotonic()
                time.sleep(0.2)
                found.append((start, time.monotonic()))

        threads = [threading.Thread(target=work) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sorted(found)

    one = spans(MachineSlots("test-one", 1), 3)
    assert all(b[0] >= a[1] for a, b in pairwise(one)), one
    two = spans(MachineSlots("test-two", 2), 2)
    assert two[1][0] < two[0][1], two  # both held a slot at once


def test_a_slot_held_by_another_process_waits_and_a_killed_holder_frees_it(
    private_runtime_dir: Path,
) -> None:
    slots = MachineSlots("test-proc", 1)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from aemnist.machine_slots import MachineSlots, machine_slot\n"
         "with machine_slot(MachineSlots('test-proc', 1)):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(600)\n"],
        env={**os.environ, "XDG_RUNTIME_DIR": str(private_runtime_dir)},
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        got: list[float] = []

        def take() -> None:
            with machine_slot(slots):
                got.append(time.monotonic())

        waiter = threading.Thread(target=take)
        waiter.start()
        time.sleep(0.5)
        assert not got  # the other process holds the only slot
        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        waiter.join(timeout=10)
        assert got and got[0] - killed < 2.0  # the kernel released the dead holder's lock
    finally:
        holder.kill()
        holder.wait()


def test_a_slot_folder_open_to_others_is_refused_naming_it(private_runtime_dir: Path) -> None:
    folder = slot_folder()
    assert folder.parent == private_runtime_dir and (folder.stat().st_mode & 0o777) == 0o700
    folder.chmod(0o777)
    with pytest.raises(SlotError, match=f"{folder} is not a private folder"):
        slot_folder()


def test_aemnist_run_names_a_slot_folder_open_to_others_in_one_line_before_anything(
    private_runtime_dir: Path, tmp_path: Path, mnist_mirror: Path
) -> None:
    from cli_helpers import run_cli, smoke_run

    slot_folder().chmod(0o777)
    workdir = tmp_path / "work"

    result = run_cli(
        smoke_run(workdir, mnist_mirror),
        tmp_path / "home",
        {"XDG_RUNTIME_DIR": str(private_runtime_dir)},
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"aemnist: error: the training-slot folder {private_runtime_dir}"
        f"/aemnist-slots-{os.getuid()} is not a private folder of this user (owner uid "
        f"{os.getuid()}, mode drwxrwxrwx); remove it, or set XDG_RUNTIME_DIR to a folder only "
        f"you can write"
    ]
    assert not workdir.exists()  # nothing created
