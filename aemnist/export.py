"""A finished study's work dir as a folder to ship (`aemnist export`): what a reader needs to
browse the run in the MLflow UI and rebuild its report, and nothing a run left for itself.

What goes: the study's config, its stage tables with their hash records, the report, its run
record and figures, and the MLflow store (its SQLite database and artifact folder). What stays:
the MNIST tables (``data/``: public, and most of the size), checkpoints and the final model's
``.pt`` files, Prefect's persisted results (``cache/``), the servers' folder (``server/``:
databases, logs, credentials), locks and temporary files. The work dir's files are chosen by
name (an allowlist): a file this module does not know stays behind.

The copied MLflow store is made portable: every location in it under the work dir (runs'
artifact URIs, experiments' and logged models' artifact locations, model versions' storage
locations) becomes an ``mlflow-artifacts:/`` URI, which an MLflow server started with
``--artifacts-destination <folder>/mlartifacts`` (as `aemnist ui` starts it) resolves wherever
the folder lands. Only the copy is changed; the work dir's database is opened read-only.

The export is built in a hidden temporary folder beside the destination and renamed into
place: a failure leaves no half export. Then ``<DIR>.md`` is written beside it, the report
with its figure links relative to that file (``results/paper.md`` links ``paper/figures/``).
No Prefect, MLflow or torch: the standard library, the report and its tables.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from aemnist.layout import Layout
from aemnist.schemas import TEMP_NAME, file_sha256, hash_record, producing
from aemnist.workdir import LOCK_NAME, WorkdirLocked, lock_workdir

DEFAULT_MAX_MB = 25.0
STORE = "mlflow.db"
ARTIFACTS = "mlartifacts"
MANIFEST = "export.json"
PROXY = "mlflow-artifacts:/"
# What the work dir holds for a reader, by name (relative paths; `*` within one folder).
_WORKDIR_FILES = (
    "study_config.json",
    "report.md",
    "report_run.json",
    "*.parquet",
    "grid/*.parquet",
    "sweep/*.parquet",
    "final/*.parquet",
    "figures/*.png",
)
# In the artifact folder everything MLflow logged goes but these: model checkpoints (the final
# run logs final/model.pt; the registered model's own files stay), pickles of any kind.
_LEFT_OUT_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
# The MLflow store's columns that hold a location MLflow resolves: rewritten to the proxy.
_LOCATIONS = (
    ("runs", "artifact_uri", "run_uuid"),
    ("experiments", "artifact_location", "experiment_id"),
    ("model_versions", "storage_location", "name || '/' || version"),
    ("model_versions", "source", "name || '/' || version"),
    ("logged_models", "artifact_location", "model_id"),
)
_REPORT_DATE = re.compile(r"^- date: (\d{4}-\d{2}-\d{2})$", re.MULTILINE)


class ExportError(RuntimeError):
    """The work dir cannot be exported as asked; says why and what to do."""


@dataclass(frozen=True)
class Export:
    """A finished export: its folder, its report beside it and its size in bytes."""

    folder: Path
    report: Path
    size: int
    files: int


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _is_pickle_or_temp(path: Path) -> bool:
    return (
        path.suffix.lower() in _LEFT_OUT_SUFFIXES
        or bool(TEMP_NAME.match(path.name))
        or path.name == LOCK_NAME
    )


def _workdir_files(root: Path) -> list[Path]:
    """The reader's files of the work dir (relative paths): the allowlist, each with its hash
    record where it has one. Links are not followed (a link could lead out of the work dir)."""
    chosen: set[Path] = set()
    for pattern in _WORKDIR_FILES:
        for path in root.glob(pattern):
            if path.is_symlink() or not path.is_file() or _is_pickle_or_temp(path):
                continue
            chosen.add(path.relative_to(root))
            record = hash_record(path)
            if record.is_file() and not record.is_symlink():
                chosen.add(record.relative_to(root))
    return sorted(chosen)


def _artifact_files(root: Path) -> list[Path]:
    """Every file of the artifact folder but checkpoints, pickles, temporary files and links."""
    folder = root / ARTIFACTS
    found = []
    for current, subfolders, files in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not Path(current, name).is_symlink()]
        for name in files:
            path = Path(current, name)
            if path.is_symlink() or not path.is_file() or _is_pickle_or_temp(path):
                continue
            found.append(path.relative_to(root))
    return sorted(found)


def _check_study(root: Path) -> Layout:
    layout = Layout(root)
    if not root.is_dir():
        raise ExportError(f"work dir {root} does not exist: pass the --workdir of a study")
    missing = [
        path.name for path in (layout.config, layout.report, layout.report_run, root / STORE)
        if not path.is_file()
    ]  # fmt: skip
    if missing:
        raise ExportError(
            f"work dir {root} holds no finished study with an embedded MLflow store (no "
            f"{', '.join(missing)}): run `aemnist run --workdir {root}` to the end first, "
            f"without MLFLOW_TRACKING_URI"
        )
    return layout


def _check_destination(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out} is a file or a link: name a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty: name a new or empty folder")


@contextlib.contextmanager
def _held(root: Path) -> Iterator[None]:
    """The work dir's lock while it is read: no study writes to it meanwhile. A work dir this
    user cannot write to holds no study of theirs that could run; it is read as it is."""
    try:
        lock = lock_workdir(root)
    except WorkdirLocked as exc:
        raise ExportError(
            f"work dir {root} is in use (a study runs there: {exc.holder or 'another process'}"
            f"): export it once it has finished"
        ) from None
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _store_size(root: Path) -> int:
    """The database's size, its write-ahead log included (the copy holds both)."""
    return sum(
        path.stat().st_size for path in (root / STORE, root / f"{STORE}-wal") if path.is_file()
    )


