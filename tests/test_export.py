"""A finished study shipped as a browsable run (`aemnist export`): the exported folder holds
what a reader needs and nothing a run keeps for itself, its MLflow store works wherever the
folder lands (`aemnist ui`, through HTTP), and its report rebuilds byte for byte.

The checks run on a smoke study exported here, and on every exported run committed under
results/ (the paper run, once it is committed: results/paper/ and results/paper.md)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import REPO_ROOT, cli_env, run_cli

from aemnist.config import read_saved_config
from aemnist.export import ExportError, export_study
from aemnist.jobs import grid_label, size_label
from aemnist.workdir import lock_workdir

pytestmark = pytest.mark.e2e

MAX_BYTES = 25_000_000
# What never ships: checkpoints and pickles (by suffix), and the folders and files a run
# keeps for itself (MNIST tables, checkpoints, Prefect's results, server state, locks).
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"}
PRIVATE_FOLDERS = {"data", "checkpoints", "cache", "server"}
PRIVATE_NAMES = {"credentials.env", ".aemnist.lock", "mlflow.db-wal", "mlflow.db-shm"}
# The MLflow store's columns that hold a location MLflow resolves.
LOCATIONS = (
    ("runs", "artifact_uri"),
    ("experiments", "artifact_location"),
    ("model_versions", "storage_location"),
    ("logged_models", "artifact_location"),
)
COMMITTED = sorted(p.parent for p in (REPO_ROOT / "results").glob("*/export.json"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smoke(
    tmp_path_factory: pytest.TempPathFactory, smoke_workdir: tuple[Path, object]
) -> dict[str, Path]:
    """The session's smoke study (conftest), exported with the command line to
    results/smoke; the export only reads the work dir (the store's hash is checked)."""
    root = tmp_path_factory.mktemp("ship")
    workdir, _ = smoke_workdir
    store = _sha256(workdir / "mlflow.db")
    out = root / "results" / "smoke"
    exported = run_cli(["export", "--workdir", str(workdir), "--out", str(out)], root / "home")
    assert exported.returncode == 0, exported.stderr
    assert f"Exported {workdir} to {out}: " in exported.stdout
    assert f"Report: {out}.md" in exported.stdout
    # The work dir's store is read, never written.
    assert _sha256(workdir / "mlflow.db") == store
    return {"workdir": workdir, "export": out, "root": root}


@pytest.fixture(params=["smoke", *(str(p.relative_to(REPO_ROOT)) for p in COMMITTED)])
def shipped(request: pytest.FixtureRequest) -> Path:
    """An exported run: the smoke study's, then each one committed under results/."""
    if request.param == "smoke":
        return request.getfixturevalue("smoke")["export"]
    return REPO_ROOT / request.param


def test_a_committed_run_is_checked_when_there_is_one() -> None:
    """Says, as a skip, when results/ holds no exported run (the paper run's, once it is
    committed): the checks below then run on the smoke export only."""
    if not COMMITTED:
        pytest.skip("no exported run under results/ yet (results/paper/ comes with the paper run)")
    for folder in COMMITTED:
        assert folder.with_name(folder.name + ".md").is_file(), f"{folder}.md is missing"


def test_the_export_holds_no_checkpoint_pickle_credential_or_server_file(shipped: Path) -> None:
    files = [p for p in shipped.rglob("*") if p.is_file() or p.is_symlink()]
    for path in files:
        rel = path.relative_to(shipped)
        assert not path.is_symlink(), rel
        assert path.suffix.lower() not in PICKLE_SUFFIXES, rel
        assert not PRIVATE_FOLDERS & set(rel.parts[:1]), rel
        assert path.name not in PRIVATE_NAMES and not path.name.endswith(".tmp"), rel
    assert sum(p.stat().st_size for p in files) < MAX_BYTES
    # The manifest names every file with its SHA-256: nothing was added, lost or changed.
    manifest = json.loads((shipped / "export.json").read_text())["files"]
    listed = {p.relative_to(shipped).as_posix() for p in files} - {"export.json"}
    assert set(manifest) == listed
    for rel, entry in manifest.items():
        assert _sha256(shipped / rel) == entry["sha256"], rel
    # What a reader needs: the config, Table 1 and 2's tables, the report and its figures.
    assert {"study_config.json", "mlflow.db"} <= set(manifest)
    for rel in ("grid_summary.parquet", "sweep_summary.parquet", "final/history.parquet",
                "report.md", "report_run.json", "figures/fig4_tsne.png"):  # fmt: skip
        record = Path(rel).with_name(f".{Path(rel).name}.sha256").as_posix()
        assert rel in manifest and record in manifest, rel
        assert (shipped / record).read_text().split()[0] == manifest[rel]["sha256"], rel


def test_the_store_names_no_local_path(shipped: Path) -> None:
    """Every location MLflow resolves is proxied (served from the folder's own mlartifacts
    wherever it lands), and no value anywhere keeps an absolute path of the work dir."""
    with contextlib.closing(
        sqlite3.connect(f"file:{shipped / 'mlflow.db'}?mode=ro", uri=True)
    ) as db:
        for table, column in LOCATIONS:
            for (value,) in db.execute(f"SELECT {column} FROM {table}"):
                assert value.startswith("mlflow-artifacts:/"), (table, column, value)
        (workdir,) = db.execute("SELECT value FROM tags WHERE key = 'workdir'").fetchone()
        assert workdir == "."
        for (source,) in db.execute("SELECT dataset_source FROM datasets"):
            assert not json.loads(source)["uri"].startswith("/"), source


@contextlib.contextmanager
def _ui(workdir: Path, home: Path) -> Iterator[str]:
    """`aemnist ui --workdir WORKDIR --port 0`: its URL once it answers; stopped afterwards."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--workdir", str(workdir), "--port", "0"],
        cwd=REPO_ROOT,
        env=cli_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        announced = re.compile(rb"MLflow UI on (http://127\.0\.0\.1:\d+) ")
        found = next(filter(None, map(announced.search, proc.stdout)), None)
        assert found is not None, "the MLflow UI exited without printing its URL"
        yield found.group(1).decode()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _get(base: str, route: str, **query: str) -> bytes:
    url = f"{base}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.read()
        except urllib.error.HTTPError:
            raise
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _post(base: str, route: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{route}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_ui_serves_a_moved_export_with_runs_metrics_and_artifacts(
    shipped: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "elsewhere" / shipped.name
    shutil.copytree(shipped, moved)
    store = _sha256(moved / "mlflow.db")
    record = json.loads((moved / "report_run.json").read_text())
    parent_id, experiment = record["run_id"], record["experiment_id"]
    config = read_saved_config(moved / "study_config.json")
    with _ui(moved, tmp_path / "home") as base:
        parent = json.loads(_get(base, "/api/2.0/mlflow/runs/get", run_id=parent_id))["run"]
        params = {p["key"]: p["value"] for p in parent["data"]["params"]}
        assert set(config.flat()) <= set(params)
        assert params["seed"] == str(config.seed)
        children = _post(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment], "max_results": 1000,
            "filter": f"tags.mlflow.parentRunId = '{parent_id}'",
        })["runs"]  # fmt: skip
        by_name = {run["info"]["run_name"]: run["info"]["run_id"] for run in children}
        g, s = config.grid, config.sweep
        grid = [grid_label(lr, wd, fold) for lr in g.learning_rates for wd in g.weight_decays
                for fold in range(g.folds)]  # fmt: skip
        sweep = [size_label("sweep", size) for size in s.sizes]
        assert set(grid + sweep) <= set(by_name)
        # Per-epoch metrics (step = epoch) of a grid fold and a sweep size.
        for name, metric, epochs in ((grid[-1], "val_loss", g.epochs),
                                     (sweep[-1], "train_loss", s.epochs)):  # fmt: skip
            got = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=by_name[name],
                       metric_key=metric)  # fmt: skip
            history = json.loads(got)["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, epochs + 1)), name
        # Artifacts, listed and downloaded from the moved folder: the parent's report and
        # the registered model's files.
        listed = json.loads(_get(base, "/api/2.0/mlflow/artifacts/list", run_id=parent_id))
        assert "report.md" in {f["path"] for f in listed["files"]}
        report = _get(base, "/get-artifact", run_id=parent_id, path="report.md")
        assert report == (moved / "report.md").read_bytes()
        versions = json.loads(_get(base, "/api/2.0/mlflow/model-versions/search"))
        model_id = versions["model_versions"][0]["source"].removeprefix("models:/")
        mlmodel = _get(
            base,
            f"/ajax-api/2.0/mlflow/logged-models/{model_id}/artifacts/files",
            artifact_file_path="MLmodel",
        )
        assert f"model_id: {model_id}" in mlmodel.decode()
    # Browsing writes nothing into the shipped database (a committed file stays clean).
    assert _sha256(moved / "mlflow.db") == store


def test_the_report_rebuilds_byte_for_byte_dated_as_recorded(shipped: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy" / shipped.name
    shutil.copytree(shipped, copy)
    beside = copy.with_name(copy.name + ".md")
    result = run_cli(["report", "--workdir", str(copy), "--out", str(beside)], tmp_path / "home")
    assert result.returncode == 0, result.stderr
    expected = shipped.with_name(shipped.name + ".md").read_bytes()
    assert beside.read_bytes() == expected
    assert f"![Figure 4]({shipped.name}/figures/fig4_tsne.png)" in expected.decode()
    # The date is the recorded one, whatever today is: a record dated otherwise gives that
    # date, and nothing else changes.
    record = json.loads((copy / "report_run.json").read_text())
    assert f"\n- date: {record['date']}\n" in expected.decode()
    (copy / "report_run.json").write_text(json.dumps({**record, "date": "2001-02-03"}))
    result = run_cli(["report", "--workdir", str(copy), "--out", str(beside)], tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert beside.read_text() == expected.decode().replace(
        f"- date: {record['date']}", "- date: 2001-02-03"
    )


# --- what the export refuses -----------------------------------------------------------------


def _nothing_written(parent: Path, name: str) -> None:
    """Neither the folder ``name`` nor its report nor a temporary folder of either."""
    left = [p.name for p in parent.glob(f"*{name}*")] if parent.exists() else []
    assert left == [], left


def test_an_export_over_the_size_cap_writes_nothing_and_names_the_biggest_files(
    smoke: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "results" / "big"
    result = run_cli(
        ["export", "--workdir", str(smoke["workdir"]), "--out", str(out), "--max-mb", "0.5"],
        tmp_path / "home",
    )
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "more than --max-mb 0.5" in line and "mlflow.db (" in line
    _nothing_written(out.parent, "big")


def test_an_export_into_a_folder_that_is_not_empty_is_refused(
    smoke: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_study(smoke["workdir"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "taken.md").exists()
    # An empty folder is taken.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_study(smoke["workdir"], empty).folder == empty
    assert (empty / "mlflow.db").is_file() and (tmp_path / "empty.md").is_file()


def test_a_work_dir_a_study_runs_in_or_without_a_finished_study_is_refused(
    smoke: dict[str, Path], tmp_path: Path
) -> None:
    lock = lock_workdir(smoke["workdir"])
    try:
        with pytest.raises(ExportError, match="in use"):
            export_study(smoke["workdir"], tmp_path / "busy")
    finally:
        lock.release()
    _nothing_written(tmp_path, "busy")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "study_config.json").write_text("{}")
    with pytest.raises(ExportError, match=r"no finished study .*report\.md"):
        export_study(unfinished, tmp_path / "out")
    _nothing_written(tmp_path, "out")


def test_a_failed_export_leaves_no_half_export(smoke: dict[str, Path], tmp_path: Path) -> None:
    """A store that fails mid-export (a damaged database, found after the files were
    copied) leaves neither the folder nor its temporary one; the error names the file."""
    damaged = tmp_path / "damaged"
    shutil.copytree(smoke["workdir"], damaged, ignore=shutil.ignore_patterns("data"))
    (damaged / "mlflow.db").write_bytes(b"not a database" * 100)
    with pytest.raises(ExportError, match=re.escape(str(damaged / "mlflow.db"))):
        export_study(damaged, tmp_path / "results" / "half")
    assert list((tmp_path / "results").iterdir()) == []
