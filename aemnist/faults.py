"""Fault injection for tests and drills, through one switch: ``AEMNIST_FAULT``.

A spec names a stage and the key values of the tasks it hits; several specs are separated by
``;``. Unset, it costs one dictionary lookup per call.

Failures: ``AEMNIST_FAULT="grid:lr=0.01,weight_decay=5e-06,fold=1"`` makes that grid task
raise ``InjectedFault``; ``"sweep:size=8"`` that sweep task.

Pauses: a spec prefixed ``pause:`` blocks the task instead, so that a test can act on a run
at a known point (kill it, say) without racing it. ``"pause:sweep:size=8,epoch=3"`` makes
sweep size 8, once its epoch 3 is trained, checkpointed and logged, write one line to stderr,
``AEMNIST_FAULT paused sweep:epoch=3,size=8 (pid 1234) until killed`` (``pause_marker``
gives the text before the pid), then sleep until the process is killed.

Where the tasks call it (tasks/training.py): ``maybe_fail(stage, **key)`` when a training
task starts and ``maybe_fail(stage, epoch=n, **key)`` after each epoch it trains (not after
one restored from a checkpoint). The key is lr, weight_decay and fold for the grid and size
for the sweep and the final model. A spec matches a call when every name it gives is in the
call's key with that value, so a spec that names an epoch matches only that epoch's call, and
one that names none already matches the call at the start.
"""

from __future__ import annotations

import os
import sys
import time

FAULT_ENV = "AEMNIST_FAULT"
PAUSE_PREFIX = "pause:"


class InjectedFault(RuntimeError):
    """Raised where ``AEMNIST_FAULT`` asks for a failure."""


def _matches(spec: str, stage: str, key: dict[str, object]) -> bool:
    spec_stage, _, rest = spec.strip().partition(":")
    if spec_stage != stage:
        return False
    for pair in filter(None, rest.split(",")):
        name, _, wanted = pair.partition("=")
        if name.strip() not in key:
            return False
        actual = key[name.strip()]
        try:
            if isinstance(actual, (int, float)) and float(wanted) != float(actual):
                return False
        except ValueError:
            return False
        if not isinstance(actual, (int, float)) and str(actual) != wanted.strip():
            return False
    return True


def pause_marker(stage: str, **key: object) -> str:
    """The start of the line a paused task writes (the pid follows): the key sorted by name,
    so that a test can wait for it whatever order the call passed the key in."""
    pairs = ",".join(f"{name}={key[name]}" for name in sorted(key))
    return f"{FAULT_ENV} paused {stage}:{pairs}"


def _pause(stage: str, key: dict[str, object]) -> None:
    # Straight to the process's stderr, flushed, rather than through a logger: the line must
    # be out before the task blocks, whatever handlers (Prefect's, a worker's) are set up.
    sys.stderr.write(f"{pause_marker(stage, **key)} (pid {os.getpid()}) until killed\n")
    sys.stderr.flush()
    while True:  # only the process's end releases it; the sleep keeps it off the CPU
        time.sleep(3600)


def maybe_fail(stage: str, **key: object) -> None:
    """Raise ``InjectedFault``, or pause for good, where ``AEMNIST_FAULT`` asks for it."""
    specs = os.environ.get(FAULT_ENV)
    if not specs:
        return
    for spec in specs.split(";"):
        spec = spec.strip()
        pause = spec.startswith(PAUSE_PREFIX)
        if pause:
            spec = spec[len(PAUSE_PREFIX) :]
        if not spec or not _matches(spec, stage, key):
            continue
        if pause:
            _pause(stage, key)
        raise InjectedFault(f"{FAULT_ENV} injected a failure into {stage} {key}")
