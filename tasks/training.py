"""The training stages: one grid fold, one size of the sweep, the final model; the grid's and
the sweep's stacked groups (``runtime.stacked_cells``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from aemnist.data import ImageSet, load_images
from aemnist.faults import maybe_fail
from aemnist.jobs import FoldGroupJob, FoldJob, SizeGroupJob, SizeJob
from aemnist.model import Autoencoder, save_checkpoint
from aemnist.runtime import set_torch_threads
from aemnist.schemas import TableRef, metrics_frame, read_frame, write_table
from aemnist.stacked import train_fold_group, train_size_group
from aemnist.summaries import dead_epochs
from aemnist.tracking import TaskRun, TrackingContext, release_model
from aemnist.training import EpochCallback, EpochResult, evaluate, train_fold, train_size
from tasks.caching import StageCache, current_key
from tasks.common import tracked_run
from tasks.slots import training_slot

# The MLflow metric of each epoch's scored loss, by the sweep's selection.
SCORED_ON = {"test": "test_loss", "validation": "val_loss"}


def _epoch_logger(run: TaskRun, job: FoldJob | SizeJob, eval_name: str) -> EpochCallback:
    logger = get_run_logger()

    def on_epoch(result: EpochResult) -> None:
        metrics = {"train_loss": result.train_loss, eval_name: result.eval_loss, "lr": result.lr}
        health = {"output_spread": result.output_spread, "black_ratio": result.black_ratio}
        run.log_metrics(metrics | health, step=result.epoch)
        how = "restored from checkpoint" if result.resumed else "trained"
        logger.info(
            "%s epoch %d/%d %s: train %.5f, %s %.5f",
            job.label,
            result.epoch,
            job.epochs,
            how,
            result.train_loss,
            eval_name,
            result.eval_loss,
        )
        # After the epoch's checkpoint is saved and logged: a drill can fail or pause here.
        if not result.resumed:
            maybe_fail(job.stage, epoch=result.epoch, **job.fault_key)

    return on_epoch


def _log_dead_start(run: TaskRun, job: FoldJob | SizeJob, history: pd.DataFrame) -> None:
    """The epochs the run spent at a constant output before it learned (a dead start): a
    metric to plot and a tag to filter runs on (`tags.aemnist.dead_epochs != '0'`)."""
    dead = dead_epochs(history.sort_values("epoch"))
    run.log_metrics({"dead_epochs": dead})
    run.set_tags({"aemnist.dead_epochs": str(dead)})
    if dead:
        get_run_logger().warning(
            "%s started dead: its first %d of %d epochs gave every image the same output",
            job.label,
            dead,
            job.epochs,
        )


@task(
    name="grid-fold",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="grid"),
    persist_result=True,
)
def grid_fold(ctx: TrackingContext, job: FoldJob) -> TableRef:
    """Train on every fold but the job's and record the per-epoch validation loss."""
    # One of the machine's training slots is held for the whole task run (tasks.slots): its
    # MLflow run's span is the time it held the slot.
    with (
        training_slot(job.compute.slots),
        tracked_run(ctx, job.label, job.params(), job.stage) as run,
    ):
        run.log_inputs(job.inputs())
        maybe_fail(job.stage, **job.fault_key)
        set_torch_threads(job.compute.threads)
        history = train_fold(
            load_images(job.train.path, job.train_limit),
            read_frame(job.folds.path, "folds"),
            job.fold,
            lr=job.lr,
            weight_decay=job.weight_decay,
            size=job.size,
            epochs=job.epochs,
            batch_size=job.training.batch_size,
            seed=job.seed,
            repeat=job.repeat,
            output_bias_at_mean=job.training.output_bias_at_mean,
            eval_batch_size=job.training.eval_batch_size,
            on_epoch=_epoch_logger(run, job, "val_loss"),
            checkpoint=job.checkpoint,
            resume_key=current_key(),
            device=job.compute.device,
            options=job.compute.options,
        )
        _log_dead_start(run, job, history)
        ref = write_table(history, job.output, "grid_history")
        run.log_artifact(ref.path, "tables")
        job.checkpoint.unlink(missing_ok=True)
    return ref.with_run(run.run_id)


