"""The training stages: one grid fold, one size of the sweep, the final model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from aemnist.config import TrainingConfig
from aemnist.data import ImageSet, load_images
from aemnist.faults import maybe_fail
from aemnist.layout import Layout
from aemnist.model import Autoencoder, save_checkpoint
from aemnist.plan import size_label
from aemnist.runtime import set_torch_threads
from aemnist.schemas import TableRef, metrics_frame, read_frame, write_table
from aemnist.tracking import TaskRun, TrackingContext
from aemnist.training import EpochResult, evaluate, train_fold, train_size
from tasks.caching import StageCache, current_key
from tasks.common import tracked_run


def _run_name(stage: str) -> Callable[..., str]:
    """The task run's name from its parameters, as the flow labels it (aemnist.plan)."""

    def name(parameters: dict[str, Any]) -> str:
        return size_label(stage, parameters["size"], parameters.get("repeat", 0))

    return name


# The MLflow metric of each epoch's scored loss, by the sweep's selection.
SCORED_ON = {"test": "test_loss", "validation": "val_loss"}


def _epoch_logger(
    run: TaskRun, label: str, eval_name: str, epochs: int, stage: str, fault_key: dict[str, Any]
) -> Callable[[EpochResult], None]:
    logger = get_run_logger()

    def on_epoch(result: EpochResult) -> None:
        run.log_metrics(
            {"train_loss": result.train_loss, eval_name: result.eval_loss, "lr": result.lr},
            step=result.epoch,
        )
        how = "restored from checkpoint" if result.resumed else "trained"
        logger.info(
            "%s epoch %d/%d %s: train %.5f, %s %.5f",
            label,
            result.epoch,
            epochs,
            how,
            result.train_loss,
            eval_name,
            result.eval_loss,
        )
        # After the epoch's checkpoint is saved and logged: a drill can fail or pause here.
        if not result.resumed:
            maybe_fail(stage, epoch=result.epoch, **fault_key)

    return on_epoch


@task(
    name="grid-fold",
    task_run_name="grid lr={lr:g} wd={weight_decay:g} fold={fold}",
    cache_policy=StageCache(stage="grid"),
    persist_result=True,
)
def grid_fold(
    ctx: TrackingContext,
    layout: Layout,
    train: TableRef,
    folds: TableRef,
    train_limit: int,
    lr: float,
    weight_decay: float,
    fold: int,
    size: int,
    epochs: int,
    training: TrainingConfig,
    seed: int,
    threads: int,
    device: str,
) -> TableRef:
    """Train on every fold but ``fold`` and record the per-epoch validation loss."""
    label = f"grid lr={lr:g} wd={weight_decay:g} fold={fold}"
    params = {
        "stage": "grid",
        "lr": lr,
        "weight_decay": weight_decay,
        "fold": fold,
        "size": size,
        "epochs": epochs,
        "batch_size": training.batch_size,
        "seed": seed,
        "device": device,
    }
    with tracked_run(ctx, label, params, "grid") as run:
        maybe_fail("grid", lr=lr, weight_decay=weight_decay, fold=fold)
        set_torch_threads(threads)
        checkpoint = layout.checkpoint(label)
        history = train_fold(
            load_images(train.path, train_limit),
            read_frame(folds.path, "folds"),
            fold,
            lr=lr,
            weight_decay=weight_decay,
            size=size,
            epochs=epochs,
            batch_size=training.batch_size,
            seed=seed,
            eval_batch_size=training.eval_batch_size,
            on_epoch=_epoch_logger(
                run, label, "val_loss", epochs, "grid",
                {"lr": lr, "weight_decay": weight_decay, "fold": fold},
            ),
            checkpoint=checkpoint,
            resume_key=current_key(),
            device=device,
        )
        ref = write_table(history, layout.grid_history(lr, weight_decay, fold), "grid_history")
        run.log_artifact(ref.path, "tables")
        checkpoint.unlink(missing_ok=True)
    return ref.with_run(run.run_id)


