"""End to end: the smoke study through the real CLI, Prefect (its temporary local server) and
an embedded MLflow store, then everything read back through MLflow's client."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_helpers import (
    REPO_ROOT,
    SMOKE_FINAL_MSE_BOUND,
    assert_registered_model_is_the_final_model,
    expected_task_runs,
    grid_names,
    nested_runs,
    run_cli,
)
from mlflow import MlflowClient

from aemnist import caching, plan
from aemnist.config import load_config, read_saved_config
from aemnist.layout import Layout
from aemnist.runtime import cpu_count, cpu_model, with_resolved_device
from aemnist.schemas import file_sha256, read_frame
from aemnist.status import study_status
from aemnist.summaries import flat_table
from aemnist.tracking import (
    EXPERIMENT,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    REGISTERED_MODEL,
    embedded_tracking_uri,
)

# As the run resolves it: runtime.device auto becomes the device it ran on.
SMOKE = with_resolved_device(load_config("smoke"))
# What opens MLflow 3.17's UI on an experiment's runs rather than on its GenAI overview.
ML = "?workflowType=machine_learning"


@pytest.fixture(scope="module")
def smoke_study(smoke_workdir):  # noqa: ANN001, ANN201
    workdir, result = smoke_workdir  # the session's smoke study (conftest)
    client = MlflowClient(embedded_tracking_uri(workdir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs(
        [experiment.experiment_id], filter_string="tags.profile = 'smoke'", max_results=10
    )
    return workdir, result, client, parents


def test_smoke_study_prints_the_report_path_and_how_to_open_the_ui(smoke_study) -> None:
    workdir, result, client, _ = smoke_study
    assert f"Report: {workdir / 'report.md'}" in result.stdout
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs{ML}"
    assert f"aemnist ui --workdir {workdir}   then open {runs}\n" in result.stdout
    # Progress: each stage's fan-out reports as its tasks finish.
    n_grid = len(grid_names())
    assert f"[grid] {n_grid}/{n_grid} tasks finished" in result.stdout + result.stderr
    assert "[sweep] 2/2 tasks finished" in result.stdout + result.stderr


def test_the_temporary_prefect_server_stops_with_the_run_having_logged_no_error(
    smoke_study,
) -> None:
    _, result, _, _ = smoke_study
    output = result.stdout + result.stderr
    api = re.search(r"View at http://127\.0\.0\.1:(\d+)/", output)
    assert api, "the flow run's UI link (on the temporary server) is not in the output"
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", int(api.group(1))), timeout=2).close()
    # Stopped only once idle: a stop mid-write makes its task-run recorder log an error.
    assert "ERROR" not in output


def test_parent_run_holds_the_resolved_config_the_machine_and_links_to_prefect(
    smoke_study,
) -> None:
    _, _, _, parents = smoke_study
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert set(SMOKE.flat()) <= set(parent.data.params)
    assert parent.data.params["grid.learning_rates"] == "[0.01, 0.005]"
    assert parent.data.tags["config_hash"] == SMOKE.config_hash()
    assert re.fullmatch(r"[0-9a-f-]{36}", parent.data.tags["prefect.flow_run_id"])
    assert 0 < parent.data.metrics["final_test_mse"] < SMOKE_FINAL_MSE_BOUND
    # Where its figures came from, as the bench scripts print it (the smoke study: the CPU).
    machine = {k: v for k, v in parent.data.tags.items() if k.startswith("machine.")}
    assert machine == {
        "machine.cpu": f"{cpu_model()} ({platform.machine()}), {cpu_count()} cores",
        "machine.gpu": "none",
        "machine.torch": torch.__version__,
        "machine.python": platform.python_version(),
    }


def test_one_nested_run_per_task_each_finished(smoke_study) -> None:
    _, _, client, parents = smoke_study
    runs = nested_runs(client, parents[0].info.run_id)
    final_names = [name for name in runs if name.startswith("final size=")]
    assert len(final_names) == 1
    assert set(runs) - set(final_names) == expected_task_runs()
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["prefect.flow_run_id"] == parents[0].data.tags["prefect.flow_run_id"]
        assert "prefect.task_run_id" in run.data.tags, name


def test_parallel_grid_runs_keep_their_own_params_and_per_epoch_metrics(smoke_study) -> None:
    workdir, _, client, parents = smoke_study
    runs = nested_runs(client, parents[0].info.run_id)
    for name in grid_names():
        run = runs[name]
        lr, wd, fold = re.fullmatch(r"grid lr=(\S+) wd=(\S+) fold=(\d)", name).groups()
        assert float(run.data.params["lr"]) == float(lr)
        assert float(run.data.params["weight_decay"]) == float(wd)
        assert run.data.params["fold"] == fold
        for metric in ("train_loss", "val_loss"):
            history = client.get_metric_history(run.info.run_id, metric)
            assert [m.step for m in history] == list(range(1, SMOKE.grid.epochs + 1))
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "tables")]
        assert artifacts == [
            f"tables/{Path(Layout(workdir).grid_history(float(lr), float(wd), int(fold))).name}"
        ]
    for size in SMOKE.sweep.sizes:
        history = client.get_metric_history(runs[f"sweep size={size}"].info.run_id, "test_loss")
        assert [m.step for m in history] == list(range(1, SMOKE.sweep.epochs + 1))


def test_final_model_is_registered_and_loads(smoke_study) -> None:
    workdir, _, client, parents = smoke_study
    import mlflow.pytorch
    import torch

    runs = nested_runs(client, parents[0].info.run_id)
    final = next(run for name, run in runs.items() if name.startswith("final size="))
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert [v.run_id for v in versions] == [final.info.run_id]
    # Tagged once its run finished; a smoke model is no champion, and `@latest-smoke` loads it.
    assert versions[0].tags == {
        "profile": "smoke",
        "config_hash": SMOKE.config_hash(),
        "seed": str(SMOKE.seed),
        "dataset": "mnist",
        "test_mse": repr(final.data.metrics["test_mse"]),
    }
    # (A search leaves a version's aliases out: read back one by one.)
    version = client.get_model_version(REGISTERED_MODEL, versions[0].version)
    assert version.aliases == ["latest-smoke"]
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        model = mlflow.pytorch.load_model(f"models:/{REGISTERED_MODEL}@latest-smoke")
    finally:
        mlflow.set_tracking_uri(None)
    with torch.inference_mode():
        out = model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 1, 28, 28)
    assert_registered_model_is_the_final_model(model, workdir, final.data.metrics["test_mse"])
    assert final.data.metrics["test_mse"] == parents[0].data.metrics["final_test_mse"]
    history = client.get_metric_history(final.info.run_id, "test_loss")
    assert [m.step for m in history] == list(range(1, SMOKE.final.epochs + 1))


CONTEXT = "mlflow.data.context"  # the input tag MLflow's log_input gives a dataset's context


def test_every_training_run_logs_the_tables_it_read_by_sha256_with_its_split(
    smoke_study,
) -> None:
    workdir, _, client, parents = smoke_study
    layout = Layout(workdir)
    digest = {
        name: file_sha256(path)[:36]
        for name, path in (
            ("mnist_train", layout.train_table),
            ("mnist_test", layout.test_table),
            ("folds", layout.folds),
        )
    }
    runs = nested_runs(client, parents[0].info.run_id)
    trained = ("grid lr=", "sweep size=", "final size=")
    training = [name for name in runs if name.startswith(trained)]
    assert len(training) == len(grid_names()) + len(SMOKE.sweep.sizes) + 1
    for name in training:
        logged = client.get_run(runs[name].info.run_id).inputs.dataset_inputs
        found = {
            (i.dataset.name, i.dataset.digest): {t.value for t in i.tags if t.key == CONTEXT}
            for i in logged
        }
        fold = re.search(r"fold=(\d)", name)
        if fold:  # trained on the other folds, validated on this one
            split = f"cross-validation fold {fold.group(1)}"
            expected = {("mnist_train", split), ("folds", split)}
        else:  # the smoke profile selects on the test set, as the seed did
            expected = {("mnist_train", "training"), ("mnist_test", "test")}
        assert found == {(table, digest[table]): {split} for table, split in expected}, name


def test_parent_run_previews_tables_1_and_2_as_csv_and_the_report_names_it(smoke_study) -> None:
    workdir, _, client, parents = smoke_study
    parent = parents[0].info.run_id
    experiment = client.get_experiment(parents[0].info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND  # opens on its runs list
    layout = Layout(workdir)
    for artifact, table, schema in (
        ("tables/table1_grid_search.csv", layout.grid_summary, "grid_summary"),
        ("tables/table2_size_sweep.csv", layout.sweep_summary, "sweep_summary"),
    ):
        local = client.download_artifacts(parent, artifact, str(workdir.parent / "csv"))
        stored = flat_table(read_frame(table, schema))  # list cells as "1, 3" text
        previewed = pd.read_csv(local)
        for column in {"dead_repeats", "dead_epochs"} & set(stored.columns):
            # "" reads as NaN, in a float column that takes no text
            previewed[column] = previewed[column].astype(object).fillna("").astype(str)
        pd.testing.assert_frame_equal(previewed, stored, check_dtype=False, check_exact=True)
    report = (workdir / "report.md").read_text()
    assert f"- MLflow run: `{parent}` (experiment {experiment.experiment_id})" in report


def test_the_flow_run_links_to_its_mlflow_parent_run(smoke_study) -> None:
    """The link artifact, read from the database of the run's temporary Prefect server
    (gone with the run; its database stays in the run's Prefect home)."""
    workdir, _, _, parents = smoke_study
    parent = parents[0]
    database = workdir.parent / "prefect-home" / "prefect.db"
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT type, data, description, flow_run_id FROM artifact WHERE key = 'mlflow-run'"
        ).fetchall()
    assert len(rows) == 1
    kind, data, description, flow_run_id = rows[0]
    assert flow_run_id == parent.data.tags["prefect.flow_run_id"]
    experiment, run = parent.info.experiment_id, parent.info.run_id
    page = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run}{ML}"
    # Prefect stores a link artifact as Markdown: the link text, then the URL.
    assert (kind, json.loads(data)) == ("markdown", f"[MLflow run {run}]({page})")
    assert f"`aemnist ui --workdir {workdir}` serves it" in description


