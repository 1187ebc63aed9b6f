"""The training stages: one grid fold, one size of the sweep, the final model."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from aemnist.config import StudyConfig
from aemnist.data import load_images
from aemnist.faults import maybe_fail
from aemnist.layout import Layout
from aemnist.model import save_checkpoint
from aemnist.runtime import set_torch_threads
from aemnist.schemas import TableRef, metrics_frame, read_frame, write_table
from aemnist.tracking import TaskRun, TrackingContext, task_run
from aemnist.training import EpochResult, evaluate, train_fold, train_size
from tasks.common import prefect_tags


def _epoch_logger(run: TaskRun, label: str, eval_name: str, epochs: int):  # noqa: ANN202
    logger = get_run_logger()

    def on_epoch(result: EpochResult) -> None:
        run.log_metrics(
            {"train_loss": result.train_loss, eval_name: result.eval_loss, "lr": result.lr},
            step=result.epoch,
        )
        logger.info(
            "%s epoch %d/%d: train %.5f, %s %.5f",
            label,
            result.epoch,
            epochs,
            result.train_loss,
            eval_name,
            result.eval_loss,
        )

    return on_epoch


@task(
    name="grid-fold",
    task_run_name="grid lr={lr:g} wd={weight_decay:g} fold={fold}",
    cache_policy=NO_CACHE,
)
def grid_fold(
    ctx: TrackingContext,
    config: StudyConfig,
    layout: Layout,
    train: TableRef,
    folds: TableRef,
    lr: float,
    weight_decay: float,
    fold: int,
    threads: int,
) -> TableRef:
    """Train on every fold but ``fold`` and record the per-epoch validation loss."""
    label = f"grid lr={lr:g} wd={weight_decay:g} fold={fold}"
    params = {
        "stage": "grid",
        "lr": lr,
        "weight_decay": weight_decay,
        "fold": fold,
        "size": config.grid.size,
        "epochs": config.grid.epochs,
        "batch_size": config.training.batch_size,
    }
    with task_run(ctx, label, params, {"stage": "grid", **prefect_tags()}) as run:
        maybe_fail("grid", lr=lr, weight_decay=weight_decay, fold=fold)
        set_torch_threads(threads)
        history = train_fold(
            load_images(train.path, config.data.train_limit),
            read_frame(folds.path, "folds"),
            fold,
            lr=lr,
            weight_decay=weight_decay,
            size=config.grid.size,
            epochs=config.grid.epochs,
            batch_size=config.training.batch_size,
            seed=config.seed,
            eval_batch_size=config.training.eval_batch_size,
            on_epoch=_epoch_logger(run, label, "val_loss", config.grid.epochs),
        )
        ref = write_table(history, layout.grid_history(lr, weight_decay, fold), "grid_history")
        run.log_artifact(ref.path, "tables")
    return ref


@task(name="sweep-size", task_run_name="sweep size={size}", cache_policy=NO_CACHE)
def sweep_size(
    ctx: TrackingContext,
    config: StudyConfig,
    layout: Layout,
    train: TableRef,
    test: TableRef,
    size: int,
    lr: float,
    weight_decay: float,
    threads: int,
) -> TableRef:
    """Train at one encoding size on the whole training set, test loss each epoch."""
    label = f"sweep size={size}"
    params = {
        "stage": "sweep",
        "size": size,
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": config.sweep.epochs,
        "plateau_patience": config.sweep.plateau_patience,
        "batch_size": config.training.batch_size,
    }
    with task_run(ctx, label, params, {"stage": "sweep", **prefect_tags()}) as run:
        maybe_fail("sweep", size=size)
        set_torch_threads(threads)
        _, history = train_size(
            load_images(train.path, config.data.train_limit),
            load_images(test.path, config.data.test_limit),
            size=size,
            lr=lr,
            weight_decay=weight_decay,
            epochs=config.sweep.epochs,
            plateau_patience=config.sweep.plateau_patience,
            batch_size=config.training.batch_size,
            seed=config.seed,
            eval_batch_size=config.training.eval_batch_size,
            on_epoch=_epoch_logger(run, label, "test_loss", config.sweep.epochs),
        )
        ref = write_table(history, layout.sweep_history(size), "sweep_history")
        run.log_artifact(ref.path, "tables")
    return ref


@task(name="final", task_run_name="final size={size}", cache_policy=NO_CACHE)
def final_model(
    ctx: TrackingContext,
    config: StudyConfig,
    layout: Layout,
    train: TableRef,
    test: TableRef,
    size: int,
    lr: float,
    weight_decay: float,
    threads: int,
) -> TableRef:
    """Train the final model; save its checkpoint; log and register it in MLflow."""
    label = f"final size={size}"
    params = {
        "stage": "final",
        "size": size,
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": config.final.epochs,
        "plateau_patience": config.sweep.plateau_patience,
        "batch_size": config.training.batch_size,
    }
    with task_run(ctx, label, params, {"stage": "final", **prefect_tags()}) as run:
        maybe_fail("final", size=size)
        set_torch_threads(threads)
        test_set = load_images(test.path, config.data.test_limit)
        model, history = train_size(
            load_images(train.path, config.data.train_limit),
            test_set,
            size=size,
            lr=lr,
            weight_decay=weight_decay,
            epochs=config.final.epochs,
            plateau_patience=config.sweep.plateau_patience,
            batch_size=config.training.batch_size,
            seed=config.seed,
            stage="final",
            eval_batch_size=config.training.eval_batch_size,
            on_epoch=_epoch_logger(run, label, "test_loss", config.final.epochs),
        )
        save_checkpoint(model, layout.final_model)
        write_table(history, layout.final_history, "sweep_history")
        test_mse = evaluate(model, test_set.images, config.training.eval_batch_size)
        ref = write_table(
            metrics_frame(
                {"test_mse": test_mse, "size": size, "lr": lr, "weight_decay": weight_decay}
            ),
            layout.final_metrics,
            "metrics",
        )
        run.log_metrics({"test_mse": test_mse})
        for path in (layout.final_history, layout.final_metrics, layout.final_model):
            run.log_artifact(path, "final")
        version = run.log_pytorch_model(model, test_set.images[:4].numpy().astype(np.float32))
        get_run_logger().info(
            "final model: test MSE %.6f, registered version %s", test_mse, version
        )
    return ref
