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
from tracking_writer import log_from_process

from aemnist import caching, plan
from aemnist.caching import library_modules, stage_key
from aemnist.config import load_config
from aemnist.layout import Layout
from aemnist.model import build_autoencoder
from aemnist.schemas import TableRef, output_state, producing, write_table
from aemnist.tracking import (
    TrackingContext,
    embedded_tracking_uri,
    mark_abandoned_runs,
    start_study,
)
from aemnist.training import DEFAULT_OPTIONS, fit

TRAIN = TableRef("/somewhere/mnist_train.parquet", "a" * 64, 60000)
TEST = TableRef("/somewhere/mnist_test.parquet", "b" * 64, 10000)
FOLDS = TableRef("/somewhere/folds.parquet", "c" * 64, 60000)


def study_of(overrides: dict, workdir: Path = Path("/work/dir"), threads: int = 1) -> plan.Study:
    """A resolved study as aemnist.plan.resolve_study gives it, with fixed task slots and
    threads (this machine's core count must not enter these tests)."""
    config = load_config("smoke", overrides={"runtime": {"device": "cpu"}, **overrides})
    return plan.Study(config, Layout(workdir), 2, threads, 2, DEFAULT_OPTIONS)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """Results of the stages before the sweep and final: their tables written for real, since
    a stage reads the values it needs (best settings, best size) from them."""
    import pandas as pd

    root = tmp_path_factory.mktemp("upstream")
    grid = write_table(
        pd.DataFrame(
            {"rank": [1], "lr": [0.005], "weight_decay": [1e-5], "train_loss_mean": [0.03],
             "train_loss_std": [0.0], "val_loss_mean": [0.03], "val_loss_std": [0.0],
             "n_folds": [2], "repeats": [1],
             "dead_starts": [0]}
        ),
        root / "grid_summary.parquet",
        "grid_summary",
    )  # fmt: skip
    sweep = write_table(
        pd.DataFrame(
            {"rank": [1], "size": [8], "test_loss": [0.02], "test_loss_std": [0.0],
             "val_loss": [float("nan")], "val_loss_std": [float("nan")], "train_loss": [0.02],
             "epochs_scored": [1], "repeats": [1], "dead_repeats": [[]], "dead_epochs": [[]],
             "dead_loss": [float("nan")], "alive_loss": [0.02]}
        ),
        root / "sweep_summary.parquet",
        "sweep_summary",
    )  # fmt: skip
    return {
        "download": [{"train": TRAIN, "test": TEST}],
        "folds": [FOLDS],
        "grid-summary": [grid],
        "sweep-summary": [sweep],
    }


def keys(upstream: dict[str, list], overrides: dict, threads: int = 1) -> dict[str, str]:
    """The key of the first job of each keyed training-side stage."""
    study = study_of(overrides, threads=threads)
    return {
        stage: stage_key(stage, plan.STAGES[stage].jobs(study, upstream)[0])
        for stage in ("folds", "grid", "sweep", "final")
    }


def test_changing_sweep_epochs_changes_only_the_sweep_key(upstream) -> None:
    before = keys(upstream, {})
    after = keys(upstream, {"sweep": {"epochs": 7}})
    assert after["folds"] == before["folds"]
    assert after["grid"] == before["grid"]
    assert after["sweep"] != before["sweep"]
    assert after["final"] == before["final"]  # the final stage has its own epochs


def test_changing_the_seed_changes_every_key(upstream) -> None:
    before, after = keys(upstream, {}), keys(upstream, {"seed": 1})
    assert all(after[stage] != before[stage] for stage in before)


def test_the_torch_thread_count_keys_the_training_stages(upstream) -> None:
    # CPU sums are split by thread: another thread count gives other last digits.
    # (The final model has threads of its own: every core when it trains alone.)
    one, two = keys(upstream, {}, threads=1), keys(upstream, {}, threads=2)
    assert one["folds"] == two["folds"] and one["final"] == two["final"]
    assert one["grid"] != two["grid"] and one["sweep"] != two["sweep"]


def test_key_follows_table_content_not_its_path_or_producer() -> None:
    study = study_of({})
    moved = TableRef("/elsewhere/train.parquet", TRAIN.sha256, -1, run_id="abc")
    changed = TableRef(TRAIN.path, "d" * 64, TRAIN.rows)

    def folds_key(train: TableRef) -> str:
        (job,) = plan.STAGES["folds"].jobs(study, {"download": [{"train": train, "test": TEST}]})
        return stage_key("folds", job)

    assert folds_key(moved) == folds_key(TRAIN)
    assert folds_key(changed) != folds_key(TRAIN)


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


def test_every_stage_reads_only_declared_stages_and_runs_after_them() -> None:
    order = [stage.name for wave in plan.waves() for stage in wave]
    assert order == list(plan.STAGES)
    for stage in plan.STAGES.values():
        assert all(order.index(name) < order.index(stage.name) for name in stage.reads)
    # The evaluations read the same stages and run side by side.
    assert [s.name for s in plan.waves()[-2]] == ["corruption", "embedding"]


def test_stage_code_is_what_its_library_imports() -> None:
    # Derived, not listed: training imports runtime (device set-up), so runtime keys it.
    assert {"aemnist.training", "aemnist.runtime", "aemnist.model", "aemnist.data"} <= set(
        library_modules("grid")
    )
    assert "aemnist.training" not in library_modules("embedding")
    assert "aemnist.plots" in library_modules("report")  # imported inside a function
    assert library_modules("grid-summary") == [
        "aemnist.schemas", "aemnist.storage", "aemnist.summaries"
    ]  # fmt: skip


def test_editing_a_module_changes_the_keys_of_the_stages_that_import_it(
    upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {stage: caching.code_version(stage) for stage in plan.STAGES}
    source = caching.module_source
    monkeypatch.setattr(
        caching,
        "module_source",
        lambda module: source(module) + (b"\n# edited\n" if module == "aemnist.embedding" else b""),
    )
    caching.code_version.cache_clear()
    try:
        after = {stage: caching.code_version(stage) for stage in plan.STAGES}
    finally:
        monkeypatch.undo()
        caching.code_version.cache_clear()
    assert {stage for stage in plan.STAGES if after[stage] != before[stage]} == {"embedding"}


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
            target=log_from_process,
            args=(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, i),
        )
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _points(ctx) == {f"process {i}": 100 for i in range(8)}


@pytest.mark.e2e
def test_eight_processes_logging_per_epoch_metrics_lose_nothing(tmp_path: Path) -> None:
    ctx = _parent(tmp_path)
    spawn = multiprocessing.get_context("spawn")
    processes = [
        spawn.Process(
            target=log_from_process,
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
