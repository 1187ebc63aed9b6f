"""Task results kept as plain data: what a cached task returned, stored so that reading it
back runs no code.

Prefect persists a task's result as a record (JSON: ``metadata`` and ``result``) and reads
back whatever serializer the record itself names: a record rewritten with a pickle payload
would run that pickle on the next run, before any check of ours. So:

- ``TableRefSerializer`` writes our tasks' results (a ``TableRef``, a dict of them, or the
  exception of a failed task) as JSON and reads back only those shapes (aemnist.records);
- ``CacheStore``, the work dir's result store, checks every record it reads before Prefect
  sees it: a record that does not name exactly this serializer, or whose result is not that
  JSON, is refused with a warning naming its file. Prefect counts a record it cannot read as
  absent: the task runs again and its new record replaces the refused one. What the store
  hands Prefect is a record it wrote itself from the checked result, never the file's bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.logging import get_logger, get_run_logger
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import Serializer
from pydantic import Field

from aemnist.records import (
    MAX_RECORD_BYTES,
    RESULT_TYPE,
    check_record,
    decode_result,
    encode_result,
)
from aemnist.schemas import atomic_replace


class ForeignRecordError(ValueError):
    """A result record this project did not write: it is never deserialized."""


class TableRefSerializer(Serializer):
    """Prefect's serializer for our cached tasks: ``encode_result`` / ``decode_result``."""

    type: str = Field(default=RESULT_TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return encode_result(obj)

    def loads(self, blob: bytes) -> Any:
        return decode_result(blob)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return get_logger("aemnist.cache")


def checked_record(content: bytes, where: str, path: str, block_id: Any) -> bytes:
    """The record Prefect may parse for the cache record ``content`` read from ``where``:
    one written here from its checked result. A record this project did not write is
    refused with a warning naming it (Prefect then recomputes its task)."""
    try:
        value, _ = check_record(content)
    except ValueError as exc:
        run_logger().warning(
            "cache record %s refused, not read: %s; its task is recomputed and its record replaced",
            where,
            exc,
        )
        raise ForeignRecordError(f"cache record {where} refused: {exc}") from None
    record = ResultRecord(
        result=value,
        metadata=ResultRecordMetadata(
            storage_key=path, serializer=TableRefSerializer(), storage_block_id=block_id
        ),
    )
    return record.serialize()


class CacheStore(LocalFileSystem):
    """The work dir's result store: a local folder whose records are checked when read
    (``check_record``: a foreign one is refused, so Prefect recomputes its task) and written
    atomically, mode 0600."""

    _block_type_name = "aemnist cache"
    _description = "An aemnist work dir's cache: task results as checked JSON records."

    def _checked(self, path: str) -> bytes:
        file = self._resolve_path(path)
        if not file.is_file():
            raise ValueError(f"Path {file} does not exist.")  # as LocalFileSystem: a miss
        try:
            fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                content = fh.read(MAX_RECORD_BYTES + 1)
        except OSError as exc:
            run_logger().warning("cache record %s refused, not read: %s", file, exc)
            raise ForeignRecordError(f"cache record {file} refused: {exc}") from None
        return checked_record(content, str(file), path, self._block_document_id)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return self._checked(path)

    async def aread_path(self, path: str) -> bytes:
        return self._checked(path)

    def _write(self, path: str, content: bytes) -> str:
        file = self._resolve_path(path)
        atomic_replace(file, lambda tmp: Path(tmp).write_bytes(content))
        return str(file)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        return self._write(path, content)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)


class RemoteCacheStore(RemoteFileSystem):
    """A study's result store in its object store (``runtime.storage``): the same checked
    records as ``CacheStore``, each written whole in one request (an object is visible whole
    or not at all). Credentials come from the environment of each process, never the block."""

    _block_type_name = "aemnist remote cache"
    _description = "An aemnist study's cache in an object store: checked JSON records."

    def _checked(self, path: str) -> bytes:
        where = self._resolve_path(path)
        with self.filesystem.open(where, "rb") as fh:  # a missing one raises: a miss
            content = fh.read(MAX_RECORD_BYTES + 1)
        return checked_record(content, where, path, self._block_document_id)

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        return self._checked(path)

    async def aread_path(self, path: str) -> bytes:
        return self._checked(path)

    def _write(self, path: str, content: bytes) -> str:
        where = self._resolve_path(path)
        self.filesystem.pipe_file(where, content)  # one PUT
        return where

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        return self._write(path, content)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)