def test_report_and_its_figures_exist_and_are_logged(smoke_study) -> None:
    workdir, _, client, parents = smoke_study
    report = (workdir / "report.md").read_text()
    for figure in (
        "fig1a_size_sweep",
        "fig1b_training_curves",
        "fig2_noise",
        "fig3_occlusion",
        "fig4_tsne",
    ):
        path = workdir / "figures" / f"{figure}.png"
        assert path.stat().st_size > 5000, figure
        assert f"figures/{figure}.png" in report
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id, "figures")}
    assert len(logged) == 5
    assert "report.md" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_stage_tables_are_deterministic_for_the_same_seed(smoke_study, tmp_path: Path) -> None:
    """Training one grid fold and one sweep size again, with the config, seed, data, device,
    torch threads and kernels the study used, gives exactly the tables it stored; and the
    stored grid summary is what its histories aggregate to."""
    workdir, _, _, _ = smoke_study
    import pandas as pd
    import torch

    from aemnist import plan
    from aemnist.config import read_saved_config
    from aemnist.data import load_images
    from aemnist.runtime import set_torch_threads
    from aemnist.schemas import read_frame, write_table
    from aemnist.summaries import grid_summary
    from aemnist.training import train_fold, train_size

    layout = Layout(workdir)
    histories = [
        read_frame(p, "grid_history") for p in sorted((workdir / "grid").glob("*.parquet"))
    ]
    again = grid_summary(pd.concat(histories, ignore_index=True))
    stored = read_frame(layout.grid_summary, "grid_summary")
    np.testing.assert_allclose(again["val_loss_mean"], stored["val_loss_mean"])

    # The config as the study saved it (its device resolved), resolved again as every launch
    # resolves it: the torch threads of each grid and sweep task and the training options.
    config = read_saved_config(layout.config)
    study = plan.resolve_study(config, workdir)
    train = load_images(layout.train_table, config.data.train_limit)
    test = load_images(layout.test_table, config.data.test_limit)
    lr, wd, fold = config.grid.learning_rates[-1], config.grid.weight_decays[-1], 1
    size = config.sweep.sizes[-1]
    best = stored.iloc[0]  # the sweep trains with Table 1's best settings
    threads = torch.get_num_threads()
    # CPU sums are split by thread: the same count as the tasks, or the last bits can move.
    set_torch_threads(study.threads)
    try:
        common = {
            "batch_size": config.training.batch_size,
            "seed": config.seed,
            "eval_batch_size": config.training.eval_batch_size,
            "output_bias_at_mean": config.training.output_bias_at_mean,
            "device": config.runtime.device,
            "options": study.options,
        }
        fold_history = train_fold(
            train, read_frame(layout.folds, "folds"), fold, lr=lr, weight_decay=wd,
            size=config.grid.size, epochs=config.grid.epochs, **common,
        )  # fmt: skip
        _, size_history = train_size(
            train, test, size=size, lr=float(best.lr), weight_decay=float(best.weight_decay),
            epochs=config.sweep.epochs, plateau_patience=config.sweep.plateau_patience,
            stage="sweep", selection=config.sweep.selection,
            validation_images=config.sweep.validation_images, **common,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    # Same machine, same inputs: equal to the last bit, as the tables the tasks wrote.
    for frame, schema, path in (
        (fold_history, "grid_history", layout.grid_history(lr, wd, fold)),
        (size_history, "sweep_history", layout.sweep_history(size)),
    ):
        retrained = write_table(frame, tmp_path / path.name, schema)
        pd.testing.assert_frame_equal(
            read_frame(retrained.path, schema), read_frame(path, schema), check_exact=True
        )
        assert Path(retrained.path).read_bytes() == path.read_bytes(), path.name


def test_report_command_rebuilds_the_report_from_stored_tables(smoke_study, tmp_path: Path) -> None:
    workdir, _, _, _ = smoke_study
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("mlartifacts", "mlflow.db"))
    (copy / "report.md").unlink()
    shutil.rmtree(copy / "figures")
    result = run_cli(["report", "--workdir", str(copy)], home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert (copy / "report.md").read_text().split("\n", 8)[8] == (
        workdir / "report.md"
    ).read_text().split("\n", 8)[8]
    assert len(list((copy / "figures").glob("*.png"))) == 5


def test_ui_command_serves_the_study_runs(smoke_study, tmp_path: Path) -> None:
    workdir, _, _, parents = smoke_study
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--workdir", str(workdir), "--port", "0"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Port 0: the UI binds a free port and prints its URL once it answers.
        announced = re.compile(rb"MLflow UI on (http://127\.0\.0\.1:\d+) ")
        url = next(filter(None, map(announced.search, proc.stdout)), None)
        assert url is not None, "the MLflow UI exited without printing its URL"
        base = url.group(1).decode()
        # Then the page of the study's runs, which opens on them (not on a GenAI overview).
        experiment = parents[0].info.experiment_id
        assert proc.stdout.readline().decode().strip() == (
            f"The study's runs: {base}/#/experiments/{experiment}/runs{ML}"
        )
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                url = f"{base}/api/2.0/mlflow/runs/get?run_id={parents[0].info.run_id}"
                with urllib.request.urlopen(url, timeout=5) as response:
                    body = response.read().decode()
                break
            except OSError:
                time.sleep(1)
        assert body is not None, "the MLflow UI did not come up within 90 s"
        assert parents[0].info.run_id in body and "study-smoke" in body
        with urllib.request.urlopen(base + "/", timeout=10) as response:
            assert "<html" in response.read().decode().lower()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        ("[grid]\nlearning_rates = [-0.01]\n", "grid.learning_rates", "positive"),
        ("[sweep]\nsizes = [4, 0]\n", "sweep.sizes", "positive"),
        ("[grid]\nlearning_rate = [0.01]\n", "grid.learning_rate", "unknown config field"),
    ],
)
def test_invalid_config_is_rejected_before_any_work(
    tmp_path: Path, text: str, field: str, says: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    workdir = tmp_path / "work"
    result = run_cli(
        ["run", "--profile", "smoke", "--config", str(config), "--workdir", str(workdir)],
        home=tmp_path / "home",
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"aemnist: error: {field}: ") and says in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_unwritable_workdir_gives_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli(
        ["run", "--profile", "smoke", "--workdir", str(blocker / "work")], home=tmp_path / "home"
    )
    assert result.returncode == 2
    assert f"work dir {blocker / 'work'} is not writable" in result.stderr
    assert "--workdir" in result.stderr


# --- one declaration: the flow and `aemnist status` see the same tasks and keys --------------


def _resolved_smoke(workdir: Path) -> plan.Study:
    """The smoke study as the run resolved it (its saved config, this machine's slots)."""
    return plan.resolve_study(read_saved_config(workdir / "study_config.json"), workdir)


def test_status_sees_every_task_the_flow_ran_under_the_same_key(smoke_study) -> None:
    workdir, _, client, parents = smoke_study
    rows = study_status(_resolved_smoke(workdir))
    ran = nested_runs(client, parents[0].info.run_id)
    keyed = {row.label: row.key for row in rows if row.stage != "download"}
    # Every task the flow ran is one status lists, under the key the flow's task had.
    assert set(ran) - {"download"} == set(keyed)
    assert {name: run.data.tags["aemnist.task_key"] for name, run in ran.items()
            if name != "download"} == keyed  # fmt: skip
    assert all(row.state == "cached" for row in rows if row.stage != "download")


def test_editing_a_module_a_stage_imports_reruns_that_stage_and_what_follows(
    smoke_study, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = smoke_study[0]
    source = caching.module_source
    edited = b"\n# an edit\n"
    monkeypatch.setattr(
        caching,
        "module_source",
        lambda module: source(module) + (edited if module == "aemnist.embedding" else b""),
    )
    caching.code_version.cache_clear()
    try:
        rows = study_status(_resolved_smoke(workdir))
    finally:
        monkeypatch.undo()
        caching.code_version.cache_clear()
    states = {row.label: row.state for row in rows}
    assert states["embedding"] == "pending"
    assert states["report"] == "pending"  # reads the embedding table
    assert all(
        state in ("cached", "done") for label, state in states.items()
        if label not in ("embedding", "report")
    ), states  # fmt: skip
