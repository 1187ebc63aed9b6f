"""What a re-run would do: every task of the current config, cached, partial, failed or
pending, worked out from the work dir alone (the stored results, outputs and checkpoints)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aemnist import plan
from aemnist.caching import stage_key
from aemnist.data import verified_tables
from aemnist.datasets import dataset_spec
from aemnist.layout import Layout
from aemnist.records import check_record
from aemnist.schemas import TableError, recorded_ref


@dataclass(frozen=True)
class TaskStatus:
    stage: str
    label: str
    state: str  # done | cached | partial | failed | pending
    detail: str = ""
    key: str = ""  # its cache key, once the results it reads are known


def _checkpoint_epoch(job: Any, key: str) -> int | None:
    path = getattr(job, "checkpoint", None)
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(io.BytesIO(path.read_bytes()), weights_only=True, map_location="cpu")
    except Exception:
        return None
    return len(state["history"]) if state.get("key") == key else None


def _our_record(path: Path) -> bool:
    """A result record a re-run would reuse: present and in our own format (a foreign one,
    a planted pickle say, is refused and its task recomputed)."""
    try:
        check_record(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True


def _task_status(
    stage: str, job: Any, layout: Layout, failed_keys: set[str]
) -> tuple[TaskStatus, Any]:
    """One task's state, and its result when it is stored and reusable (else None)."""
    key = stage_key(stage, job)
    outputs = plan.STAGES[stage].writes(job)
    stored = _our_record(layout.cache_dir / key)
    refs = [recorded_ref(path, key) for path in outputs]
    if stored and all(ref is not None for ref in refs):
        result = plan.task_result(job, refs)
        return TaskStatus(stage, job.label, "cached", "a re-run reuses it", key), result
    epochs = getattr(job, "epochs", 0)
    epoch = _checkpoint_epoch(job, key) if epochs else None
    if epoch:
        row = TaskStatus(stage, job.label, "partial", f"resumes after epoch {epoch}/{epochs}", key)
    elif key in failed_keys:
        row = TaskStatus(stage, job.label, "failed", "its last attempt failed", key)
    elif stored:
        row = TaskStatus(stage, job.label, "pending", "output missing or damaged", key)
    else:
        row = TaskStatus(stage, job.label, "pending", "", key)
    return row, None


def study_status(study: plan.Study, failed_keys: set[str] | None = None) -> list[TaskStatus]:
    """The state of every task of ``study`` in its work dir, in the order the flow runs them.

    A task is ``cached`` when its result is stored under its current key and its outputs
    are intact; the jobs (and keys) of later stages follow from the stored tables of earlier
    ones, through the same declarations (aemnist.plan.STAGES) the flow submits."""
    layout = study.layout
    rows: list[TaskStatus] = []
    results: dict[str, list[Any]] = {}
    for stage in plan.STAGES.values():
        if not all(name in results for name in stage.reads):
            rows += [
                TaskStatus(stage.name, label, "pending", "waits for earlier stages")
                for label in stage.labels(study.config)
            ]
            continue
        if not stage.cached:  # the download: its tables are verified or not
            data = verified_tables(layout.data_dir, layout.dataset)
            rows.append(
                TaskStatus(
                    stage.name,
                    stage.name,
                    "done" if data else "pending",
                    "verified tables present" if data else "",
                )
            )
            if data:
                results[stage.name] = [data]
            continue
        try:
            jobs = stage.jobs(study, results)
        except TableError:  # an earlier table went missing since: nothing after it is known
            rows += [
                TaskStatus(stage.name, label, "pending", "waits for earlier stages")
                for label in stage.labels(study.config)
            ]
            continue
        found = []
        for job in jobs:
            row, result = _task_status(stage.name, job, layout, failed_keys or set())
            rows.append(row)
            found.append(result)
        if all(result is not None for result in found):
            results[stage.name] = found
    return rows


def _on(dataset: str) -> str:
    """The dataset in the status's first line; none for MNIST, as before datasets."""
    return "" if dataset == "mnist" else f" on {dataset_spec(dataset).title}"


def format_status(rows: list[TaskStatus], study: plan.Study) -> str:
    config, layout = study.config, study.layout
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    width = max(len(row.label) for row in rows)
    lines = [
        f"Study {config.profile}{_on(layout.dataset)} (config {config.config_hash()[:12]}) "
        f"in {layout.study_dir}",
        "",
    ]
    lines += [
        f"  {row.stage:<14} {row.label:<{width}}  {row.state:<8} {row.detail}".rstrip()
        for row in rows
    ]
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    will_run = sum(1 for row in rows if row.state in ("partial", "failed", "pending"))
    lines += ["", f"{len(rows)} tasks: {summary}; a re-run computes {will_run}."]
    return "\n".join(lines)
