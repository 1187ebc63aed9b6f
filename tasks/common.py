"""What every task shares: its nested MLflow run, linked to its Prefect task run."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prefect.runtime import flow_run, task_run

from aemnist.schemas import producing
from aemnist.tracking import TaskRun, TrackingContext
from aemnist.tracking import task_run as mlflow_task_run
from tasks.caching import current_key


def prefect_tags() -> dict[str, str]:
    tags = {}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
    if task_run.id:
        tags["prefect.task_run_id"] = str(task_run.id)
        tags["prefect.task_run_name"] = str(task_run.name)
    worker = dask_worker()
    if worker:
        tags["dask.worker"] = worker
    return tags


def dask_worker() -> str | None:
    """The address of the Dask worker running this task (None outside Dask): which machine
    and process trained a fold shows on its MLflow run."""
    if "distributed" not in sys.modules:  # no Dask in this process; importing it costs 0.4 s
        return None
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:  # not inside a Dask worker
        return None


@contextmanager
def tracked_run(
    ctx: TrackingContext, name: str, params: Mapping[str, Any], stage: str
) -> Iterator[TaskRun]:
    """The task's nested run: tagged with its stage, its cache key and its Prefect run."""
    tags = {"stage": stage, **prefect_tags()}
    key = current_key()
    if key:
        tags["aemnist.task_key"] = key
    # Outputs written inside record this task's key: a later run can tell them from the
    # same files written under another config.
    with mlflow_task_run(ctx, name, params, tags) as run, producing(key):
        yield run
