"""What a re-run would do: every task of the current config, cached, partial, failed or
pending, worked out from the work dir alone (the stored results, outputs and checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aemnist import plan
from aemnist.caching import stage_key
from aemnist.config import StudyConfig
from aemnist.data import verified_tables
from aemnist.layout import Layout
from aemnist.schemas import TableError, read_frame, recorded_ref


@dataclass(frozen=True)
class TaskStatus:
    stage: str
    label: str
    state: str  # done | cached | partial | failed | pending
    detail: str = ""


def _checkpoint_epoch(path: Path, key: str) -> int | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        return None
    return len(state["history"]) if state.get("key") == key else None


class _Walker:
    def __init__(self, layout: Layout, failed_keys: set[str]) -> None:
        self.layout = layout
        self.failed_keys = failed_keys
        self.rows: list[TaskStatus] = []

    def task(self, stage: str, label: str, inputs: dict[str, Any] | None, epochs: int = 0) -> bool:
        """Record one task's state; True if its result is stored and reusable."""
        if inputs is None:
            self.rows.append(TaskStatus(stage, label, "pending", "waits for earlier stages"))
            return False
        key = stage_key(stage, inputs)
        outputs = plan.outputs(stage, inputs)
        stored = (self.layout.cache_dir / key).exists()
        intact = all(recorded_ref(path, key) is not None for path in outputs)
        if stored and intact:
            self.rows.append(TaskStatus(stage, label, "cached", "a re-run reuses it"))
            return True
        epoch = _checkpoint_epoch(self.layout.checkpoint(label), key) if epochs else None
        if epoch:
            self.rows.append(
                TaskStatus(stage, label, "partial", f"resumes after epoch {epoch}/{epochs}")
            )
        elif key in self.failed_keys:
            self.rows.append(TaskStatus(stage, label, "failed", "its last attempt failed"))
        elif stored:
            self.rows.append(TaskStatus(stage, label, "pending", "output missing or damaged"))
        else:
            self.rows.append(TaskStatus(stage, label, "pending"))
        return False

    def ref(self, stage: str, inputs: dict[str, Any], index: int = 0) -> Any:
        return recorded_ref(plan.outputs(stage, inputs)[index], stage_key(stage, inputs))


def study_status(
    config: StudyConfig, layout: Layout, failed_keys: set[str] | None = None
) -> list[TaskStatus]:
    """The state of every task of ``config`` in ``layout``, in the order the flow runs them.

    A task is ``cached`` when its result is stored under its current key and its outputs
    are intact; the keys of later tasks follow from the stored tables of earlier ones."""
    walk = _Walker(layout, failed_keys or set())
    data = verified_tables(layout.data_dir)
    walk.rows.append(
        TaskStatus(
            "download",
            "download",
            "done" if data else "pending",
            "verified tables present" if data else "",
        )
    )
    train = data["train"] if data else None
    test = data["test"] if data else None

    folds_in = plan.folds_inputs(config, layout, train) if train else None
    folds = walk.ref("folds", folds_in) if walk.task("folds", "folds", folds_in) else None

    histories = []
    for label, lr, wd, fold in plan.grid_labels(config):
        inputs = plan.grid_inputs(config, layout, train, folds, lr, wd, fold) if folds else None
        if walk.task("grid", label, inputs, config.grid.epochs):
            histories.append(walk.ref("grid", inputs))
    best = None
    if len(histories) == len(plan.grid_labels(config)):
        inputs = plan.grid_summary_inputs(layout, histories)
        if walk.task("grid-summary", "grid summary", inputs):
            best = walk.ref("grid-summary", inputs)
    else:
        walk.task("grid-summary", "grid summary", None)
    lr = wd = None
    if best is not None:
        try:
            top = read_frame(best.path, "grid_summary").iloc[0]
            lr, wd = float(top.lr), float(top.weight_decay)
        except TableError:
            pass

    histories = []
    for label, size, repeat in plan.sweep_labels(config):
        inputs = (
            plan.sweep_inputs(config, layout, train, test, size, lr, wd, repeat)
            if lr is not None
            else None
        )
        if walk.task("sweep", label, inputs, config.sweep.epochs):
            histories.append(walk.ref("sweep", inputs))
    size = summary = None
    if len(histories) == len(plan.sweep_labels(config)):
        inputs = plan.sweep_summary_inputs(config, layout, histories)
        if walk.task("sweep-summary", "sweep summary", inputs):
            summary = walk.ref("sweep-summary", inputs)
            best_size = int(read_frame(summary.path, "sweep_summary").iloc[0]["size"])
            size = plan.final_size(config, best_size)
    else:
        walk.task("sweep-summary", "sweep summary", None)

    model = None
    finals = []
    if size is not None:
        for label, repeat in plan.final_labels(config, size):
            inputs = plan.final_inputs(config, layout, train, test, size, lr, wd, repeat)
            if walk.task("final", label, inputs, config.final.epochs):
                finals.append(walk.ref("final", inputs))
        if len(finals) == config.sweep.repeats:
            model = finals[0]
    else:
        walk.task("final", "final", None)

    evaluations = []
    for stage, make in (
        ("corruption", plan.corruption_inputs),
        ("embedding", plan.embedding_inputs),
    ):
        inputs = make(config, layout, test, model) if model is not None else None
        if walk.task(stage, stage, inputs):
            evaluations.append(walk.ref(stage, inputs))
    if model is not None and len(evaluations) == 2:
        tables = [best, summary, *finals, *evaluations]
        walk.task("report", "report", plan.report_inputs(config, layout, tables))
    else:
        walk.task("report", "report", None)
    return walk.rows


def format_status(rows: list[TaskStatus], config: StudyConfig, layout: Layout) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    width = max(len(row.label) for row in rows)
    lines = [
        f"Study {config.profile} (config {config.config_hash()[:12]}) in {layout.root}",
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