@contextmanager
def _trained_at_size(
    stage: str,
    ctx: TrackingContext,
    layout: Layout,
    train: TableRef,
    test: TableRef,
    train_limit: int,
    test_limit: int,
    size: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    plateau_patience: int,
    selection: str,
    validation_images: int,
    training: TrainingConfig,
    seed: int,
    threads: int,
    device: str,
    repeat: int,
) -> Iterator[tuple[TaskRun, Autoencoder, pd.DataFrame, ImageSet]]:
    """What the sweep and final stages share: a nested run, training at one size on the whole
    training set with the test loss each epoch, resumable from the task's checkpoint (removed
    once the body has stored its results). Yields the run, model, history and test images."""
    label = size_label(stage, size, repeat)
    params = {
        "stage": stage,
        "size": size,
        "repeat": repeat,
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": epochs,
        "plateau_patience": plateau_patience,
        "selection": selection,
        "batch_size": training.batch_size,
        "seed": seed,
        "device": device,
    }
    with tracked_run(ctx, label, params, stage) as run:
        maybe_fail(stage, size=size)
        set_torch_threads(threads)
        test_set = load_images(test.path, test_limit)
        checkpoint = layout.checkpoint(label)
        model, history = train_size(
            load_images(train.path, train_limit),
            test_set,
            size=size,
            lr=lr,
            weight_decay=weight_decay,
            epochs=epochs,
            plateau_patience=plateau_patience,
            batch_size=training.batch_size,
            seed=seed,
            stage=stage,
            repeat=repeat,
            selection=selection,
            validation_images=validation_images,
            eval_batch_size=training.eval_batch_size,
            on_epoch=_epoch_logger(
                run, label, SCORED_ON[selection], epochs, stage, {"size": size}
            ),
            checkpoint=checkpoint,
            resume_key=current_key(),
            device=device,
        )
        yield run, model, history, test_set
        checkpoint.unlink(missing_ok=True)


@task(
    name="sweep-size",
    task_run_name=_run_name("sweep"),
    cache_policy=StageCache(stage="sweep"),
    persist_result=True,
)
def sweep_size(
    ctx: TrackingContext,
    layout: Layout,
    train: TableRef,
    test: TableRef,
    train_limit: int,
    test_limit: int,
    size: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    plateau_patience: int,
    selection: str,
    validation_images: int,
    training: TrainingConfig,
    seed: int,
    threads: int,
    device: str,
    repeat: int,
) -> TableRef:
    """Train at one encoding size on the whole training set, test loss each epoch."""
    with _trained_at_size(
        "sweep",
        ctx,
        layout,
        train,
        test,
        train_limit,
        test_limit,
        size,
        lr,
        weight_decay,
        epochs,
        plateau_patience,
        selection,
        validation_images,
        training,
        seed,
        threads,
        device,
        repeat,
    ) as (run, _, history, _):
        ref = write_table(history, layout.sweep_history(size, repeat), "sweep_history")
        run.log_artifact(ref.path, "tables")
    return ref.with_run(run.run_id)


@task(
    name="final",
    task_run_name=_run_name("final"),
    cache_policy=StageCache(stage="final"),
    persist_result=True,
)
def final_model(
    ctx: TrackingContext,
    layout: Layout,
    train: TableRef,
    test: TableRef,
    train_limit: int,
    test_limit: int,
    size: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    plateau_patience: int,
    selection: str,
    validation_images: int,
    training: TrainingConfig,
    seed: int,
    threads: int,
    device: str,
    repeat: int,
) -> TableRef:
    """Train the final model (of one seed); save its checkpoint; log it and, for repeat 0,
    register it in MLflow.

    Returns the model file's reference: what the evaluation stages depend on."""
    with _trained_at_size(
        "final",
        ctx,
        layout,
        train,
        test,
        train_limit,
        test_limit,
        size,
        lr,
        weight_decay,
        epochs,
        plateau_patience,
        selection,
        validation_images,
        training,
        seed,
        threads,
        device,
        repeat,
    ) as (run, model, history, test_set):
        test_mse = evaluate(model, test_set.images, training.eval_batch_size, device)
        files = (
            layout.final_history_of(repeat),
            layout.final_metrics_of(repeat),
            layout.final_model_of(repeat),
        )
        write_table(history, files[0], "sweep_history")
        metrics = {"test_mse": test_mse, "size": size, "lr": lr, "weight_decay": weight_decay}
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
    return TableRef.of_file(files[2]).with_run(run.run_id)
