"""The study's pipeline: every stage declared once.

A stage is one ``Stage`` entry in ``STAGES``: its name, the stages it reads, the tables and
files its tasks write (with their schemas), the library modules whose code keys its cache,
and how its jobs follow from the config and the results of the stages it reads. The flow
(flows/study.py) submits one task per job in this order; ``aemnist status``, ``--refresh``,
the cache keys (aemnist.caching) and the report's file list read the same entries. Adding a
stage is one entry here, its library function and its task wrapper (tasks/).

Results travel as the stages hand them on: each job's task returns a TableRef (the download:
the train and test tables); a stage's jobs read the refs of the stages it names in
``reads``, and the values inside them (the best learning rate, the best size) from the
tables themselves, so that the flow and ``aemnist status`` derive them alike.

Light on purpose: `aemnist run` reads ``STAGES`` before it imports torch or pyarrow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aemnist.jobs import (
    Compute,
    CorruptionJob,
    DownloadJob,
    EmbeddingJob,
    FoldGroupJob,
    FoldJob,
    FoldsJob,
    Job,
    ReportJob,
    SizeGroupJob,
    SizeJob,
    SummaryJob,
    grid_label,
    group_label,
    size_label,
    sweep_group_label,
)
from aemnist.layout import Layout

if TYPE_CHECKING:
    from aemnist.config import StudyConfig
    from aemnist.machine_slots import MachineSlots
    from aemnist.schemas import TableRef
    from aemnist.training import TrainingOptions

# What each stage's tasks returned, in job order: stage name -> results.
Results = Mapping[str, Sequence[Any]]


@dataclass(frozen=True)
class Study:
    """A study resolved once (aemnist.runtime.resolve_study): its validated config with the
    device resolved, where it runs, and the task slots and torch threads that follow."""

    config: StudyConfig
    layout: Layout
    workers: int  # tasks side by side in a fan-out
    threads: int  # torch threads of each of them
    final_threads: int  # of a final task: every core when it runs alone
    options: TrainingOptions
    mirror: str | None = None
    redo: frozenset[str] = frozenset()  # stages to recompute (--fresh, --refresh)
    slots: str | MachineSlots | None = None  # the training slots studies share (Compute.slots)

    def compute(self, threads: int | None = None) -> Compute:
        device = self.config.runtime.device
        return Compute(device, threads or self.threads, self.options, self.slots)


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    # The tables its tasks write, by schema (aemnist.schemas.SCHEMAS); other files beside.
    tables: tuple[str, ...]
    # The library modules its task calls: their code, and that of every aemnist module they
    # import, keys its cache (aemnist.caching.code_version).
    library: tuple[str, ...]
    # Its jobs, from the study and the results of the stages it reads.
    jobs: Callable[[Study, Results], list[Job]]
    # The files one job writes: checked before its result is reused.
    writes: Callable[[Any], list[Path]]
    # Its task names before the stages it reads have run (what `aemnist status` lists).
    labels: Callable[[StudyConfig], list[str]]
    # Keyed and reused through Prefect's cache; the download checks its own tables instead.
    cached: bool = True


def resolve_study(
    config: StudyConfig,
    workdir: Path,
    mirror: str | None = None,
    redo: frozenset[str] = frozenset(),
    options: TrainingOptions | None = None,
) -> Study:
    """The one resolution every launch path goes through (the CLI, a deployment, a Dask
    run): the device, the task slots of a fan-out and the torch threads of each task, from
    the validated config and this machine."""
    # Imported here: they import torch, which reading the declarations must not.
    from aemnist.runtime import cpu_count, parallel_workers, threads_per_task, with_resolved_device
    from aemnist.training import DEFAULT_OPTIONS

    config = with_resolved_device(config)
    runtime = config.runtime
    workers = parallel_workers(runtime.workers, runtime.device, runtime.gpu_concurrency)
    threads = threads_per_task(workers)
    return Study(
        config=config,
        layout=Layout(workdir.resolve(), config.data.dataset, config.runtime.storage),
        workers=workers,
        threads=threads,
        # A single final task gets every core; several (repeats) share them as the sweep does.
        final_threads=cpu_count() if config.sweep.repeats == 1 else threads,
        options=options or DEFAULT_OPTIONS,
        mirror=mirror,
        redo=redo,
    )


# --- how jobs follow from the config and earlier results ------------------------------------


def _mnist(results: Results) -> tuple[TableRef, TableRef]:
    tables = results["download"][0]
    return tables["train"], tables["test"]


def grid_cells(config: StudyConfig) -> list[tuple[float, float, int, int]]:
    """(lr, weight decay, fold, repeat) of every grid task; with one repeat, in the order
    the grid had before it repeated."""
    return [
        (lr, wd, fold, repeat)
        for lr in config.grid.learning_rates
        for wd in config.grid.weight_decays
        for fold in range(config.grid.folds)
        for repeat in range(config.grid.repeats)
    ]


def sweep_cells(config: StudyConfig) -> list[tuple[int, int]]:
    """(size, repeat) of every sweep task."""
    return [(size, repeat) for size in config.sweep.sizes for repeat in range(config.sweep.repeats)]


def best_settings(grid_summary: TableRef) -> tuple[float, float]:
    """Table 1's best learning rate and weight decay."""
    from aemnist.schemas import read_frame

    top = read_frame(grid_summary.path, "grid_summary").iloc[0]
    return float(top.lr), float(top.weight_decay)


