"""Lineage and the model registry in MLflow (aemnist.tracking), on a real SQLite store in
tmp_path: the tables a training run read as dataset inputs, the experiment's kind, the final
model's version tags and its ``champion`` alias, the parent run's page in the UI, Tables 1
and 2 as CSV; and usage telemetry off unless the user turned it on."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from aemnist import plan
from aemnist.config import load_config
from aemnist.jobs import Compute, SizeJob, TableUse
from aemnist.layout import Layout
from aemnist.model import build_autoencoder
from aemnist.schemas import TableRef, write_table
from aemnist.tracking import (
    CHAMPION,
    EXPERIMENT,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    REGISTERED_MODEL,
    TrackingContext,
    TrackingError,
    embedded_tracking_uri,
    log_to_parent,
    open_store,
    parent_run_page,
    release_model,
    start_study,
    task_run,
)
from aemnist.training import DEFAULT_OPTIONS

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMOKE = load_config("smoke", overrides={"runtime": {"device": "cpu"}})
SHA_TRAIN, SHA_TEST = "a" * 32 + "b" * 32, "c" * 32 + "d" * 32


def _refs(root: Path) -> tuple[TableRef, TableRef]:
    return (
        TableRef(str(root / "data" / "mnist_train.parquet"), SHA_TRAIN, 60000),
        TableRef(str(root / "data" / "mnist_test.parquet"), SHA_TEST, 10000),
    )


def _size_job(root: Path, stage: str, selection: str) -> SizeJob:
    train, test = _refs(root)
    return SizeJob(
        stage, Layout(root), train, test, 3000, 1000, 8, 0, 0.01, 1e-5, 2, 5, selection, 500,
        SMOKE.training, 0, Compute("cpu", 1, DEFAULT_OPTIONS),
    )  # fmt: skip


def _study(workdir: Path, profile: str) -> TrackingContext:
    tags = {"profile": profile, "config_hash": f"hash-{profile}", "seed": "7"}
    return start_study(embedded_tracking_uri(workdir), workdir, f"study-{profile}", {}, tags)


# --- dataset inputs -------------------------------------------------------------------------


def test_training_jobs_name_each_table_they_read_with_the_split_they_take(tmp_path: Path) -> None:
    train, test = _refs(tmp_path)
    folds = TableRef(str(tmp_path / "folds.parquet"), "e" * 64, 3000)
    study = plan.Study(SMOKE, Layout(tmp_path), 2, 1, 2, DEFAULT_OPTIONS)
    upstream = {"download": [{"train": train, "test": test}], "folds": [folds]}
    for job in plan.STAGES["grid"].jobs(study, upstream):
        context = f"cross-validation fold {job.fold}"
        assert job.inputs() == [
            TableUse(train, "mnist", context, SMOKE.data.train_limit),
            TableUse(folds, "folds", context),
        ]
    assert [u.name for u in plan.STAGES["grid"].jobs(study, upstream)[0].inputs()] == [
        "mnist_train",
        "folds",
    ]
    # The seed's selection: the test set scores every epoch of the sweep.
    splits = {(u.name, u.context) for u in _size_job(tmp_path, "sweep", "test").inputs()}
    assert splits == {("mnist_train", "training"), ("mnist_test", "test")}
    # Selected on held-out training images, the sweep never reads the test set; the final
    # model still gives its number on it.
    held_out = "training (500 held out for validation)"
    sweep = _size_job(tmp_path, "sweep", "validation").inputs()
    assert [(u.name, u.context) for u in sweep] == [("mnist_train", held_out)]
    final = _size_job(tmp_path, "final", "validation").inputs()
    assert [(u.name, u.context, u.limit) for u in final] == [
        ("mnist_train", held_out, 3000),
        ("mnist_test", "test", 1000),
    ]


def test_a_runs_dataset_inputs_carry_each_tables_sha256_schema_source_and_split(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "work"
    folds = write_table(
        pd.DataFrame({"idx": [0, 1, 2], "fold": [0, 1, 2]}), workdir / "folds.parquet", "folds"
    )
    train, _ = _refs(workdir)
    ctx = _study(workdir, "smoke")
    uses = [
        TableUse(train, "mnist", "cross-validation fold 1", 3000),
        TableUse(folds, "folds", "cross-validation fold 1"),
    ]
    with task_run(ctx, "grid fold 1") as run:
        run.log_inputs(uses)
    client = MlflowClient(ctx.tracking_uri)
    logged = client.get_run(run.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in logged}
    assert set(by_name) == {"mnist_train", "folds"}
    for use in uses:
        found = by_name[use.name]
        # MLflow keeps 36 characters of a digest: the SHA-256's first 36; all 64 in the profile.
        assert found.dataset.digest == use.table.sha256[:36]
        profile = json.loads(found.dataset.profile)
        assert profile["sha256"] == use.table.sha256
        assert profile["rows"] == use.table.rows
        assert json.loads(found.dataset.source) == {"uri": str(Path(use.table.path).resolve())}
        assert found.dataset.source_type == "local"
        assert {(t.key, t.value) for t in found.tags} == {
            ("mlflow.data.context", "cross-validation fold 1")
        }
    assert json.loads(by_name["mnist_train"].dataset.profile)["rows_read"] == 3000
    columns = json.loads(by_name["mnist_train"].dataset.schema)["mlflow_colspec"]
    assert [(c["name"], c["type"]) for c in columns] == [
        ("idx", "integer"),
        ("label", "integer"),
        ("pixels", "array"),
    ]
    assert columns[2]["items"] == {"type": "integer"}


# --- the experiment -------------------------------------------------------------------------


def test_the_experiment_opens_on_its_runs_list_new_or_created_before(tmp_path: Path) -> None:
    uri = embedded_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    experiment_id = open_store(uri, tmp_path)
    tags = client.get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

    # An experiment of an earlier version (no kind), or one whose kind the UI inferred, is
    # marked; a kind its user chose is kept. (Each case renames the one before out of the way.)
    for case, (before, after) in enumerate(
        [
            (None, EXPERIMENT_KIND),
            ("genai_development_inferred", EXPERIMENT_KIND),
            ("finetuning", "finetuning"),
        ]
    ):
        client.rename_experiment(experiment_id, f"{EXPERIMENT}-{case}")
        experiment_id = client.create_experiment(
            EXPERIMENT, tags={EXPERIMENT_KIND_TAG: before} if before else None
        )
        assert open_store(uri, tmp_path) == experiment_id
        assert client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG) == after


# --- the registered model: version tags, the champion ---------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """A store holding one paper-profile final model, registered as the final task does
    (TaskRun.log_pytorch_model, then release_model once its run has finished)."""
    workdir = tmp_path_factory.mktemp("registry") / "work"
    ctx = _study(workdir, "paper")
    model = build_autoencoder(2, seed=3).eval()
    example = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    with task_run(ctx, "final size=2") as run:
        run.log_metrics({"test_mse": 0.0123})
        version = run.log_pytorch_model(model, example)
    took = release_model(ctx, version)
    yield workdir, {"ctx": ctx, "model": model, "version": version, "run": run.run_id, "took": took}


def _load(uri: str, model_uri: str) -> torch.nn.Module:
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pytorch.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)


def _register_again(ctx: TrackingContext, profile_ctx: TrackingContext, status: str) -> str:
    """Another version of the registered model (the same files) from a new run of the study
    ``profile_ctx``: ended ``status``, with a test MSE logged. Returns its version."""
    client = MlflowClient(ctx.tracking_uri)
    files = client.get_model_version_download_uri(REGISTERED_MODEL, "1")
    with task_run(profile_ctx, "final size=2") as run:
        run.log_metrics({"test_mse": 0.02})
        version = client.create_model_version(REGISTERED_MODEL, files, run.run_id)
    if status != "FINISHED":
        client.set_terminated(run.run_id, status)
    return version.version


def test_a_finished_paper_model_is_tagged_and_loads_as_the_champion(registry) -> None:
    workdir, made = registry
    uri = embedded_tracking_uri(workdir)
    client = MlflowClient(uri)
    version = client.get_model_version(REGISTERED_MODEL, made["version"])
    assert made["took"] == ["latest-paper", CHAMPION]
    assert sorted(version.aliases) == sorted(made["took"])
    assert version.run_id == made["run"]
    assert version.tags == {
        "profile": "paper",
        "config_hash": "hash-paper",
        "seed": "7",
        "dataset": "mnist",  # the parent run's tag: whose images the model was trained on
        "test_mse": "0.0123",
    }
    loaded = _load(uri, f"models:/{REGISTERED_MODEL}@{CHAMPION}")
    for name, tensor in made["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[name].cpu(), tensor), name


def test_champion_moves_only_to_a_newer_finished_paper_model(registry) -> None:
    workdir, made = registry
    ctx: TrackingContext = made["ctx"]
    client = MlflowClient(ctx.tracking_uri)

    def champion() -> str:
        return client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version

    first = champion()
    # A smoke-profile model is tagged and is the newest version, but no champion.
    smoke = _study(workdir, "smoke")
    newest = _register_again(ctx, smoke, "FINISHED")
    assert release_model(smoke, newest) == ["latest-smoke"]
    assert client.get_model_version(REGISTERED_MODEL, newest).tags["profile"] == "smoke"
    assert champion() == first
    # A version whose run did not finish is refused, with one line, and tagged nothing.
    broken = _register_again(ctx, ctx, "FAILED")
    with pytest.raises(TrackingError, match=f"version {broken} .* is FAILED") as raised:
        release_model(ctx, broken)
    assert "\n" not in str(raised.value)
    assert client.get_model_version(REGISTERED_MODEL, broken).tags == {}
    assert champion() == first
    # Two paper models: the newer one takes the champion, and keeps it from the older one
    # that finishes after it.
    older = _register_again(ctx, ctx, "FINISHED")
    newer = _register_again(ctx, ctx, "FINISHED")
    assert release_model(ctx, newer) == ["latest-paper", CHAMPION]
    assert release_model(ctx, older) == []
    assert champion() == newer
    assert client.get_model_version(REGISTERED_MODEL, first).aliases == []
    latest = client.get_model_version_by_alias(REGISTERED_MODEL, "latest-paper")
    assert latest.version == newer
    smoke_latest = client.get_model_version_by_alias(REGISTERED_MODEL, "latest-smoke")
    assert smoke_latest.version == newest
    # MLflow reserves the alias `latest` and resolves it to the newest version, of any profile.
    assert client.get_model_version_by_alias(REGISTERED_MODEL, "latest").version == newer


# --- the parent run: its page in the UI, Tables 1 and 2 -------------------------------------


def test_the_parent_runs_page_is_the_ui_of_its_store_without_credentials(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    ctx = TrackingContext(embedded_tracking_uri(workdir), "3", "abc123")
    page, how = parent_run_page(ctx, workdir)
    # The query opens MLflow 3.17's UI on runs, not on its GenAI overview.
    assert page == "http://127.0.0.1:5000/#/experiments/3/runs/abc123?workflowType=machine_learning"
    assert f"`aemnist ui --workdir {workdir.resolve()}`" in how

    served = dataclasses.replace(ctx, tracking_uri="https://alice:s3cret@mlflow.example.org:8443/")
    page, how = parent_run_page(served, workdir)
    assert page == (
        "https://mlflow.example.org:8443/#/experiments/3/runs/abc123?workflowType=machine_learning"
    )
    assert "mlflow.example.org:8443" in how
    assert "s3cret" not in page + how and "alice" not in page + how

    other = dataclasses.replace(ctx, tracking_uri="postgresql://bob:pw@db.example.org/mlflow")
    page, how = parent_run_page(other, workdir)
    assert page.startswith("http://127.0.0.1:5000/#/experiments/3/runs/abc123?")
    assert "postgresql://db.example.org/mlflow" in how and "pw" not in how


def test_tables_logged_on_the_parent_as_csv_read_back_as_the_tables(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    ctx = _study(workdir, "smoke")
    table = pd.DataFrame(
        {"rank": [1, 2], "size": [8, 4], "test_loss": [0.0215, 0.03125],
         "val_loss": [float("nan"), float("nan")]}
    )  # fmt: skip
    log_to_parent(ctx, tables={"tables/table2_size_sweep.csv": table})
    client = MlflowClient(ctx.tracking_uri)
    listed = [a.path for a in client.list_artifacts(ctx.parent_run_id, "tables")]
    assert listed == ["tables/table2_size_sweep.csv"]
    local = client.download_artifacts(ctx.parent_run_id, listed[0], str(tmp_path))
    pd.testing.assert_frame_equal(pd.read_csv(local), table, check_exact=True)


# --- usage telemetry ------------------------------------------------------------------------

TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def test_commands_turn_usage_telemetry_off_unless_the_user_turned_it_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every `aemnist` command sets the switches its own process and every process it starts
    (servers, workers, flow runs) inherit; a value the user set is kept."""
    from flows.cli import main

    for key in TELEMETRY_OFF:
        monkeypatch.setenv(key, "")  # recorded, so that the test leaves the environment as it was
        monkeypatch.delenv(key)
    assert main(["config", "--profile", "smoke"]) == 0
    assert {key: os.environ.get(key) for key in TELEMETRY_OFF} == TELEMETRY_OFF
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    assert main(["config", "--profile", "smoke"]) == 0
    assert (os.environ["DO_NOT_TRACK"], os.environ["MLFLOW_DISABLE_TELEMETRY"]) == ("0", "false")
    capsys.readouterr()