@contextmanager
def _stacked_runs(
    ctx: TrackingContext, job: FoldGroupJob | SizeGroupJob
) -> Iterator[list[TaskRun]]:
    """What a stacked task holds while its cells train: one training slot, and each cell's
    own nested run (its name, parameters and inputs as its own task would log them, plus the
    group it trained in). The checkpoint goes once the body has stored the results."""
    with training_slot(job.compute.slots), ExitStack() as stack:
        runs = [
            stack.enter_context(
                tracked_run(ctx, cell.label, cell.params() | job.params(), cell.stage)
            )
            for cell in job.cells
        ]
        for run, cell in zip(runs, job.cells, strict=True):
            run.log_inputs(cell.inputs())
            maybe_fail(cell.stage, **cell.fault_key)
        set_torch_threads(job.compute.threads)
        yield runs
        job.checkpoint.unlink(missing_ok=True)


def _store_histories(
    runs: list[TaskRun],
    job: FoldGroupJob | SizeGroupJob,
    histories: list[pd.DataFrame],
    schema: str,
) -> dict[str, TableRef]:
    """Each cell's dead-start metric, history table and its artifact; the tables by label."""
    refs = {}
    for run, cell, history in zip(runs, job.cells, histories, strict=True):
        _log_dead_start(run, cell, history)
        ref = write_table(history, cell.output, schema)
        run.log_artifact(ref.path, "tables")
        refs[cell.label] = ref.with_run(run.run_id)
    return refs


@task(
    name="grid-stack",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="grid"),
    persist_result=True,
)
def grid_stack(ctx: TrackingContext, job: FoldGroupJob) -> dict[str, TableRef]:
    """Train grid cells of one fold at once (``runtime.stacked_cells``): each cell its own
    MLflow run, per-epoch metrics and history table, as ``grid_fold`` gives it.

    Returns each cell's table by its label."""
    with _stacked_runs(ctx, job) as runs:
        first = job.first
        histories = train_fold_group(
            load_images(first.train.path, first.train_limit),
            read_frame(first.folds.path, "folds"),
            first.fold,
            [(cell.lr, cell.weight_decay, cell.repeat) for cell in job.cells],
            size=first.size,
            epochs=first.epochs,
            batch_size=first.training.batch_size,
            seed=first.seed,
            output_bias_at_mean=first.training.output_bias_at_mean,
            eval_batch_size=first.training.eval_batch_size,
            on_epoch=[
                _epoch_logger(run, cell, "val_loss")
                for run, cell in zip(runs, job.cells, strict=True)
            ],
            checkpoint=job.checkpoint,
            resume_key=current_key(),
            device=job.compute.device,
            options=job.compute.options,
        )
        refs = _store_histories(runs, job, histories, "grid_history")
    return refs


@task(
    name="sweep-stack",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="sweep"),
    persist_result=True,
)
def sweep_stack(ctx: TrackingContext, job: SizeGroupJob) -> dict[str, TableRef]:
    """Train sizes of the sweep at once (``runtime.stacked_cells``): each its own MLflow run,
    per-epoch metrics, learning-rate schedule and history table, as ``sweep_size`` gives it.

    Returns each size's table by its label."""
    with _stacked_runs(ctx, job) as runs:
        first = job.first
        histories = train_size_group(
            load_images(first.train.path, first.train_limit),
            load_images(first.test.path, first.test_limit),
            [(cell.size, cell.repeat) for cell in job.cells],
            lr=first.lr,
            weight_decay=first.weight_decay,
            epochs=first.epochs,
            plateau_patience=first.plateau_patience,
            batch_size=first.training.batch_size,
            seed=first.seed,
            stage=first.stage,
            selection=first.selection,
            validation_images=first.validation_images,
            output_bias_at_mean=first.training.output_bias_at_mean,
            eval_batch_size=first.training.eval_batch_size,
            on_epoch=[
                _epoch_logger(run, cell, SCORED_ON[cell.selection])
                for run, cell in zip(runs, job.cells, strict=True)
            ],
            checkpoint=job.checkpoint,
            resume_key=current_key(),
            device=job.compute.device,
            options=job.compute.options,
        )
        refs = _store_histories(runs, job, histories, "sweep_history")
    return refs