def best_size(sweep_summary: TableRef) -> int:
    """Table 2's best encoding size."""
    from aemnist.schemas import read_frame

    return int(read_frame(sweep_summary.path, "sweep_summary").iloc[0]["size"])


def final_size(config: StudyConfig, best: int) -> int:
    """The final model's encoding size: final.size when set, else the sweep's best."""
    return config.final.size or best


def _download(study: Study, results: Results) -> list[Job]:
    return [DownloadJob(study.layout, study.mirror, force="download" in study.redo)]


def _folds(study: Study, results: Results) -> list[Job]:
    c = study.config
    train, _ = _mnist(results)
    return [FoldsJob(study.layout, train, c.data.train_limit, c.grid.folds, c.seed)]


@dataclass(frozen=True)
class StackedGroup:
    """Grid cells trained at once in one task: the ``part``-th of ``parts`` groups of
    their fold."""

    cells: list[tuple[float, float, int, int]]
    part: int
    parts: int

    @property
    def label(self) -> str:
        return group_label(self.cells[0][2], self.part, self.parts)


def even_groups(cells: Sequence[Any], most: int) -> list[list[Any]]:
    """``cells`` in order, split into as few groups of at most ``most`` as hold them, their
    sizes as even as can be."""
    parts = -(-len(cells) // most)
    step, extra = divmod(len(cells), parts)
    groups, start = [], 0
    for part in range(parts):
        end = start + step + (part < extra)
        groups.append(list(cells[start:end]))
        start = end
    return groups


def stacked_groups(config: StudyConfig) -> list[StackedGroup]:
    """The grid's cells as ``runtime.stacked_cells`` groups them: the cells of each fold (in
    ``grid_cells`` order; one fold's cells train on equally many images), split into as few
    groups of at most that many cells as hold them, their sizes as even as can be. Fixed by
    the config alone: a cell's float rounding may depend on the group it trains in, so a
    re-run groups it as before."""
    groups = []
    every = grid_cells(config)
    for fold in range(config.grid.folds):
        split = even_groups([c for c in every if c[2] == fold], config.runtime.stacked_cells)
        groups += [StackedGroup(cells, i, len(split)) for i, cells in enumerate(split, start=1)]
    return groups


def sweep_groups(config: StudyConfig) -> list[list[tuple[int, int]]]:
    """The sweep's (size, repeat) cells as ``runtime.stacked_cells`` groups them, in
    ``sweep_cells`` order (all train on the same images), as ``stacked_groups`` does."""
    return even_groups(sweep_cells(config), config.runtime.stacked_cells)


def _grid_labels(config: StudyConfig) -> list[str]:
    if config.runtime.stacked_cells == 1:
        return [grid_label(*cell) for cell in grid_cells(config)]
    return [group.label for group in stacked_groups(config)]


def _grid(study: Study, results: Results) -> list[Job]:
    c = study.config
    train, _ = _mnist(results)
    (folds,) = results["folds"]

    def cell_job(lr: float, wd: float, fold: int, repeat: int) -> FoldJob:
        return FoldJob(
            study.layout, train, folds, c.data.train_limit, lr, wd, fold, c.grid.size,
            c.grid.epochs, c.training, c.seed, study.compute(), repeat,
        )  # fmt: skip

    if c.runtime.stacked_cells == 1:
        return [cell_job(*cell) for cell in grid_cells(c)]
    return [
        FoldGroupJob(tuple(cell_job(*cell) for cell in group.cells), group.part, group.parts)
        for group in stacked_groups(c)
    ]


def grid_histories(config: StudyConfig, results: Results) -> list[TableRef]:
    """The grid stage's history tables, one a cell, in ``grid_cells`` order: as its tasks
    returned them, or, when they trained stacked, from each group's tables by cell label."""
    if config.runtime.stacked_cells == 1:
        return list(results["grid"])
    by_label = {label: ref for group in results["grid"] for label, ref in group.items()}
    return [by_label[grid_label(*cell)] for cell in grid_cells(config)]


def _grid_writes(job: FoldJob | FoldGroupJob) -> list[Path]:
    return job.outputs if isinstance(job, FoldGroupJob) else [job.output]


def task_result(job: Job, refs: Sequence[TableRef]) -> Any:
    """What ``job``'s task returns, from the refs of the files it wrote (its stage's
    ``writes``, in order): a stacked group's tables by cell label, else the first file's."""
    if isinstance(job, (FoldGroupJob, SizeGroupJob)):
        return {cell.label: ref for cell, ref in zip(job.cells, refs, strict=True)}
    return refs[0]


def _size_job(
    study: Study, results: Results, stage: str, size: int, repeat: int, epochs: int, threads: int
) -> SizeJob:
    c = study.config
    train, test = _mnist(results)
    lr, wd = best_settings(results["grid-summary"][0])
    return SizeJob(
        stage, study.layout, train, test, c.data.train_limit, c.data.test_limit, size, repeat,
        lr, wd, epochs, c.sweep.plateau_patience, c.sweep.selection, c.sweep.validation_images,
        c.training, c.seed, study.compute(threads),
    )  # fmt: skip


def _sweep(study: Study, results: Results) -> list[Job]:
    c = study.config

    def size_job(size: int, repeat: int) -> SizeJob:
        return _size_job(study, results, "sweep", size, repeat, c.sweep.epochs, study.threads)

    if c.runtime.stacked_cells == 1:
        return [size_job(*cell) for cell in sweep_cells(c)]
    groups = sweep_groups(c)
    return [
        SizeGroupJob(tuple(size_job(*cell) for cell in cells), part, len(groups))
        for part, cells in enumerate(groups, start=1)
    ]


def _sweep_labels(config: StudyConfig) -> list[str]:
    if config.runtime.stacked_cells == 1:
        return [size_label("sweep", *cell) for cell in sweep_cells(config)]
    groups = sweep_groups(config)
    return [sweep_group_label(part, len(groups)) for part in range(1, len(groups) + 1)]


def sweep_histories(config: StudyConfig, results: Results) -> list[TableRef]:
    """The sweep stage's history tables, one a (size, repeat), in ``sweep_cells`` order, as
    ``grid_histories`` gives the grid's."""
    if config.runtime.stacked_cells == 1:
        return list(results["sweep"])
    by_label = {label: ref for group in results["sweep"] for label, ref in group.items()}
    return [by_label[size_label("sweep", *cell)] for cell in sweep_cells(config)]


def _sweep_writes(job: SizeJob | SizeGroupJob) -> list[Path]:
    return job.outputs if isinstance(job, SizeGroupJob) else [job.output]


def _final(study: Study, results: Results) -> list[Job]:
    """One final model per seed, side by side; the evaluations use repeat 0's."""
    c = study.config
    size = final_size(c, best_size(results["sweep-summary"][0]))
    return [
        _size_job(study, results, "final", size, repeat, c.final.epochs, study.final_threads)
        for repeat in range(c.sweep.repeats)
    ]


def _grid_summary(study: Study, results: Results) -> list[Job]:
    c = study.config
    # Each history's repeat, from the job order (the histories carry no repeat column, so
    # that a study without repeats writes the tables it wrote before).
    repeats = tuple(cell[3] for cell in grid_cells(c)) if c.grid.repeats > 1 else ()
    histories = tuple(grid_histories(c, results))
    return [SummaryJob("grid-summary", study.layout, histories, repeats=repeats)]


def _sweep_summary(study: Study, results: Results) -> list[Job]:
    return [
        SummaryJob(
            "sweep-summary",
            study.layout,
            tuple(sweep_histories(study.config, results)),
            study.config.sweep.score_last,
        )
    ]


def _corruption(study: Study, results: Results) -> list[Job]:
    c = study.config
    _, test = _mnist(results)
    model = results["final"][0]
    return [
        CorruptionJob(
            study.layout,
            test,
            c.data.test_limit,
            model,
            c.corruption,
            c.training,
            c.seed,
            study.compute(),
        )  # fmt: skip
    ]


def _embedding(study: Study, results: Results) -> list[Job]:
    c = study.config
    _, test = _mnist(results)
    model = results["final"][0]
    return [
        EmbeddingJob(
            study.layout, test, c.data.test_limit, model, c.embedding, c.seed, study.compute()
        )
    ]


def _report(study: Study, results: Results) -> list[Job]:
    tables = [
        *results["grid-summary"],
        *results["sweep-summary"],
        *results["final"],
        *results["corruption"],
        *results["embedding"],
    ]
    c = study.config
    if c.grid.repeats > 1 or c.sweep.repeats > 1:
        # Several seeds: the report reads each seed's own best from the histories.
        tables += [*grid_histories(c, results), *sweep_histories(c, results)]
    return [ReportJob(study.config, study.layout, tuple(tables))]


def _report_files(job: ReportJob) -> list[Path]:
    # The figure names are the report's own (aemnist.report.FIGURES); imported here, when a
    # job exists, so that reading the declarations needs no pandas.
    from aemnist.report import report_figures

    return [job.layout.report, job.layout.report_run, *report_figures(job.layout)]


def _one(label: str) -> Callable[[StudyConfig], list[str]]:
    return lambda config: [label]


# --- the declaration ---------------------------------------------------------------------

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "download", (), ("mnist",), ("aemnist.data",), _download,
            writes=lambda job: [job.layout.train_table, job.layout.test_table],
            labels=_one("download"), cached=False,
        ),
        Stage(
            "folds", ("download",), ("folds",), ("aemnist.data",), _folds,
            writes=lambda job: [job.layout.folds], labels=_one("folds"),
        ),
        Stage(
            "grid", ("download", "folds"), ("grid_history",),
            ("aemnist.training", "aemnist.stacked"), _grid, writes=_grid_writes,
            labels=_grid_labels,
        ),
        Stage(
            "grid-summary", ("grid",), ("grid_summary",), ("aemnist.summaries", "aemnist.schemas"),
            _grid_summary, writes=lambda job: [job.layout.grid_summary],
            labels=_one("grid summary"),
        ),
        Stage(
            "sweep", ("download", "grid-summary"), ("sweep_history",),
            ("aemnist.training", "aemnist.stacked"), _sweep, writes=_sweep_writes,
            labels=_sweep_labels,
        ),
        Stage(
            "sweep-summary", ("sweep",), ("sweep_summary",),
            ("aemnist.summaries", "aemnist.schemas"),
            _sweep_summary, writes=lambda job: [job.layout.sweep_summary],
            labels=_one("sweep summary"),
        ),
        Stage(
            "final", ("download", "grid-summary", "sweep-summary"), ("sweep_history", "metrics"),
            ("aemnist.training",), _final,
            writes=lambda job: [
                job.layout.final_model_of(job.repeat),
                job.layout.final_history_of(job.repeat),
                job.layout.final_metrics_of(job.repeat),
            ],
            labels=_one("final"),
        ),
        Stage(
            "corruption", ("download", "final"), ("corruption", "corruption_examples"),
            ("aemnist.corruption", "aemnist.model", "aemnist.data"), _corruption,
            writes=lambda job: [job.layout.corruption, job.layout.corruption_examples],
            labels=_one("corruption"),
        ),
        Stage(
            "embedding", ("download", "final"), ("embedding", "metrics"),
            ("aemnist.embedding", "aemnist.model", "aemnist.data"), _embedding,
            writes=lambda job: [job.layout.embedding, job.layout.embedding_metrics],
            labels=_one("embedding"),
        ),
        Stage(
            "report",
            ("grid", "grid-summary", "sweep", "sweep-summary", "final", "corruption", "embedding"),
            (), ("aemnist.report",), _report, writes=_report_files, labels=_one("report"),
        ),
    )
}  # fmt: skip


def waves() -> list[list[Stage]]:
    """The stages in order, grouped so that each group reads only earlier groups: the stages
    of one group (corruption and embedding) run side by side."""
    done: set[str] = set()
    out: list[list[Stage]] = []
    pending = list(STAGES.values())
    while pending:
        ready = [stage for stage in pending if set(stage.reads) <= done]
        if not ready:
            raise ValueError(f"stages {[s.name for s in pending]} read stages never run")
        out.append(ready)
        done |= {stage.name for stage in ready}
        pending = [stage for stage in pending if stage not in ready]
    return out


def downstream(stage: str) -> set[str]:
    """``stage`` and every stage that depends on it, directly or not."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    found = {stage}
    for group in waves():
        for later in group:
            if found.intersection(later.reads):
                found.add(later.name)
    return found


def refreshed_stages(fresh: bool, refresh: Sequence[str] | None) -> frozenset[str]:
    if fresh:
        return frozenset(STAGES)
    out: set[str] = set()
    for stage in refresh or []:
        out |= downstream(stage)
    return frozenset(out)
