"""The parquet tables stages hand each other: the one module that owns their schemas.

Every table is written atomically (a temporary file in the same folder, fsync, rename), so a
reader never sees a half-written table, and checked against its schema when read. What the
project writes is its owner's alone (mode 0600); the temporary files a killed writer leaves
are removed at the start of the next run (remove_stale_temps).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aemnist.storage import as_path, fs_path, is_remote, put_whole

N_PIXELS = 28 * 28

SCHEMAS: dict[str, pa.Schema] = {
    "mnist": pa.schema(
        [
            ("idx", pa.int32()),
            ("label", pa.uint8()),
            ("pixels", pa.list_(pa.uint8(), N_PIXELS)),
        ]
    ),
    "folds": pa.schema([("idx", pa.int32()), ("fold", pa.int32())]),
    "grid_history": pa.schema(
        [
            ("lr", pa.float64()),
            ("weight_decay", pa.float64()),
            ("fold", pa.int32()),
            ("epoch", pa.int32()),
            ("train_loss", pa.float64()),
            ("val_loss", pa.float64()),
            # Reconstructions' spread over the validation images, relative to the images'
            # (aemnist.training.EpochResult): near 0 while a run sits at a constant output.
            ("output_spread", pa.float64()),
            # Validation loss over an all-black output's: near 1 while the output is black.
            ("black_ratio", pa.float64()),
        ]
    ),
    "grid_summary": pa.schema(
        [
            ("rank", pa.int32()),
            ("lr", pa.float64()),
            ("weight_decay", pa.float64()),
            ("train_loss_mean", pa.float64()),
            ("train_loss_std", pa.float64()),
            ("val_loss_mean", pa.float64()),
            ("val_loss_std", pa.float64()),
            ("n_folds", pa.int32()),
            # Seeds the grid ran with: ± is over them when above 1, else over the folds.
            ("repeats", pa.int32()),
            # Runs of the cell that started at a constant output (aemnist.summaries).
            ("dead_starts", pa.int32()),
        ]
    ),
    "sweep_history": pa.schema(
        [
            ("size", pa.int32()),
            ("repeat", pa.int32()),  # which seed (0 = the study's own)
            ("epoch", pa.int32()),
            ("lr", pa.float64()),
            ("train_loss", pa.float64()),
            # The loss the scheduler and the ranking used: on the test set (the seed's
            # selection) or on images held out of the training set; the other is null.
            ("test_loss", pa.float64()),
            ("val_loss", pa.float64()),
            ("output_spread", pa.float64()),  # over the scored images, as grid_history's
            ("black_ratio", pa.float64()),
        ]
    ),
    "sweep_summary": pa.schema(
        [
            ("rank", pa.int32()),
            ("size", pa.int32()),
            ("test_loss", pa.float64()),
            ("test_loss_std", pa.float64()),
            ("val_loss", pa.float64()),
            ("val_loss_std", pa.float64()),
            ("train_loss", pa.float64()),
            ("epochs_scored", pa.int32()),
            ("repeats", pa.int32()),
            # The seeds whose run started dead, the epochs each spent so, and the score over
            # those seeds and over the others (aemnist.summaries: what a dead start cost).
            ("dead_repeats", pa.list_(pa.int32())),
            ("dead_epochs", pa.list_(pa.int32())),
            ("dead_loss", pa.float64()),
            ("alive_loss", pa.float64()),
        ]
    ),
    "corruption": pa.schema(
        [
            ("kind", pa.string()),
            ("level", pa.float64()),
            ("mse", pa.float64()),
            ("mse_ci95", pa.float64()),
            ("baseline_mse", pa.float64()),
            ("baseline_mse_ci95", pa.float64()),
        ]
    ),
    "corruption_examples": pa.schema(
        [
            ("kind", pa.string()),
            ("level", pa.float64()),
            ("corrupted", pa.list_(pa.float32(), N_PIXELS)),
            ("restored", pa.list_(pa.float32(), N_PIXELS)),
        ]
    ),
    "embedding": pa.schema(
        [
            ("idx", pa.int32()),
            ("label", pa.uint8()),
            ("z", pa.list_(pa.float32())),
            ("tsne_x", pa.float64()),
            ("tsne_y", pa.float64()),
        ]
    ),
    "metrics": pa.schema([("metric", pa.string()), ("value", pa.float64())]),
}


class TableError(RuntimeError):
    """A stage table that is missing, unreadable or of the wrong shape."""


@dataclass(frozen=True)
class TableRef:
    """A written table: where it is and the SHA-256 of its bytes (what a reader depends on)."""

    path: str
    sha256: str
    rows: int
    # The MLflow run that wrote it: a later study that reuses the table links to that run.
    run_id: str = ""

    def with_run(self, run_id: str) -> TableRef:
        return dataclasses.replace(self, run_id=run_id)

    @classmethod
    def of_file(cls, path: Path | str) -> TableRef:
        """A reference to any written file (a checkpoint, say); rows unknown (-1)."""
        return cls(str(path), file_sha256(path), -1)


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with as_path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# The cache key of the task writing outputs in this context (set by the orchestration layer):
# recorded beside each output, so a file overwritten by another config is not taken for this
# config's result.
_PRODUCER: ContextVar[str | None] = ContextVar("aemnist_producer", default=None)


@contextmanager
def producing(key: str | None) -> Iterator[None]:
    token = _PRODUCER.set(key)
    try:
        yield
    finally:
        _PRODUCER.reset(token)


def hash_record(path: Path | str) -> Path:
    """The sidecar that holds the SHA-256 of an output file (and its producer's key)."""
    path = as_path(path)
    return path.with_name(f".{path.name}.sha256")


# Temporary files of atomic writes: ``.NAME.PID-TOKEN.tmp`` beside the file they become.
TEMP_NAME = re.compile(r"^\..+\.[0-9]+-[0-9a-f]{8}\.tmp$")
# Files the project writes are its owner's alone (the work dir itself is 0700: aemnist.layout).
FILE_MODE = 0o600
# An atomic write holds its temporary file for seconds (fsync included); one untouched this
# long was left by a killed writer, and is removed at the start of a run (remove_stale_temps)
# unless a live writer still holds its lock.
STALE_TEMP_SECONDS = 3600.0


def temp_path(path: Path) -> Path:
    """A new temporary name beside ``path`` (hidden, unique to this process and call)."""
    name = path.name if path.name.startswith(".") else f".{path.name}"
    return path.with_name(f"{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _lock(fd: int) -> bool:
    """Take the advisory lock that marks a temporary file as being written (or, for a
    cleaner, as abandoned). False when another process holds it; True when taken, or when
    the file system has no such locks (then the file's age alone decides)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return True  # ENOLCK, EOPNOTSUPP...: no locks here
    return True


@contextmanager
def _temp_file(path: Path) -> Iterator[Path]:
    """A new temporary file beside ``path``, created ``FILE_MODE`` and locked while this
    process writes it; gone afterwards unless it was renamed."""
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        _lock(fd)
        yield tmp
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)


def atomic_replace(path: Path, write: Callable[[Path], object]) -> str:
    """Call ``write(tmp)`` then rename tmp onto ``path`` (created ``FILE_MODE``); on any error
    nothing is left behind. Returns the SHA-256 of what was written. In an object store
    (aemnist.storage), ``tmp`` is a local file sent whole in one request."""
    if is_remote(path):
        digest = ""

        def written(tmp: Path) -> None:
            nonlocal digest
            write(tmp)
            digest = file_sha256(tmp)

        put_whole(path, written)
        return digest
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _temp_file(path) as tmp:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    return digest


def atomic_write_bytes(path: Path, write) -> str:  # noqa: ANN001 - write(tmp_path) callable
    """Call ``write(tmp)`` then rename tmp onto ``path``; on any error nothing is left behind.

    The file's SHA-256 (and the producing task's key) is recorded beside it
    (``.NAME.sha256``) after the rename, so a file without a matching record is known to be
    damaged or foreign. Returns the SHA-256."""
    digest = atomic_replace(path, write)
    line = f"{digest} {_PRODUCER.get() or '-'}\n"
    atomic_replace(hash_record(path), lambda tmp: tmp.write_text(line))
    return digest


def _remove_if_abandoned(path: Path, older_than: float) -> bool:
    """Remove the temporary file ``path`` if it is a regular file untouched for
    ``older_than`` seconds whose lock no live writer holds."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False  # gone, a link, or not ours to write
    try:
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode) or time.time() - held.st_mtime < older_than:
            return False
        if not _lock(fd):
            return False  # a live writer holds it
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            return False  # replaced meanwhile
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps(
    root: Path, older_than: float = STALE_TEMP_SECONDS, skip: tuple[str, ...] = ("mlartifacts",)
) -> list[Path]:
    """Remove the temporary files that writers killed mid-write (kill -9, power loss) left
    under ``root``: only names of the form ``temp_path`` gives, untouched for ``older_than``
    seconds and not locked by a live writer (any process, on any machine whose locks the
    file system shares, that is still writing one keeps its lock). The folders in ``skip``,
    directly under ``root``, are not searched. Returns the files removed."""
    removed = []
    for folder, subfolders, files in os.walk(root):
        if Path(folder) == root:
            subfolders[:] = [name for name in subfolders if name not in skip]
        for name in files:
            path = Path(folder, name)
            if TEMP_NAME.match(name) and _remove_if_abandoned(path, older_than):
                removed.append(path)
    return removed


