"""Cached task results as plain data: the JSON a result record holds, and the check that a
record is one this project wrote (tasks.results stores them for Prefect).

A result is a ``TableRef``, a dict of them, or a failed task's exception (its type's name and
message). Reading one back imports nothing and runs nothing: it is parsed as JSON (duplicate
keys refused) and checked field by field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aemnist.schemas import TableRef

RESULT_TYPE = "aemnist-tableref"
# A record holds a reference or a few, never tables: anything larger is not ours.
MAX_RECORD_BYTES = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_METADATA_KEYS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}


class TaskFailure(RuntimeError):
    """A failed task's exception, as its persisted record keeps it: type name and message."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _strict_json(data: bytes | str) -> Any:
    return json.loads(data, object_pairs_hook=_unique_keys)


def _ref_fields(ref: TableRef) -> dict[str, Any]:
    return {"path": ref.path, "sha256": ref.sha256, "rows": ref.rows, "run_id": ref.run_id}


def _ref(value: Any) -> TableRef:
    if not isinstance(value, dict) or set(value) != {"path", "sha256", "rows", "run_id"}:
        raise ValueError("a table reference has exactly path, sha256, rows and run_id")
    path, sha256, rows, run_id = value["path"], value["sha256"], value["rows"], value["run_id"]
    if not (isinstance(path, str) and path and isinstance(run_id, str)):
        raise ValueError("a table reference's path and run_id are strings")
    if not (isinstance(sha256, str) and _SHA256.match(sha256)):
        raise ValueError("a table reference's sha256 is 64 hex digits")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < -1:
        raise ValueError("a table reference's rows is an integer of -1 or more")
    return TableRef(path, sha256, rows, run_id)


def encode_result(obj: Any) -> bytes:
    """A task result as JSON: a ``TableRef``, a dict of them, or a failed task's exception
    (its type's name and message only); TypeError for anything else."""
    if isinstance(obj, TableRef):
        data: dict[str, Any] = {"table": _ref_fields(obj)}
    elif isinstance(obj, dict) and all(
        isinstance(k, str) and isinstance(v, TableRef) for k, v in obj.items()
    ):
        data = {"tables": {key: _ref_fields(ref) for key, ref in obj.items()}}
    elif isinstance(obj, BaseException):
        kind = type(obj)
        data = {"error": {"type": f"{kind.__module__}.{kind.__qualname__}", "message": str(obj)}}
    else:
        raise TypeError(
            f"a cached task returns a TableRef or a dict of them, not {type(obj).__name__}: "
            f"its result is stored as plain data (tasks.results)"
        )
    return json.dumps(data, sort_keys=True).encode()


def decode_result(blob: bytes) -> TableRef | dict[str, TableRef] | TaskFailure:
    """The inverse of ``encode_result``; anything else raises ValueError."""
    data = _strict_json(blob)
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError("a result is one of table, tables or error")
    ((kind, value),) = data.items()
    if kind == "table":
        return _ref(value)
    if kind == "tables" and isinstance(value, dict):
        return {key: _ref(ref) for key, ref in value.items()}
    if (
        kind == "error"
        and isinstance(value, dict)
        and set(value) == {"type", "message"}
        and all(isinstance(v, str) for v in value.values())
    ):
        return TaskFailure(f"{value['type']}: {value['message']}")
    raise ValueError(f"unknown result {kind!r}")


def check_record(content: bytes) -> tuple[Any, dict[str, Any]]:
    """The result and metadata of a result record holding ``encode_result``'s JSON under
    the serializer ``RESULT_TYPE`` (Prefect's record format: ``metadata`` and ``result``);
    ValueError for anything else, before any of it is interpreted (no import, no
    unpickling)."""
    if len(content) > MAX_RECORD_BYTES:
        raise ValueError(f"{len(content)} bytes, more than a result record holds")
    try:
        record = _strict_json(content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a JSON result record ({exc})") from None
    if not isinstance(record, dict) or set(record) != {"metadata", "result"}:
        raise ValueError("not a result record (metadata and result)")
    metadata, result = record["metadata"], record["result"]
    if not isinstance(metadata, dict) or not set(metadata) <= _METADATA_KEYS:
        raise ValueError("its metadata is not a result record's")
    serializer = metadata.get("serializer")
    if serializer != {"type": RESULT_TYPE}:
        named = serializer.get("type") if isinstance(serializer, dict) else serializer
        raise ValueError(f"it names serializer {named!r}, not {RESULT_TYPE!r}")
    if metadata.get("expiration") is not None:
        raise ValueError("it has an expiration; this project writes none")
    if not isinstance(result, str):
        raise ValueError("its result is not JSON text")
    try:
        value = decode_result(result.encode())
    except ValueError as exc:
        raise ValueError(f"its result is not a table reference ({exc})") from None
    return value, metadata
