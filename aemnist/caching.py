"""Content-addressed keys of stage results: what determines a task's output.

A key hashes the stage's name, its job (every field: config values, the SHA-256 of its input
tables, the device, torch threads and training options), the source of the library code its
computation runs and the torch version. Two runs with the same key produce the same tables
(on the same machine), so the second can reuse the first's.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata
import json
from functools import cache
from pathlib import Path
from typing import Any

from aemnist.layout import Layout
from aemnist.plan import STAGES
from aemnist.schemas import TableRef

_LIB = Path(__file__).parent
_PACKAGE = _LIB.name


def module_source(module: str) -> bytes:
    """The source of ``aemnist.X`` (``module``); one place to read it, so a test can show
    what editing a module does to the keys."""
    return (_LIB / f"{module.removeprefix(_PACKAGE + '.')}.py").read_bytes()


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports that never run)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
            else:
                todo.append(child)
    return out


def _imported(module: str) -> set[str]:
    """The aemnist modules ``module`` imports, anywhere in its body (imports inside functions
    count: they run when the function does)."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(module_source(module))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from aemnist import plots` names a module; `from aemnist.x import y` names x.
            if node.module == _PACKAGE:
                names = [f"{_PACKAGE}.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        found |= {name for name in names if name.startswith(_PACKAGE + ".")}
    return {name for name in found if (_LIB / f"{name.split('.', 1)[1]}.py").exists()}


def library_modules(stage: str) -> list[str]:
    """Every aemnist module whose code a stage's computation can run: its library modules and
    all they import, transitively."""
    seen: set[str] = set()
    todo = list(STAGES[stage].library)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imported(module) - seen)
    return sorted(seen)


def _torch_version() -> str:
    # From the installed metadata, not `import torch`: `aemnist status` and the key tests
    # need no torch import for it.
    return importlib.metadata.version("torch")


@cache
def code_version(stage: str) -> str:
    digest = hashlib.sha256(f"torch {_torch_version()}\n".encode())
    for module in library_modules(stage):
        digest.update(f"{module}\n".encode())
        digest.update(module_source(module))
    return digest.hexdigest()


def _keyed(f: dataclasses.Field, value: Any) -> bool:
    """Whether a job's field enters its key: key=False marks one that does not change numbers
    (where a task waits); key="unless-default" one added after jobs were keyed, left out at
    its default so that the jobs it does not change keep their keys."""
    how = f.metadata.get("key", True)
    if how == "unless-default":
        return value != f.default
    return bool(how)


def fingerprint(value: Any) -> Any:
    """A JSON-able value that changes exactly when ``value``'s meaning does.

    A table counts by its content (SHA-256), not by where it lies or which run wrote it."""
    if isinstance(value, TableRef):
        return {"table_sha256": value.sha256}
    if isinstance(value, Layout):
        # MNIST's key as before datasets were a field: its earlier caches stay valid.
        key = {"workdir": str(value.root)}
        if value.dataset != "mnist":
            key["dataset"] = value.dataset
        if value.storage:  # a study in an object store is not the work dir's
            key["storage"] = value.storage
        return key
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: fingerprint(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if _keyed(f, getattr(value, f.name))
        }
    if hasattr(value, "model_dump"):  # a pydantic model (the config's sections)
        return fingerprint(value.model_dump())
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


def stage_key(stage: str, job: Any) -> str:
    payload = {"stage": stage, "code": code_version(stage), "job": fingerprint(job)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"
