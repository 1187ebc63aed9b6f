"""Aggregation stages: Table 1 with the best optimiser settings, Table 2 with the best size."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task

from aemnist.jobs import SummaryJob
from aemnist.schemas import TableRef, read_frame, write_table
from aemnist.summaries import grid_summary, score_column, sweep_summary
from aemnist.tracking import TrackingContext
from tasks.caching import StageCache
from tasks.common import tracked_run


@task(
    name="grid-summary",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="grid-summary"),
    persist_result=True,
)
def summarise_grid(ctx: TrackingContext, job: SummaryJob) -> TableRef:
    """Table 1, ranked by mean validation loss: its first row is the best (learning rate,
    weight decay)."""
    with tracked_run(ctx, job.label, {"tasks": len(job.histories)}, job.stage) as run:
        frames = [read_frame(ref.path, "grid_history") for ref in job.histories]
        if job.repeats:  # a repeated grid: each history's seed, from the job
            frames = [f.assign(repeat=r) for f, r in zip(frames, job.repeats, strict=True)]
        table = grid_summary(pd.concat(frames, ignore_index=True))
        ref = write_table(table, job.layout.grid_summary, "grid_summary")
        best = table.iloc[0]
        run.log_metrics(
            {"best_val_loss": best.val_loss_mean, "best_train_loss": best.train_loss_mean}
        )
        run.set_tags({"best_lr": f"{best.lr:g}", "best_weight_decay": f"{best.weight_decay:g}"})
        run.log_artifact(ref.path, "tables")
    get_run_logger().info(
        "Table 1: best lr %g, weight decay %g, validation loss %.6f",
        best.lr,
        best.weight_decay,
        best.val_loss_mean,
    )
    return ref.with_run(run.run_id)


@task(
    name="sweep-summary",
    task_run_name="{job.label}",
    cache_policy=StageCache(stage="sweep-summary"),
    persist_result=True,
)
def summarise_sweep(ctx: TrackingContext, job: SummaryJob) -> TableRef:
    """Table 2, ranked by the mean loss of the last epochs: its first row is the best size."""
    with tracked_run(ctx, job.label, {"tasks": len(job.histories)}, job.stage) as run:
        frames = [read_frame(ref.path, "sweep_history") for ref in job.histories]
        table = sweep_summary(pd.concat(frames, ignore_index=True), job.score_last)
        ref = write_table(table, job.layout.sweep_summary, "sweep_summary")
        score = score_column(table)
        for row in table.itertuples():
            run.log_metrics({score: getattr(row, score)}, step=int(row.size))
        best = table.iloc[0]
        run.set_tags({"best_size": str(int(best["size"]))})
        run.log_artifact(ref.path, "tables")
    get_run_logger().info("Table 2: best size %d, %s %.6f", best["size"], score, best[score])
    return ref.with_run(run.run_id)
