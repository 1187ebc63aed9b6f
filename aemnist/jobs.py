"""Typed jobs: everything one task computes from, in one frozen value.

A task takes one job. Its label (the Prefect task run name and the MLflow run name), its
checkpoint, its MLflow parameters and its cache key (aemnist.caching.stage_key, over every
field) all come from the job, so they cannot disagree. aemnist.plan builds the jobs of each
stage from the config and the results of the stages before it.

Light on purpose (no torch, pandas or pyarrow at import): `aemnist run` reads the stage
declarations before its heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aemnist.layout import Layout

if TYPE_CHECKING:
    from aemnist.config import (
        CorruptionConfig,
        EmbeddingConfig,
        StudyConfig,
        TrainingConfig,
    )
    from aemnist.machine_slots import MachineSlots
    from aemnist.schemas import TableRef
    from aemnist.training import TrainingOptions


def size_label(stage: str, size: int, repeat: int = 0) -> str:
    """A sweep or final task's name; repeat 0 keeps the single-seed name."""
    return f"{stage} size={size}" + (f" repeat={repeat}" if repeat else "")


def grid_label(lr: float, weight_decay: float, fold: int, repeat: int = 0) -> str:
    """A grid task's name; repeat 0 keeps the single-seed name."""
    return f"grid lr={lr:g} wd={weight_decay:g} fold={fold}" + (
        f" repeat={repeat}" if repeat else ""
    )


def group_label(fold: int, part: int, parts: int) -> str:
    """A stacked grid task's name: its fold and which of the fold's groups it is."""
    return f"grid fold={fold} stack {part}/{parts}"


def sweep_group_label(part: int, parts: int) -> str:
    """A stacked sweep task's name: which of the sweep's groups it is."""
    return f"sweep stack {part}/{parts}"


@dataclass(frozen=True)
class TableUse:
    """A stage table a task reads and the split it takes from it: logged as a dataset input
    of the task's MLflow run (aemnist.tracking.TaskRun.log_inputs), by the table's SHA-256."""

    table: TableRef
    schema: str  # its schema's name in aemnist.schemas
    context: str  # the split: "training", "test", "cross-validation fold 1", ...
    limit: int = 0  # the rows read (the profile's data limit); 0: all

    @property
    def name(self) -> str:
        """The dataset's name in MLflow: the table's file name less its suffix."""
        return Path(self.table.path).stem


def _split_uses(job: SizeJob) -> list[TableUse]:
    """The tables a sweep or final task reads: the training images (less the held-out
    validation images, when the sweep selects on them) and the test images, which a sweep
    task scores on only when it selects on the test set."""
    held_out = job.selection == "validation"
    training = "training"
    if held_out:
        training += f" ({job.validation_images} held out for validation)"
    uses = [TableUse(job.train, "mnist", training, job.train_limit)]
    if job.stage == "final" or not held_out:
        uses.append(TableUse(job.test, "mnist", "test", job.test_limit))
    return uses


@dataclass(frozen=True)
class DownloadJob:
    layout: Layout
    mirror: str | None
    force: bool  # fetch again even when the tables are verified (--refresh download)

    label = "download"


@dataclass(frozen=True)
class FoldsJob:
    layout: Layout
    train: TableRef
    train_limit: int
    k: int
    seed: int

    label = "folds"


@dataclass(frozen=True)
class Compute:
    """Where and how a training or evaluation task computes: part of its key, since the
    device, the torch threads (CPU sums are split by thread) and the speed options each
    change the last digits of what it computes."""

    device: str
    threads: int
    options: TrainingOptions
    # The machine's training-slot limit a training task holds one slot of: a Prefect global
    # concurrency limit's name (shared by the studies on one server), the machine's slot
    # lock files (aemnist.machine_slots), or None: the study's own task runner bounds it.
    # Where it waits, not what it computes: no part of the key.
    slots: str | MachineSlots | None = field(default=None, metadata={"key": False})


