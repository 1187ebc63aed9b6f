"""What every task shares: the tags that link an MLflow run to its Prefect run."""

from __future__ import annotations

from prefect.runtime import flow_run, task_run


def prefect_tags() -> dict[str, str]:
    tags = {}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)
    if task_run.id:
        tags["prefect.task_run_id"] = str(task_run.id)
        tags["prefect.task_run_name"] = str(task_run.name)
    return tags
