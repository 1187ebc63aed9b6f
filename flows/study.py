"""The ``study`` flow: every stage of the seed's study, chained through parquet tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from aemnist.config import load_config
from aemnist.data import MIRROR_ENV
from aemnist.layout import Layout
from aemnist.runtime import cpu_count, parallel_workers, threads_per_task
from tasks.aggregate import summarise_grid, summarise_sweep
from tasks.data import assign_folds, download
from tasks.evaluation import corruption, embedding
from tasks.study import close_study, open_study, write_report
from tasks.training import final_model, grid_fold, sweep_size

DEFAULT_WORKDIR = "aemnist-runs"


class StageFailed(RuntimeError):
    """Some tasks of a fan-out stage failed; names them."""


def collect(futures: dict[str, PrefectFuture], stage: str) -> list[Any]:
    """Wait for every task of a stage (a failure does not cancel the others), report
    progress as they finish, then return their results or name the ones that failed."""
    logger = get_run_logger()
    total = len(futures)
    progress = create_progress_artifact(0.0, description=f"{stage}: tasks finished (%)")
    for done, _ in enumerate(as_completed(list(futures.values())), start=1):
        logger.info("[%s] %d/%d tasks finished", stage, done, total)
        update_progress_artifact(progress, 100.0 * done / total)
    failed = [label for label, future in futures.items() if not future.state.is_completed()]
    if failed:
        raise StageFailed(
            f"{stage}: {len(failed)} of {total} tasks failed: {', '.join(failed)}; the others "
            f"completed; fix the cause and run the study again"
        )
    return [future.result() for future in futures.values()]


@flow(name="study", task_runner=ThreadPoolTaskRunner(max_workers=cpu_count()))
def study(
    profile: str | None = None,
    workdir: str = DEFAULT_WORKDIR,
    config_file: str | None = None,
    mnist_mirror: str | None = None,
    seed: int | None = None,
) -> str:
    """Run the whole study; returns the path of the report."""
    overrides = {"seed": seed} if seed is not None else None
    config = load_config(profile, Path(config_file) if config_file else None, overrides)
    layout = Layout(Path(workdir).resolve())
    mirror = mnist_mirror or os.environ.get(MIRROR_ENV) or None
    workers = parallel_workers(config.runtime.workers)
    threads = threads_per_task(workers)

    ctx = open_study(config, layout)
    try:
        tables = download(ctx, layout, mirror)
        train, test = tables["train"], tables["test"]
        folds = assign_folds(ctx, config, layout, train)

        grid = {
            f"grid lr={lr:g} wd={wd:g} fold={fold}": grid_fold.submit(
                ctx, config, layout, train, folds, lr, wd, fold, threads
            )
            for lr in config.grid.learning_rates
            for wd in config.grid.weight_decays
            for fold in range(config.grid.folds)
        }
        _, lr, wd = summarise_grid(ctx, layout, collect(grid, "grid"))

        sweep = {
            f"sweep size={size}": sweep_size.submit(
                ctx, config, layout, train, test, size, lr, wd, threads
            )
            for size in config.sweep.sizes
        }
        _, size = summarise_sweep(ctx, config, layout, collect(sweep, "sweep"))

        model = final_model(ctx, config, layout, train, test, size, lr, wd, cpu_count())
        evaluations = {
            "corruption": corruption.submit(ctx, config, layout, test, model, threads),
            "embedding": embedding.submit(ctx, config, layout, test, model, threads),
        }
        collect(evaluations, "evaluation")
        report = write_report(ctx, config, layout)
    except BaseException:
        close_study(ctx, "FAILED")
        raise
    close_study(ctx, "FINISHED")
    return str(report)