def _refuse_if_too_big(root: Path, files: list[Path], max_bytes: int) -> int:
    sizes = {rel: (root / rel).stat().st_size for rel in files}
    sizes[Path(STORE)] = _store_size(root)
    total = sum(sizes.values())
    if total > max_bytes:
        biggest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
        named = ", ".join(f"{rel} ({_megabytes(size)})" for rel, size in biggest)
        raise ExportError(
            f"the export of {root} would take {_megabytes(total)}, more than --max-mb "
            f"{max_bytes / 1e6:g}; the biggest files: {named}; nothing was written"
        )
    return total


# ---- the MLflow store ----------------------------------------------------------------------


def _local_path(location: str) -> Path | None:
    """The local path a stored location names (a file: URI or an absolute path), else None."""
    if location.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path))
    if location.startswith("/"):
        return Path(location)
    return None


def _under(path: Path, root: Path) -> Path | None:
    try:
        return path.relative_to(root)
    except ValueError:
        return None


def _copy_store(source: Path, target: Path) -> None:
    """A consistent copy of the SQLite database (its write-ahead log included), through
    SQLite's backup: the source is opened read-only and never changed."""
    uri = f"{source.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as src:
            with contextlib.closing(sqlite3.connect(target)) as dst:
                src.backup(dst)
    except sqlite3.Error as exc:
        raise ExportError(
            f"the MLflow store {source} cannot be read as a SQLite database ({exc}); check "
            f"that it is the work dir's, or export another work dir"
        ) from exc


def _columns(db: sqlite3.Connection) -> list[tuple[str, str]]:
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return [
        (table, row[1])
        for table in tables
        for row in db.execute(f"PRAGMA table_info('{table}')")
        if row[2].upper() in ("", "TEXT") or "CHAR" in row[2].upper()
    ]


def _portable_location(
    location: str, root: Path, what: str, folder_fallback: str | None = None
) -> str:
    """``location`` as a proxied ``mlflow-artifacts:/`` URI when it lies in the work dir's
    artifact folder; ``folder_fallback`` (an experiment's) when it lies elsewhere."""
    path = _local_path(location)
    if path is None:
        return location  # models:/..., mlflow-artifacts:/..., a remote store: portable as is
    relative = _under(path, root / ARTIFACTS)
    if relative is not None:
        return PROXY + ("" if relative == Path(".") else relative.as_posix())
    if folder_fallback is not None:
        return folder_fallback
    raise ExportError(
        f"{what} keeps its artifacts at {location}, outside the work dir's {ARTIFACTS} "
        f"folder: they cannot be shipped with it; export a work dir whose runs log into its "
        f"own store"
    )


def _relative_text(value: str, root: Path) -> str:
    """A tag or parameter value that is a path in the work dir, made relative to it."""
    path = _local_path(value)
    relative = None if path is None else _under(path, root)
    return value if relative is None else relative.as_posix()


def make_store_portable(db_path: Path, root: Path) -> int:
    """Rewrite, in the copied database ``db_path``, every location under the work dir
    ``root`` (absolute and resolved): artifact locations become ``mlflow-artifacts:/`` URIs,
    and paths in tags, parameters and dataset sources become relative to the work dir.
    Raises ExportError when a location lies outside it, or when any other field still names
    the work dir afterwards (a field this MLflow version added). Returns the values changed."""
    changed = 0
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        for table, column, key in _LOCATIONS:
            rows = db.execute(f"SELECT rowid, {key}, {column} FROM {table}").fetchall()
            for rowid, ident, value in rows:
                if value is None:
                    continue
                fallback = f"{PROXY}{ident}" if table == "experiments" else None
                what = f"{table} {ident}"
                new = _portable_location(value, root, what, fallback)
                if new != value:
                    db.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (new, rowid))
                    changed += 1
        for table in ("tags", "params", "experiment_tags"):
            for rowid, value in db.execute(f"SELECT rowid, value FROM {table}").fetchall():
                new = _relative_text(value, root) if value else value
                if new != value:
                    db.execute(f"UPDATE {table} SET value = ? WHERE rowid = ?", (new, rowid))
                    changed += 1
        for rowid, source in db.execute("SELECT rowid, dataset_source FROM datasets").fetchall():
            try:
                data = json.loads(source)
            except (TypeError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("uri"), str):
                uri = _relative_text(data["uri"], root)
                if uri != data["uri"]:
                    new = json.dumps({**data, "uri": uri})
                    db.execute("UPDATE datasets SET dataset_source = ? WHERE rowid = ?",
                               (new, rowid))  # fmt: skip
                    changed += 1
        names = {str(root), urllib.parse.quote(str(root))}
        for table, column in _columns(db):
            for name in names:
                (count,) = db.execute(
                    f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{column}" AS TEXT), ?)',
                    (name,),
                ).fetchone()
                if count:
                    raise ExportError(
                        f"the exported MLflow store still names the work dir {root} in "
                        f"{table}.{column} ({count} rows), a field aemnist.export does not "
                        f"rewrite (a newer MLflow's?): add it to aemnist.export._LOCATIONS"
                    )
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.execute("VACUUM")  # the freed pages of deleted rows go: the smallest file
    return changed


