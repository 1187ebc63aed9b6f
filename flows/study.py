"""The ``study`` flow: every stage of the seed's study, chained through parquet tables.

Each task is keyed by content (tasks.caching): a re-run reuses every result whose inputs,
config fields and code are unchanged and whose files are intact, and recomputes the rest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from aemnist import plan
from aemnist.config import load_config, run_overrides
from aemnist.data import MIRROR_ENV
from aemnist.layout import Layout
from aemnist.runtime import (
    cpu_count,
    parallel_workers,
    prepare_device,
    threads_per_task,
    with_resolved_device,
)
from tasks.aggregate import summarise_grid, summarise_sweep
from tasks.caching import result_storage, submit_stage
from tasks.data import assign_folds, download
from tasks.evaluation import evaluate_corruption, map_embedding
from tasks.study import close_study, link_reused, open_study, publish_results, write_report
from tasks.training import final_model, grid_fold, sweep_size

DEFAULT_WORKDIR = "aemnist-runs"


class StageFailed(RuntimeError):
    """Some tasks of a stage failed; names them."""


def _producer(result: Any) -> str:
    """The MLflow run that produced a task's result (a TableRef, or a tuple led by one)."""
    ref = result[0] if isinstance(result, tuple) else result
    return getattr(ref, "run_id", "")


def collect(ctx: Any, futures: dict[str, PrefectFuture], stage: str) -> list[Any]:
    """Wait for every task of a stage (a failure does not cancel the others), report
    progress as they finish, link reused results to the parent run, then return the
    results or name the tasks that failed."""
    logger = get_run_logger()
    total = len(futures)
    # A stage of several tasks shows its progress in the Prefect UI; each update is a round
    # trip to the server, so at most one a second (and the last): cached tasks finish by
    # the dozen within milliseconds.
    progress = (
        create_progress_artifact(0.0, description=f"{stage}: tasks finished (%)")
        if total > 1
        else None
    )
    shown = time.monotonic()
    for done, future in enumerate(as_completed(list(futures.values())), start=1):
        future.wait()  # as_completed can yield before the future's final state is readable
        logger.info("[%s] %d/%d tasks finished", stage, done, total)
        if progress is not None and (done == total or time.monotonic() - shown >= 1.0):
            update_progress_artifact(progress, 100.0 * done / total)
            shown = time.monotonic()
    failed = [label for label, future in futures.items() if not future.state.is_completed()]
    if failed:
        raise StageFailed(
            f"{stage}: {len(failed)} of {total} tasks failed: {', '.join(failed)}; the others "
            f"completed and are kept: fix the cause and run the study again to re-run only these"
        )
    results = {label: future.result() for label, future in futures.items()}
    reused = {
        label: _producer(results[label])
        for label, future in futures.items()
        if future.state.name == "Cached"
    }
    if reused:
        logger.info("[%s] %d/%d results reused from earlier runs", stage, len(reused), total)
        link_reused(ctx, reused)
    return list(results.values())


@flow(name="study", task_runner=ThreadPoolTaskRunner(max_workers=cpu_count()))
def study(
    profile: str | None = None,
    workdir: str = DEFAULT_WORKDIR,
    config_file: str | None = None,
    mnist_mirror: str | None = None,
    seed: int | None = None,
    fresh: bool = False,
    refresh: list[str] | None = None,
    device: str | None = None,
    repeats: int | None = None,
) -> str:
    """Run the whole study; returns the path of the report.

    ``fresh`` recomputes every stage; ``refresh`` names stages to recompute with every stage
    that follows from them; ``device`` (auto, cpu or cuda) overrides runtime.device and
    ``repeats`` sweep.repeats (the seeds the sweep and the final model are trained with)."""
    overrides = run_overrides(seed, device, repeats)
    user_file = Path(config_file) if config_file else None
    config = with_resolved_device(load_config(profile, user_file, overrides))
    prepare_device(config.runtime.device)
    layout = Layout(Path(workdir).resolve())
    mirror = mnist_mirror or os.environ.get(MIRROR_ENV) or None
    redo = plan.refreshed_stages(fresh, refresh)
    workers = parallel_workers(
        config.runtime.workers, config.runtime.device, config.runtime.gpu_concurrency
    )
    threads = threads_per_task(workers)
    # A single final task gets every core; several (repeats) share them as the sweep does.
    final_threads = cpu_count() if config.sweep.repeats == 1 else threads

    def submit(
        task: Any, stage: str, inputs: dict[str, Any], label: str | None = None, **runtime: Any
    ) -> PrefectFuture:
        checkpoint = layout.checkpoint(label) if label else None
        return submit_stage(
            task, stage, inputs, storage, stage in redo, checkpoint, ctx=ctx, **runtime
        )

    def fan_out(
        task: Any, stage: str, labelled: Iterable[tuple[str, dict[str, Any]]], threads: int
    ) -> list[Any]:
        """One task per (label, inputs), side by side; the results once all have finished."""
        futures = {
            label: submit(task, stage, inputs, label, threads=threads) for label, inputs in labelled
        }
        return collect(ctx, futures, stage)

    def run_one(task: Any, stage: str, inputs: dict[str, Any], label: str, **runtime: Any) -> Any:
        return collect(ctx, {label: submit(task, stage, inputs, label, **runtime)}, stage)[0]

    ctx = open_study(config, layout)
    storage = result_storage(layout)
    try:
        tables = download(ctx, layout, mirror, force="download" in redo)
        train, test = tables["train"], tables["test"]
        folds = run_one(assign_folds, "folds", plan.folds_inputs(config, layout, train), "folds")

        histories = fan_out(
            grid_fold,
            "grid",
            (
                (label, plan.grid_inputs(config, layout, train, folds, lr, wd, fold))
                for label, lr, wd, fold in plan.grid_labels(config)
            ),
            threads,
        )
        grid_table, lr, wd = run_one(
            summarise_grid,
            "grid-summary",
            plan.grid_summary_inputs(layout, histories),
            "grid summary",
        )

        histories = fan_out(
            sweep_size,
            "sweep",
            (
                (label, plan.sweep_inputs(config, layout, train, test, size, lr, wd, repeat))
                for label, size, repeat in plan.sweep_labels(config)
            ),
            threads,
        )
        sweep_table, best_size = run_one(
            summarise_sweep,
            "sweep-summary",
            plan.sweep_summary_inputs(config, layout, histories),
            "sweep summary",
        )

        size = plan.final_size(config, best_size)
        # One final model per seed, side by side; the evaluations use repeat 0's.
        finals = fan_out(
            final_model,
            "final",
            (
                (label, plan.final_inputs(config, layout, train, test, size, lr, wd, repeat))
                for label, repeat in plan.final_labels(config, size)
            ),
            final_threads,
        )
        model = finals[0]

        evaluations = collect(
            ctx,
            {
                "corruption": submit(
                    evaluate_corruption,
                    "corruption",
                    plan.corruption_inputs(config, layout, test, model),
                    threads=threads,
                ),
                "embedding": submit(
                    map_embedding,
                    "embedding",
                    plan.embedding_inputs(config, layout, test, model),
                    threads=threads,
                ),
            },
            "evaluation",
        )

        tables = [grid_table, sweep_table, *finals, *evaluations]
        report = run_one(
            write_report, "report", plan.report_inputs(config, layout, tables), "report"
        )
        publish_results(ctx, config, layout)
    except BaseException:
        close_study(ctx, "FAILED")
        raise
    close_study(ctx, "FINISHED")
    return report.path
