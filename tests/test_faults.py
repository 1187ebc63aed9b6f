"""AEMNIST_FAULT: a failure or a pause exactly where a spec says, nowhere else."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from aemnist.faults import FAULT_ENV, InjectedFault, maybe_fail, pause_marker


def test_a_failure_spec_hits_only_the_task_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "grid:lr=0.01,fold=1;sweep:size=8,epoch=2")
    with pytest.raises(InjectedFault, match="grid"):
        maybe_fail("grid", lr=0.01, weight_decay=1e-5, fold=1)
    maybe_fail("grid", lr=0.01, weight_decay=1e-5, fold=2)  # another fold
    maybe_fail("sweep", size=8)  # the task's start: the spec names an epoch
    maybe_fail("sweep", size=8, epoch=1)
    with pytest.raises(InjectedFault, match="sweep"):
        maybe_fail("sweep", size=8, epoch=2)


def test_a_pause_spec_blocks_the_task_after_writing_its_marker() -> None:
    code = (
        "from aemnist.faults import maybe_fail\n"
        "maybe_fail('sweep', size=8)\n"  # the start: no epoch, no match
        "maybe_fail('sweep', size=8, epoch=3)\n"
        "print('not reached', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, FAULT_ENV: "pause:sweep:size=8,epoch=3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()  # blocks until the marker is written
        assert line.startswith(pause_marker("sweep", size=8, epoch=3))
        time.sleep(0.5)
        assert proc.poll() is None  # still paused
    finally:
        proc.kill()
        stdout, _ = proc.communicate()
    assert "not reached" not in stdout
