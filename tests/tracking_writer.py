"""What each spawned process of tests/test_caching.py runs: a task run logging 100 epochs.

A module of its own so that a spawned child imports only this and aemnist.tracking (MLflow,
3.8 s here) and not the test module (torch, Prefect and the rest: 7.5 s): eight children
share two cores."""

from __future__ import annotations

from aemnist.tracking import TrackingContext, task_run


def log_from_process(uri: str, experiment_id: str, parent: str, index: int) -> None:
    ctx = TrackingContext(uri, experiment_id, parent)
    with task_run(ctx, f"process {index}") as run:
        for step in range(1, 101):
            run.log_metrics({"loss": 1.0 / step}, step=step)
