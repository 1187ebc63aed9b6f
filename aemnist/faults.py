"""Fault injection for tests and drills, through one switch: ``AEMNIST_FAULT``.

``AEMNIST_FAULT="grid:lr=0.01,weight_decay=5e-06,fold=1"`` makes that grid task raise;
``"sweep:size=8"`` that sweep task; several specs are separated by ``;``. Unset, it costs one
dictionary lookup per task.
"""

from __future__ import annotations

import os

FAULT_ENV = "AEMNIST_FAULT"


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


def maybe_fail(stage: str, **key: object) -> None:
    specs = os.environ.get(FAULT_ENV)
    if not specs:
        return
    for spec in specs.split(";"):
        if spec.strip() and _matches(spec, stage, key):
            raise InjectedFault(f"{FAULT_ENV} injected a failure into {stage} {key}")