def _rewrite_mlmodel(path: Path, root: Path) -> None:
    """An MLmodel file names its own artifact folder (``artifact_path``): as the store now does."""
    prefix = (root / ARTIFACTS).as_uri() + "/"
    text = path.read_text(encoding="utf-8")
    if prefix in text:
        path.write_text(text.replace(prefix, PROXY), encoding="utf-8")


# ---- the report and its record -------------------------------------------------------------


def _record_study_date(layout: Layout, source: Layout) -> None:
    """A run record written before records held the study's date gets the date its report
    names (the day the run wrote it), so that a rebuild anywhere dates it the same."""
    from aemnist.report import read_study_run, save_study_run

    run = read_study_run(layout)
    if run is None or run.date is not None:
        return
    found = _REPORT_DATE.search(source.report.read_text(encoding="utf-8"))
    if found is None:
        return
    key = None
    with contextlib.suppress(OSError, ValueError):
        key = hash_record(source.report_run).read_text().split()[1]
    with producing(key if key and key != "-" else None):
        save_study_run(layout, run.with_date(date.fromisoformat(found.group(1))))


def _write_manifest(folder: Path) -> tuple[int, int]:
    """``export.json``: every file of the export with its size and SHA-256 (what was shipped,
    checkable later). Returns the export's size and file count, the manifest included."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    text = json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True) + "\n"
    (folder / MANIFEST).write_text(text, encoding="utf-8")
    size = sum(entry["bytes"] for entry in files.values()) + len(text.encode())
    return size, len(files) + 1


def export_study(workdir: Path, out: Path, max_mb: float = DEFAULT_MAX_MB) -> Export:
    """Copy the finished study in ``workdir`` to the new folder ``out`` (see the module's
    text) and write its report beside it as ``<out>.md``. Raises ExportError, having written
    nothing, when the work dir holds no finished study, ``out`` exists and is not empty, or
    the export would exceed ``max_mb`` megabytes."""
    from aemnist.config import read_saved_config
    from aemnist.report import report_markdown, stage_public_text

    root = workdir.resolve()
    out = Path(os.path.abspath(out))
    if _under(out, root) is not None or _under(root, out) is not None:
        raise ExportError(f"--out {out} and the work dir {root} overlap: export it elsewhere")
    source = _check_study(root)
    _check_destination(out)
    report_out = out.with_name(out.name + ".md")
    if report_out.is_dir():
        raise ExportError(f"{report_out} is a folder: the export writes its report there")
    max_bytes = int(max_mb * 1e6)
    with _held(root):
        files = _workdir_files(root) + _artifact_files(root)
        _refuse_if_too_big(root, files, max_bytes)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        report_tmp = None
        try:
            for rel in files:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, staging / rel)  # contents only: modes are ours
            for mlmodel in (staging / ARTIFACTS).rglob("MLmodel"):
                _rewrite_mlmodel(mlmodel, root)
            _copy_store(root / STORE, staging / STORE)
            make_store_portable(staging / STORE, root)
            layout = Layout(staging)
            _record_study_date(layout, source)
            config = read_saved_config(layout.config)
            # Rendered from the copied tables, its links relative to <out>.md's folder.
            text = report_markdown(layout, config, report_out, figures_of=Layout(out))
            _open_to_readers(staging)
            size, count = _write_manifest(staging)
            if size > max_bytes:
                raise ExportError(
                    f"the export of {root} takes {_megabytes(size)}, more than --max-mb "
                    f"{max_mb:g}; nothing was written"
                )
            report_tmp = stage_public_text(report_out, text)
            os.replace(staging, out)  # an empty `out` is replaced; a non-empty one refused
            staging = None
            os.replace(report_tmp, report_out)
            report_tmp = None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if report_tmp is not None:
                report_tmp.unlink(missing_ok=True)
    return Export(out, report_out, size, count)


def _open_to_readers(folder: Path) -> None:
    """The export is for others to read (a repository, say), unlike the work dir it comes
    from (owner-only): its folders and files take the user's umask, as new files do."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