@dataclass(frozen=True)
class FoldJob:
    """One cell of the grid search: train on every fold but ``fold``, validate on it."""

    layout: Layout
    train: TableRef
    folds: TableRef
    train_limit: int
    lr: float
    weight_decay: float
    fold: int
    size: int
    epochs: int
    training: TrainingConfig
    seed: int
    compute: Compute
    # Which seed (0: the study's own). Keyed only when not 0, so that a study without
    # repeats keeps the cache keys it had before the grid repeated.
    repeat: int = field(default=0, metadata={"key": "unless-default"})

    stage = "grid"

    @property
    def label(self) -> str:
        return grid_label(self.lr, self.weight_decay, self.fold, self.repeat)

    @property
    def checkpoint(self) -> Path:
        return self.layout.checkpoint(self.label)

    @property
    def output(self) -> Path:
        return self.layout.grid_history(self.lr, self.weight_decay, self.fold, self.repeat)

    @property
    def fault_key(self) -> dict[str, Any]:
        """What an AEMNIST_FAULT spec matches on (aemnist.faults)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "fold": self.fold}

    def inputs(self) -> list[TableUse]:
        """The tables it reads: the training images, split by the fold assignment into the
        folds it trains on and the fold it validates on (``fold``)."""
        context = f"cross-validation fold {self.fold}"
        return [
            TableUse(self.train, "mnist", context, self.train_limit),
            TableUse(self.folds, "folds", context),
        ]

    def params(self) -> dict[str, Any]:
        """The MLflow parameters of its run."""
        return {
            "stage": self.stage,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "fold": self.fold,
            "repeat": self.repeat,
            "size": self.size,
            "epochs": self.epochs,
            "batch_size": self.training.batch_size,
            "seed": self.seed,
            "device": self.compute.device,
        }


@dataclass(frozen=True)
class _CellGroup:
    """Cells of one training stage trained at once as one batched model (aemnist.stacked),
    in one task: ``runtime.stacked_cells`` > 1. Each cell keeps its own label (its MLflow
    run's name), history table and parameters; the group has one checkpoint and one cache
    entry, keyed by its cells."""

    cells: tuple[Any, ...]
    # Which group (1-based) and of how many: its name only.
    part: int = field(default=1, metadata={"key": False})
    parts: int = field(default=1, metadata={"key": False})

    def _check_shared(self, shared: set[Any], what: str) -> None:
        # The task trains every cell from the first one's tables and settings.
        if len(shared) != 1:
            raise ValueError(f"a stacked group holds cells of {what}")

    @property
    def stage(self) -> str:
        return self.cells[0].stage

    @property
    def compute(self) -> Compute:
        return self.cells[0].compute

    @property
    def epochs(self) -> int:
        return self.cells[0].epochs

    @property
    def checkpoint(self) -> Path:
        return self.cells[0].layout.checkpoint(self.label)

    @property
    def label(self) -> str:
        raise NotImplementedError

    @property
    def outputs(self) -> list[Path]:
        return [cell.output for cell in self.cells]

    def params(self) -> dict[str, Any]:
        """What each cell's MLflow run records of the group it trained in."""
        return {"stacked_with": len(self.cells), "stack": self.label}


@dataclass(frozen=True)
class FoldGroupJob(_CellGroup):
    """Grid cells of one fold trained at once."""

    cells: tuple[FoldJob, ...]

    def __post_init__(self) -> None:
        self._check_shared(
            {
                (c.train, c.folds, c.train_limit, c.fold, c.size, c.epochs, c.training, c.seed)
                for c in self.cells
            },
            "one fold, tables, size, epoch count, training settings and seed",
        )

    @property
    def first(self) -> FoldJob:
        return self.cells[0]

    @property
    def label(self) -> str:
        return group_label(self.first.fold, self.part, self.parts)


@dataclass(frozen=True)
class SizeGroupJob(_CellGroup):
    """Sizes (and seeds) of the sweep trained at once, the narrower codes padded to the
    widest: each with its own learning-rate schedule."""

    cells: tuple[SizeJob, ...]

    def __post_init__(self) -> None:
        self._check_shared(
            {
                (
                    c.stage,
                    c.train,
                    c.test,
                    c.train_limit,
                    c.test_limit,
                    c.lr,
                    c.weight_decay,
                    c.epochs,
                    c.plateau_patience,
                    c.selection,
                    c.validation_images,
                    c.training,
                    c.seed,
                )
                for c in self.cells
            },
            "the sweep with one learning rate, weight decay, epoch count, schedule, "
            "selection, training settings and seed",
        )
        if self.cells[0].stage != "sweep":
            raise ValueError("only the sweep's sizes train stacked")

    @property
    def first(self) -> SizeJob:
        return self.cells[0]

    @property
    def label(self) -> str:
        return sweep_group_label(self.part, self.parts)


@dataclass(frozen=True)
class SizeJob:
    """Training at one encoding size on the whole training set: a sweep task or a final
    model (``stage``), one seed (``repeat``)."""

    stage: str  # "sweep" or "final"
    layout: Layout
    train: TableRef
    test: TableRef
    train_limit: int
    test_limit: int
    size: int
    repeat: int
    lr: float
    weight_decay: float
    epochs: int
    plateau_patience: int
    selection: str
    validation_images: int
    training: TrainingConfig
    seed: int
    compute: Compute

    @property
    def label(self) -> str:
        return size_label(self.stage, self.size, self.repeat)

    @property
    def checkpoint(self) -> Path:
        return self.layout.checkpoint(self.label)

    @property
    def output(self) -> Path:
        """A sweep task's history table (a final task writes the files plan.STAGES names)."""
        return self.layout.sweep_history(self.size, self.repeat)

    @property
    def fault_key(self) -> dict[str, Any]:
        return {"size": self.size}

    def inputs(self) -> list[TableUse]:
        return _split_uses(self)

    def params(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "size": self.size,
            "repeat": self.repeat,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "epochs": self.epochs,
            "plateau_patience": self.plateau_patience,
            "selection": self.selection,
            "batch_size": self.training.batch_size,
            "seed": self.seed,
            "device": self.compute.device,
        }


@dataclass(frozen=True)
class SummaryJob:
    """An aggregation over every history of a training stage (Table 1 or Table 2)."""

    stage: str  # "grid-summary" or "sweep-summary"
    layout: Layout
    histories: tuple[TableRef, ...]
    score_last: int = 0  # Table 2: the last epochs a size is scored on
    # Table 1: the repeat (seed) of each history, in order; empty when the grid ran once (its
    # histories carry no repeat column). Keyed only when given, as FoldJob.repeat.
    repeats: tuple[int, ...] = field(default=(), metadata={"key": "unless-default"})

    @property
    def label(self) -> str:
        return self.stage.replace("-", " ")


@dataclass(frozen=True)
class CorruptionJob:
    layout: Layout
    test: TableRef
    test_limit: int
    model: TableRef
    corruption: CorruptionConfig
    training: TrainingConfig
    seed: int
    compute: Compute

    label = "corruption"


@dataclass(frozen=True)
class EmbeddingJob:
    layout: Layout
    test: TableRef
    test_limit: int
    model: TableRef
    embedding: EmbeddingConfig
    seed: int
    compute: Compute

    label = "embedding"


@dataclass(frozen=True)
class ReportJob:
    config: StudyConfig
    layout: Layout
    tables: tuple[TableRef, ...]

    label = "report"


Job = (
    DownloadJob
    | FoldsJob
    | FoldJob
    | FoldGroupJob
    | SizeJob
    | SizeGroupJob
    | SummaryJob
    | CorruptionJob
    | EmbeddingJob
    | ReportJob
)
