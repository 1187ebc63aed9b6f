"""The grid and the sweep trained stacked (``runtime.stacked_cells``), end to end through the
CLI, Prefect and MLflow: one task a group of cells, one MLflow run, table and history a cell,
a failed group resumed from its checkpoint, the other groups reused.

The smoke grid with two seeds and two epochs: 4 cells a fold, 2 a group, 6 group tasks; the
smoke sweep's two sizes in one group."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_helpers import nested_runs, run_cli, smoke_parents, smoke_run
from mlflow import MlflowClient

from aemnist import plan
from aemnist.config import load_config
from aemnist.layout import Layout
from aemnist.schemas import read_frame
from aemnist.tracking import embedded_tracking_uri
from aemnist.training import load_training_state

STACKED = "[grid]\nrepeats = 2\nepochs = 2\n\n[runtime]\nstacked_cells = 2\n"
CONFIG = load_config("smoke", overrides={"grid": {"repeats": 2, "epochs": 2},
                                         "runtime": {"stacked_cells": 2}})  # fmt: skip
CELLS = [plan.grid_label(*cell) for cell in plan.grid_cells(CONFIG)]
# The fault hits both seeds of lr 0.005 on fold 1, which make up fold 1's second group.
FAILING = "grid fold=1 stack 2/2"
FAILING_CELLS = ["grid lr=0.005 wd=1e-05 fold=1", "grid lr=0.005 wd=1e-05 fold=1 repeat=1"]


class Study:
    def __init__(self, root: Path, mirror: Path) -> None:
        self.workdir = root / "study"
        self.home = root / "prefect-home"
        self.config = root / "stacked.toml"
        self.config.write_text(STACKED)
        self.mirror = mirror
        self.first = run_cli(
            smoke_run(self.workdir, mirror, "--config", str(self.config)),
            self.home,
            env={"AEMNIST_FAULT": "grid:lr=0.005,weight_decay=1e-05,fold=1,epoch=1"},
        )

    def client(self) -> MlflowClient:
        return MlflowClient(embedded_tracking_uri(self.workdir))

    def runs(self, parent: int) -> dict:
        return nested_runs(self.client(), smoke_parents(self.client())[parent].info.run_id)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Study:
    return Study(tmp_path_factory.mktemp("stacked"), mnist_mirror)


def test_the_grid_runs_one_task_a_group_and_the_failed_group_fails_the_flow(study: Study) -> None:
    assert study.first.returncode == 1, study.first.stderr[-3000:]
    assert f"grid: 1 of 6 tasks failed: {FAILING}" in study.first.stderr
    assert plan.STAGES["grid"].labels(CONFIG) == [
        f"grid fold={fold} stack {part}/2" for fold in range(3) for part in (1, 2)
    ]


def test_each_cell_has_its_own_mlflow_run_and_table_the_failed_groups_both_failed(
    study: Study,
) -> None:
    runs = study.runs(0)
    assert set(CELLS) <= set(runs)
    layout = Layout(study.workdir.resolve())
    for label in CELLS:
        run = runs[label]
        if label in FAILING_CELLS:
            assert run.info.status == "FAILED"
            assert "AEMNIST_FAULT" in run.data.tags["error"]
            continue
        assert run.info.status == "FINISHED", label
        assert run.data.params["stacked_with"] == "2"
        assert re.fullmatch(r"grid fold=\d stack [12]/2", run.data.params["stack"])
        assert run.data.tags["aemnist.dead_epochs"] == "0"
        steps = study.client().get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in steps] == [1, 2]
        # Its own history table, as separate training writes it, logged to its own run.
        cell = next(c for c in plan.grid_cells(CONFIG) if plan.grid_label(*c) == label)
        table = read_frame(layout.grid_history(cell[0], cell[1], cell[2], cell[3]), "grid_history")
        assert list(table["epoch"]) == [1, 2]
        assert table["val_loss"].iloc[-1] == pytest.approx(steps[-1].value, rel=1e-12)
        artifacts = [a.path for a in study.client().list_artifacts(run.info.run_id, "tables")]
        assert len(artifacts) == 1
    # The group stopped after its epoch 1 was checkpointed: both cells' epoch, one file.
    checkpoint = layout.checkpoint(FAILING)
    state = load_training_state(checkpoint)
    assert state is not None and len(state["history"]) == 1 and len(state["models"]) == 2


def test_status_shows_the_failed_group_resumable_and_the_rerun_trains_only_it(
    study: Study,
) -> None:
    status = run_cli(
        ["status", "--profile", "smoke", "--config", str(study.config), "--workdir",
         str(study.workdir)], study.home,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr[-3000:]
    assert re.search(rf"{FAILING}\s+partial\s+resumes after epoch 1/2", status.stdout)
    assert len(re.findall(r"grid fold=\d stack [12]/2\s+cached", status.stdout)) == 5

    rerun = run_cli(smoke_run(study.workdir, study.mirror, "--config", str(study.config)),
                    study.home)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    output = study.rerun_output = rerun.stdout + rerun.stderr
    for label in FAILING_CELLS:
        assert f"{label} epoch 1/2 restored from checkpoint" in output
        assert f"{label} epoch 2/2 trained" in output
    assert "[grid] 5/6 results reused from earlier runs" in output
    runs = study.runs(-1)
    assert sorted(n for n, r in runs.items() if r.data.tags.get("stage") == "grid") == sorted(
        FAILING_CELLS
    )
    # The ten reused cells are linked, each to the run that trained it.
    parent = smoke_parents(study.client())[-1]
    first = study.runs(0)
    links = {k: v for k, v in parent.data.tags.items() if k.startswith("reused.grid ")}
    reused = set(CELLS) - set(FAILING_CELLS)
    assert sorted(links.values()) == sorted(first[label].info.run_id for label in reused)
    # The resumed cells' runs hold both epochs, the restored one included.
    for label in FAILING_CELLS:
        steps = study.client().get_metric_history(runs[label].info.run_id, "val_loss")
        assert [m.step for m in steps] == [1, 2]
    assert not Layout(study.workdir.resolve()).checkpoint(FAILING).exists()
    summary = read_frame(study.workdir / "grid_summary.parquet", "grid_summary")
    assert list(summary["repeats"]) == [2, 2] and list(summary["n_folds"]) == [3, 3]


def test_the_sweep_trains_its_sizes_in_one_task_each_its_own_run_table_and_schedule(
    study: Study,
) -> None:
    # Ran by the re-run above (the first run stopped at the grid).
    assert plan.STAGES["sweep"].labels(CONFIG) == ["sweep stack 1/1"]
    assert "Task run 'sweep stack 1/1' - Finished in state Completed()" in study.rerun_output
    runs = study.runs(-1)
    sweep = {name: run for name, run in runs.items() if run.data.tags.get("stage") == "sweep"}
    assert sorted(sweep) == ["sweep size=4", "sweep size=8"]
    layout = Layout(study.workdir.resolve())
    for name, run in sweep.items():
        assert run.info.status == "FINISHED", name
        assert run.data.params["stacked_with"] == "2"
        assert run.data.params["stack"] == "sweep stack 1/1"
        assert run.data.params["size"] == name.split("=")[1]
        scored = study.client().get_metric_history(run.info.run_id, "test_loss")
        lrs = study.client().get_metric_history(run.info.run_id, "lr")
        assert [m.step for m in scored] == [1, 2] and [m.step for m in lrs] == [1, 2]
        table = read_frame(layout.sweep_history(int(run.data.params["size"]), 0), "sweep_history")
        assert list(table["epoch"]) == [1, 2]
        assert table["test_loss"].iloc[-1] == pytest.approx(scored[-1].value, rel=1e-12)
        assert list(table["lr"]) == pytest.approx([m.value for m in lrs], rel=1e-12)
        artifacts = [a.path for a in study.client().list_artifacts(run.info.run_id, "tables")]
        assert len(artifacts) == 1
    # The two sizes were trained, not one twice; Table 2 ranks both.
    losses = {read_frame(layout.sweep_history(size, 0), "sweep_history")["test_loss"].iloc[-1]
              for size in (4, 8)}  # fmt: skip
    assert len(losses) == 2
    summary = read_frame(study.workdir / "sweep_summary.parquet", "sweep_summary")
    assert sorted(summary["size"]) == [4, 8]
    assert not layout.checkpoint("sweep stack 1/1").exists()
