"""Content-addressed keys of stage results: what determines a task's output.

A key hashes the stage's name, the config fields the task uses, the SHA-256 of its input
tables and the source of the library modules its computation runs. Two runs with the same
key produce the same tables, so the second can reuse the first's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

from aemnist.layout import Layout
from aemnist.schemas import TableRef

_LIB = Path(__file__).parent

# The library modules whose code decides each stage's output (its "code version").
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "folds": ("data", "schemas"),
    "grid": ("data", "model", "training", "schemas"),
    "grid-summary": ("summaries", "schemas"),
    "sweep": ("data", "model", "training", "schemas"),
    "sweep-summary": ("summaries", "schemas"),
    "final": ("data", "model", "training", "schemas"),
    "corruption": ("data", "model", "corruption", "schemas"),
    "embedding": ("data", "model", "embedding", "schemas"),
    "report": ("report", "plots", "reference", "schemas"),
}


@cache
def code_version(stage: str) -> str:
    digest = hashlib.sha256()
    for module in STAGE_MODULES[stage]:
        digest.update((_LIB / f"{module}.py").read_bytes())
    return digest.hexdigest()


def fingerprint(value: Any) -> Any:
    """A JSON-able value that changes exactly when ``value``'s meaning does.

    A table counts by its content (SHA-256), not by where it lies or which run wrote it."""
    if isinstance(value, TableRef):
        return {"table_sha256": value.sha256}
    if isinstance(value, Layout):
        return {"workdir": str(value.root)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: fingerprint(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): fingerprint(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise TypeError(f"cannot fingerprint a {type(value).__name__} for a cache key")


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    payload = {"stage": stage, "code": code_version(stage), "inputs": fingerprint(inputs)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"