@contextmanager
def _trained_at_size(
    ctx: TrackingContext, job: SizeJob
) -> Iterator[tuple[TaskRun, Autoencoder, pd.DataFrame, ImageSet]]:
    """What the sweep and final stages share: a nested run, training at one size on the whole
    training set with the test loss each epoch, resumable from the task's checkpoint (removed
    once the body has stored its results). Yields the run, model, history and test images."""
    with (
        training_slot(job.compute.slots),
        tracked_run(ctx, job.label, job.params(), job.stage) as run,
    ):
        run.log_inputs(job.inputs())
        maybe_fail(job.stage, **job.fault_key)
        set_torch_threads(job.compute.threads)
        test_set = load_images(job.test.path, job.test_limit)
        model, history = train_size(
            load_images(job.train.path, job.train_limit),
            test_set,
            size=job.size,
            lr=job.lr,
            weight_decay=job.weight_decay,
            epochs=job.epochs,
            plateau_patience=job.plateau_patience,
            batch_size=job.training.batch_size,
            seed=job.seed,
            stage=job.stage,
            repeat=job.repeat,
            selection=job.selection,
            validation_images=job.validation_images,
            output_bias_at_mean=job.training.output_bias_at_mean,
            eval_batch_size=job.training.eval_batch_size,
            on_epoch=_epoch_logger(run, job, SCORED_ON[job.selection]),
            checkpoint=job.checkpoint,
            resume_key=current_key(),
            device=job.compute.device,
            options=job.compute.options,
        )
        _log_dead_start(run, job, history)
        yield run, model, history, test_set
        job.checkpoint.unlink(missing_ok=True)


@task(
    name="sweep-size",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="sweep"),
    persist_result=True,
)
def sweep_size(ctx: TrackingContext, job: SizeJob) -> TableRef:
    """Train at one encoding size on the whole training set, test loss each epoch."""
    with _trained_at_size(ctx, job) as (run, _, history, _):
        ref = write_table(history, job.output, "sweep_history")
        run.log_artifact(ref.path, "tables")
    return ref.with_run(run.run_id)


@task(
    name="final",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="final"),
    persist_result=True,
)
def final_model(ctx: TrackingContext, job: SizeJob) -> TableRef:
    """Train the final model (of one seed); save its checkpoint; log it and, for repeat 0,
    register it in MLflow and, once its run has finished, tag the version (and make a
    paper-profile one the champion).

    Returns the model file's reference: what the evaluation stages depend on."""
    layout, repeat = job.layout, job.repeat
    version = None
    with _trained_at_size(ctx, job) as (run, model, history, test_set):
        test_mse = evaluate(
            model, test_set.images, job.training.eval_batch_size, job.compute.device
        )
        files = (
            layout.final_history_of(repeat),
            layout.final_metrics_of(repeat),
            layout.final_model_of(repeat),
        )
        write_table(history, files[0], "sweep_history")
        metrics = {
            "test_mse": test_mse, "size": job.size, "lr": job.lr, "weight_decay": job.weight_decay
        }  # fmt: skip
        write_table(metrics_frame(metrics), files[1], "metrics")
        save_checkpoint(model, files[2])
        run.log_metrics({"test_mse": test_mse})
        for path in files:
            run.log_artifact(path, "final")
        if repeat == 0:  # the model the evaluation stages use is the one registered
            example = test_set.images[:4].numpy().astype(np.float32)
            version = run.log_pytorch_model(model, example)
            get_run_logger().info(
                "final model: test MSE %.6f, registered version %s", test_mse, version
            )
    if version is not None:  # its run has finished: the version is released
        release_model(ctx, version)
    return TableRef.of_file(files[2]).with_run(run.run_id)