def _read_record(path: Path) -> tuple[str, str] | None:
    try:
        digest, _, key = hash_record(path).read_text().strip().partition(" ")
    except OSError:
        return None
    return digest, key


def output_state(path: Path | str, key: str | None = None) -> str:
    """``intact`` (the file matches its recorded SHA-256 and, if ``key`` is given, was written
    by that task), ``stale`` (intact but written by another task or config), ``missing`` or
    ``damaged``."""
    path = as_path(path)
    if not path.exists():
        return "missing"
    record = _read_record(path)
    if record is None or file_sha256(path) != record[0]:
        return "damaged"
    if key is not None and record[1] != key:
        return "stale"
    return "intact"


def recorded_ref(path: Path | str, key: str | None = None) -> TableRef | None:
    """A TableRef for an intact output from its hash record (rows unknown: -1), else None."""
    path = as_path(path)
    if output_state(path, key) != "intact":
        return None
    record = _read_record(path)
    return TableRef(str(path), record[0], -1) if record else None


def write_table(
    data: pd.DataFrame | pa.Table,
    path: Path | str,
    schema_name: str,
    metadata: dict[str, str] | None = None,
) -> TableRef:
    """Cast ``data`` to its declared schema and write it atomically as zstd parquet."""
    path = as_path(path)
    schema = SCHEMAS[schema_name]
    if isinstance(data, pd.DataFrame):
        missing = [name for name in schema.names if name not in data.columns]
        if missing:
            raise TableError(f"table {schema_name} is missing columns {missing}")
        table = pa.Table.from_pandas(data[schema.names], preserve_index=False)
    else:
        table = data.select(schema.names)
    table = table.cast(schema)
    meta = {b"aemnist.schema": schema_name.encode()}
    for key, value in (metadata or {}).items():
        meta[f"aemnist.{key}".encode()] = str(value).encode()
    table = table.replace_schema_metadata(meta)
    digest = atomic_write_bytes(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return TableRef(path=str(path), sha256=digest, rows=table.num_rows)


def _missing(path: Path) -> TableError:
    return TableError(
        f"table {path} does not exist; run the stage that writes it "
        f"(`aemnist run` re-runs what is missing)"
    )


def _damaged(path: Path, exc: Exception) -> TableError:
    return TableError(
        f"table {path} is damaged and cannot be read ({exc}); delete it and run "
        f"`aemnist run` again to recompute it"
    )


def _check_schema(path: Path, actual: pa.Schema, schema_name: str) -> None:
    expected = SCHEMAS[schema_name]
    actual = actual.remove_metadata()
    if not actual.equals(expected):
        raise TableError(
            f"table {path} does not have the {schema_name} schema (expected {expected.names} "
            f"with types {[str(t) for t in expected.types]}, found {actual.names} with "
            f"{[str(t) for t in actual.types]}); delete it and run `aemnist run` again"
        )


def _pyarrow_source(path: Path) -> tuple[Any, Any]:
    """What pyarrow reads ``path`` from: the local file, or its key in the store's fsspec
    file system (pyarrow wraps it)."""
    if is_remote(path):
        fs, key = fs_path(path)
        return key, fs
    return path, None


def read_table(path: Path | str, schema_name: str) -> pa.Table:
    """Read a stage table and check it against its declared schema."""
    path = as_path(path)
    if not path.exists():
        raise _missing(path)
    try:
        source, filesystem = _pyarrow_source(path)
        table = pq.read_table(source, filesystem=filesystem)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise _damaged(path, exc) from exc
    _check_schema(path, table.schema, schema_name)
    return table


def read_frame(path: Path | str, schema_name: str) -> pd.DataFrame:
    return read_table(path, schema_name).to_pandas()


def _aemnist_metadata(schema: pa.Schema) -> dict[str, str]:
    return {
        k.decode()[len("aemnist.") :]: v.decode()
        for k, v in (schema.metadata or {}).items()
        if k.decode().startswith("aemnist.")
    }


def table_footer(path: Path | str, schema_name: str) -> tuple[int, dict[str, str]]:
    """A stage table's row count and ``aemnist.*`` metadata, from its footer alone (no data
    page is decoded), after checking its schema."""
    path = as_path(path)
    if not path.exists():
        raise _missing(path)
    try:
        source, filesystem = _pyarrow_source(path)
        footer = pq.read_metadata(source, filesystem=filesystem)
        schema = footer.schema.to_arrow_schema()
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise _damaged(path, exc) from exc
    _check_schema(path, schema, schema_name)
    return footer.num_rows, _aemnist_metadata(schema)


def metrics_frame(metrics: dict[str, float]) -> pd.DataFrame:
    """A ``metrics`` table (metric, value) from a mapping."""
    return pd.DataFrame({"metric": list(metrics), "value": [float(v) for v in metrics.values()]})
