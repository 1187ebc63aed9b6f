"""Resumability at the library level: cache keys, checkpoints, the tracking store under
concurrent writers, and the bookkeeping of killed runs."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from aemnist import plan
from aemnist.caching import stage_key
from aemnist.config import load_config
from aemnist.layout import Layout
from aemnist.model import build_autoencoder
from aemnist.schemas import TableRef, output_state, producing, write_table
from aemnist.tracking import (
    TrackingContext,
    embedded_tracking_uri,
    mark_abandoned_runs,
    start_study,
    task_run,
)
from aemnist.training import fit

TRAIN = TableRef("/somewhere/mnist_train.parquet", "a" * 64, 60000)
TEST = TableRef("/somewhere/mnist_test.parquet", "b" * 64, 10000)
FOLDS = TableRef("/somewhere/folds.parquet", "c" * 64, 60000)


def keys(config_overrides: dict) -> dict[str, str]:
    config = load_config("smoke", overrides=config_overrides)
    layout = Layout(Path("/work/dir"))
    (label, lr, wd, fold) = plan.grid_labels(config)[0]
    return {
        "folds": stage_key("folds", plan.folds_inputs(config, layout, TRAIN)),
        "grid": stage_key("grid", plan.grid_inputs(config, layout, TRAIN, FOLDS, lr, wd, fold)),
        "sweep": stage_key("sweep", plan.sweep_inputs(config, layout, TRAIN, TEST, 4, lr, wd)),
        "final": stage_key("final", plan.final_inputs(config, layout, TRAIN, TEST, 4, lr, wd)),
    }


def test_changing_sweep_epochs_changes_only_the_sweep_key() -> None:
    before = keys({})
    after = keys({"sweep": {"epochs": 7}})
    assert after["folds"] == before["folds"]
    assert after["grid"] == before["grid"]
    assert after["sweep"] != before["sweep"]
    assert after["final"] == before["final"]  # the final stage has its own epochs


def test_changing_the_seed_changes_every_key() -> None:
    before, after = keys({}), keys({"seed": 1})
    assert all(after[stage] != before[stage] for stage in before)


def test_key_follows_table_content_not_its_path_or_producer() -> None:
    config = load_config("smoke")
    layout = Layout(Path("/work/dir"))
    moved = TableRef("/elsewhere/train.parquet", TRAIN.sha256, -1, run_id="abc")
    changed = TableRef(TRAIN.path, "d" * 64, TRAIN.rows)
    key = stage_key("folds", plan.folds_inputs(config, layout, TRAIN))
    assert stage_key("folds", plan.folds_inputs(config, layout, moved)) == key
    assert stage_key("folds", plan.folds_inputs(config, layout, changed)) != key


def test_refresh_takes_a_stage_and_everything_that_follows_from_it() -> None:
    assert plan.refreshed_stages(False, ["sweep-summary"]) == {
        "sweep-summary",
        "final",
        "corruption",
        "embedding",
        "report",
    }
    assert plan.refreshed_stages(False, ["corruption"]) == {"corruption", "report"}
    assert plan.refreshed_stages(True, None) == set(plan.STAGES)
    assert plan.refreshed_stages(False, None) == set()
    with pytest.raises(ValueError, match="unknown stage 'gird'"):
        plan.refreshed_stages(False, ["gird"])


def test_output_state_tells_intact_damaged_stale_and_missing(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "folds.parquet"
    assert output_state(path) == "missing"
    with producing("folds-key-1"):
        write_table(pd.DataFrame({"idx": [0, 1], "fold": [0, 1]}), path, "folds")
    assert output_state(path, "folds-key-1") == "intact"
    assert output_state(path, "folds-key-2") == "stale"
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    assert output_state(path, "folds-key-1") == "damaged"


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(600, 1, 28, 28, generator=generator), torch.rand(
        200, 1, 28, 28, generator=generator
    )


class Killed(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_numbers(images, tmp_path: Path) -> None:
    train, evaluation = images
    settings = dict(lr=1e-2, weight_decay=1e-5, epochs=4, batch_size=64, seed=3, plateau_patience=1)
    whole = build_autoencoder(6, 3)
    expected = fit(whole, train, evaluation, **settings)

    checkpoint = tmp_path / "task.pt"

    def die_after_epoch_2(result) -> None:  # the checkpoint of epoch 2 is written first
        if result.epoch == 2 and not result.resumed:
            raise Killed

    with pytest.raises(Killed):
        fit(
            build_autoencoder(6, 3),
            train,
            evaluation,
            **settings,
            checkpoint=checkpoint,
            resume_key="k",
            on_epoch=die_after_epoch_2,
        )
    assert torch.load(checkpoint, weights_only=True)["history"][-1][0] == 2

    seen = []
    resumed = build_autoencoder(6, 3)
    history = fit(
        resumed,
        train,
        evaluation,
        **settings,
        checkpoint=checkpoint,
        resume_key="k",
        on_epoch=seen.append,
    )
    assert [r.resumed for r in seen] == [True, True, False, False]
    assert [(h.epoch, h.train_loss, h.eval_loss, h.lr) for h in history] == [
        (h.epoch, h.train_loss, h.eval_loss, h.lr) for h in expected
    ]
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_key_is_not_resumed(images, tmp_path: Path) -> None:
    train, evaluation = images
    checkpoint = tmp_path / "task.pt"
    settings = dict(lr=1e-2, weight_decay=0.0, epochs=1, batch_size=64, seed=1)
    fit(
        build_autoencoder(4, 1),
        train,
        evaluation,
        **settings,
        checkpoint=checkpoint,
        resume_key="old",
    )
    seen = []
    fit(
        build_autoencoder(4, 1),
        train,
        evaluation,
        **settings,
        checkpoint=checkpoint,
        resume_key="new",
        on_epoch=seen.append,
    )
    assert [r.resumed for r in seen] == [False]


def _log_from_process(uri: str, experiment_id: str, parent: str, index: int) -> None:
    ctx = TrackingContext(uri, experiment_id, parent)
    with task_run(ctx, f"process {index}") as run:
        for step in range(1, 101):
            run.log_metrics({"loss": 1.0 / step}, step=step)


def _parent(tmp_path: Path) -> TrackingContext:
    uri = embedded_tracking_uri(tmp_path)
    return start_study(uri, tmp_path, "concurrency", {"p": 1}, {"profile": "test"})


def _points(ctx: TrackingContext) -> dict[str, int]:
    client = MlflowClient(ctx.tracking_uri)
    runs = client.search_runs(
        [ctx.experiment_id], f"tags.mlflow.parentRunId = '{ctx.parent_run_id}'"
    )
    return {
        run.info.run_name: len(client.get_metric_history(run.info.run_id, "loss"))
        for run in runs
        if run.info.status == "FINISHED"
    }


def test_eight_threads_logging_per_epoch_metrics_lose_nothing(tmp_path: Path) -> None:
    ctx = _parent(tmp_path)
    threads = [
        threading.Thread(
            target=_log_from_process,
            args=(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, i),
        )
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _points(ctx) == {f"process {i}": 100 for i in range(8)}


def test_eight_processes_logging_per_epoch_metrics_lose_nothing(tmp_path: Path) -> None:
    ctx = _parent(tmp_path)
    spawn = multiprocessing.get_context("spawn")
    processes = [
        spawn.Process(
            target=_log_from_process,
            args=(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, i),
        )
        for i in range(8)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0] * 8
    assert _points(ctx) == {f"process {i}": 100 for i in range(8)}


def test_runs_of_dead_processes_are_marked_killed_and_live_ones_kept(tmp_path: Path) -> None:
    ctx = _parent(tmp_path)
    client = MlflowClient(ctx.tracking_uri)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = client.create_run(ctx.experiment_id, run_name="orphan").info.run_id
    client.set_tag(orphan, "aemnist.host", socket.gethostname())
    client.set_tag(orphan, "aemnist.pid", str(dead.pid))
    killed = mark_abandoned_runs(ctx.tracking_uri, ctx.experiment_id)
    assert killed == ["orphan"]
    assert client.get_run(orphan).info.status == "KILLED"
    # The study's own parent run belongs to this live process: left RUNNING.
    assert client.get_run(ctx.parent_run_id).info.status == "RUNNING"
