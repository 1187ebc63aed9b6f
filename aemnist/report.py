"""The study report: report.md with Tables 1 and 2, figures 1-4 and the seed's numbers beside
ours (seed-report.txt). Reads only stored stage tables, so it can be rebuilt at any time."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from aemnist.config import StudyConfig
from aemnist.corruption import DEFINITIONS
from aemnist.datasets import dataset_spec, has_reference
from aemnist.layout import Layout
from aemnist.plan import grid_cells, sweep_cells
from aemnist.reference import (
    SEED_BEST_LR,
    SEED_BEST_SIZE,
    SEED_BEST_WEIGHT_DECAY,
    SEED_FINAL_SIZE,
    SEED_FINAL_TEST_MSE,
    SEED_TABLE1,
    SEED_TABLE2,
    Target,
    paper_targets,
    same_value,
    seed_grid_row,
)
from aemnist.schemas import TableError, atomic_write_bytes, read_frame
from aemnist.summaries import (
    GRID_CELL,
    agreement,
    dead_epochs,
    grid_seed_scores,
    score_column,
    seed_bests,
    sweep_seed_scores,
)

DASH = "—"
# What a study on another dataset than MNIST shows in place of the seed's numbers.
NO_REFERENCE = "No reference: the seed studied MNIST only."
# An MLflow run or experiment id as the report's run record may hold it.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class StudyRun:
    """The MLflow parent run of the study that wrote the report, and the day it wrote it
    (None in records written before they held it): a rebuild dates the report that day, so
    that it comes out the same on any machine and any later day."""

    run_id: str
    experiment_id: str
    date: str | None = None  # ISO 8601, YYYY-MM-DD

    def with_date(self, day: date) -> StudyRun:
        return dataclasses.replace(self, date=day.isoformat())


def save_study_run(layout: Layout, run: StudyRun) -> None:
    """Record the run beside the report, so that `aemnist report` names it too."""
    record = {"run_id": run.run_id, "experiment_id": run.experiment_id}
    if run.date is not None:
        record["date"] = run.date
    text = json.dumps(record) + "\n"
    atomic_write_bytes(layout.report_run, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _bad_run_record(path: Path, why: str) -> TableError:
    return TableError(
        f"{path} is not a record of the study's MLflow run ({why}); delete it and run "
        f"`aemnist run --refresh report` to write it again"
    )


def read_study_run(layout: Layout) -> StudyRun | None:
    """The run recorded beside the report; None where there is none (a work dir written
    before reports named their run). A record without a date (written before records held
    one) reads with none. A record that is not one raises TableError."""
    path = layout.report_run
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        day = record.get("date")
        run = StudyRun(
            str(record["run_id"]),
            str(record["experiment_id"]),
            None if day is None else date.fromisoformat(str(day)).isoformat(),
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _bad_run_record(path, f"{type(exc).__name__}: {exc}") from exc
    if not all(_ID.fullmatch(value) for value in (run.run_id, run.experiment_id)):
        raise _bad_run_record(path, "an id holds characters no MLflow id has")
    return run


def report_date(run: StudyRun | None, today: date | None = None) -> date:
    """The date the report names: ``today`` when given (the run writing it), else the one
    its run record holds, else (an old record, or none) the date of today."""
    if today is not None:
        return today
    if run is not None and run.date is not None:
        return date.fromisoformat(run.date)
    return date.today()


@dataclass(frozen=True)
class ReportFigure:
    key: str
    filename: str
    caption: str


FIGURES: tuple[ReportFigure, ...] = (
    ReportFigure(
        "1a",
        "fig1a_size_sweep.png",
        "Table 2's score against encoding size, ours and the seed's.",
    ),
    ReportFigure(
        "1b",
        "fig1b_training_curves.png",
        "training and test loss of the final model against epoch.",
    ),
    ReportFigure(
        "2",
        "fig2_noise.png",
        "MSE against noise level (95 % intervals over the test images shaded), and one test "
        "image corrupted and reconstructed at each level.",
    ),
    ReportFigure(
        "3",
        "fig3_occlusion.png",
        "MSE against the occluded fraction, for a random pixel mask and a square patch (95 % "
        "intervals shaded), and one test image occluded both ways and reconstructed at each "
        "level.",
    ),
    ReportFigure("4", "fig4_tsne.png", "t-SNE map of the encoding space, coloured by digit."),
)


@dataclass(frozen=True)
class StudyTables:
    """Every stored table the report reads."""

    grid: pd.DataFrame
    sweep: pd.DataFrame
    final_history: pd.DataFrame
    final_metrics: dict[str, float]  # of repeat 0, the model the evaluations use
    corruption: pd.DataFrame
    examples: pd.DataFrame
    embedding: pd.DataFrame
    embedding_metrics: dict[str, float]
    final_test_mses: tuple[float, ...] = ()  # one per seed (sweep.repeats), repeat 0 first
    # Each seed's own scores, where a stage ran with several seeds (else None): Table 1's
    # per (lr, weight decay) (summaries.grid_seed_scores), Table 2's per size
    # (summaries.sweep_seed_scores).
    grid_seeds: pd.DataFrame | None = None
    sweep_seeds: pd.DataFrame | None = None
    final_dead_epochs: tuple[int, ...] = ()  # each seed's final model's dead start, in epochs

    @property
    def final_test_mse(self) -> float:
        """The final test MSE: the mean over the seeds."""
        values = self.final_test_mses or (self.final_metrics["test_mse"],)
        return sum(values) / len(values)

    @property
    def final_test_mse_std(self) -> float:
        values = self.final_test_mses
        return float(pd.Series(values).std()) if len(values) > 1 else 0.0


def _metrics(path: Path, required: Sequence[str] = ()) -> dict[str, float]:
    frame = read_frame(path, "metrics")
    values = {str(m): float(v) for m, v in zip(frame["metric"], frame["value"], strict=True)}
    missing = [name for name in required if name not in values]
    if missing:
        raise TableError(
            f"table {path} has no {', '.join(missing)} metric; run the stage that writes it "
            f"again (`aemnist run`)"
        )
    return values


def _rows(path: Path, schema_name: str) -> pd.DataFrame:
    """A table that must have at least one row."""
    frame = read_frame(path, schema_name)
    if frame.empty:
        raise TableError(f"table {path} has no rows; run the stage that writes it again")
    return frame


def load_tables(layout: Layout, repeats: int = 1) -> StudyTables:
    """Read every table the report needs; a missing or malformed one raises TableError.
    ``repeats``: the seeds the final model was trained with (each has its metrics file)."""
    # Each seed's final metrics and history, read once; repeat 0's are the evaluated model's.
    metrics = [_metrics(layout.final_metrics_of(r), required=("test_mse",)) for r in range(repeats)]
    histories = [read_frame(layout.final_history_of(r), "sweep_history") for r in range(repeats)]
    return StudyTables(
        final_test_mses=tuple(m["test_mse"] for m in metrics),
        final_dead_epochs=tuple(dead_epochs(h.sort_values("epoch")) for h in histories),
        grid=_rows(layout.grid_summary, "grid_summary"),
        sweep=_rows(layout.sweep_summary, "sweep_summary"),
        final_history=histories[0],
        final_metrics=metrics[0],
        corruption=_rows(layout.corruption, "corruption"),
        examples=read_frame(layout.corruption_examples, "corruption_examples"),
        embedding=read_frame(layout.embedding, "embedding"),
        embedding_metrics=_metrics(layout.embedding_metrics),
    )


def load_seed_scores(
    layout: Layout, config: StudyConfig
) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """Each seed's scores of Table 1 and Table 2, from the stored histories of the stages
    that ran with several seeds (None for one that ran with one)."""
    grid = sweep = None
    if config.grid.repeats > 1:
        frames = [
            read_frame(layout.grid_history(lr, wd, fold, repeat), "grid_history").assign(
                repeat=repeat
            )
            for lr, wd, fold, repeat in grid_cells(config)
        ]
        grid = grid_seed_scores(pd.concat(frames, ignore_index=True))
    if config.sweep.repeats > 1:
        frames = [
            read_frame(layout.sweep_history(size, repeat), "sweep_history")
            for size, repeat in sweep_cells(config)
        ]
        sweep = sweep_seed_scores(pd.concat(frames, ignore_index=True), config.sweep.score_last)
    return grid, sweep


def load_study_tables(layout: Layout, config: StudyConfig) -> StudyTables:
    """Every table the report of ``config``'s study reads, each seed's scores included."""
    grid, sweep = load_seed_scores(layout, config)
    tables = load_tables(layout, config.sweep.repeats)
    return dataclasses.replace(tables, grid_seeds=grid, sweep_seeds=sweep)


def report_figures(layout: Layout) -> list[Path]:
    """The report's figure files, in figure order (for logging as artifacts)."""
    return [layout.figures_dir / fig.filename for fig in FIGURES]


def render_figures(tables: StudyTables, layout: Layout) -> list[Path]:
    # matplotlib is imported here, not with this module: a cached re-run publishes the
    # report's numbers without drawing, and its half-second import is on its critical path.
    from aemnist import plots

    fig1a, fig1b, fig2, fig3, fig4 = report_figures(layout)
    data = layout.dataset
    return [
        plots.plot_size_sweep(tables.sweep, fig1a, data),
        plots.plot_training_curves(tables.final_history, fig1b, data),
        plots.plot_corruption(tables.corruption, tables.examples, "noise", fig2, data),
        plots.plot_corruption(
            tables.corruption, tables.examples, ("occlusion", "patch"), fig3, data
        ),
        plots.plot_tsne(tables.embedding, fig4, data),
    ]


# ---- formatting -------------------------------------------------------------------------


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_loss(value: float | None, digits: int = 6) -> str:
    return DASH if _missing(value) else f"{float(value):.{digits}f}"


def fmt_hp(value: float | None) -> str:
    """A hyperparameter value (learning rate, weight decay) in its shortest form."""
    return DASH if _missing(value) else f"{float(value):g}"


def fmt_spread(mean: float, std: float) -> str:
    return f"{fmt_loss(mean)} ± {fmt_loss(std)}"


def fmt_ratio(ours: float | None, seed: float | None) -> str:
    if _missing(ours) or _missing(seed) or seed == 0:
        return DASH
    return f"{float(ours) / float(seed):.2f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---- sections ---------------------------------------------------------------------------


def best_grid_row(grid: pd.DataFrame) -> pd.Series:
    """Our best (lr, weight decay): the lowest mean validation loss (rank 1)."""
    return grid.sort_values(["val_loss_mean", "rank"]).iloc[0]


def best_size_row(sweep: pd.DataFrame) -> pd.Series:
    """Our best encoding size: the lowest Table 2 score (rank 1)."""
    return sweep.sort_values(["rank"]).iloc[0]


def _our_grid_row(grid: pd.DataFrame, lr: float, weight_decay: float) -> pd.Series | None:
    for _, row in grid.iterrows():
        if same_value(row["lr"], lr) and same_value(row["weight_decay"], weight_decay):
            return row
    return None


def header_section(config: StudyConfig, today: date, run: StudyRun | None = None) -> str:
    # The run's line follows the date: rebuilt reports are compared from there on
    # (tests/test_study_e2e.py), and they must name the same run.
    tracked = (
        [f"- MLflow run: `{run.run_id}` (experiment {run.experiment_id}): its parameters, "
         f"metrics, models and artifacts"]
        if run
        else []
    )  # fmt: skip
    reference = has_reference(config.data.dataset)
    return "\n".join(
        [
            f"# aemnist study report: {dataset_spec(config.data.dataset).title}",
            "",
            f"- profile: **{config.profile}**",
            f"- seed: {config.seed}",
            f"- config hash: `{config.config_hash()[:12]}`",
            f"- device: {config.runtime.device}",
            f"- sizes selected on: {config.sweep.selection} "
            + (
                "(the seed's way: the test set drives the scheduler and ranks the sizes)"
                if config.sweep.selection == "test"
                else f"({config.sweep.validation_images} training images held out; the test "
                f"set gives the final number only)"
            ),
            f"- date: {today.isoformat()}",
            *tracked,
            "",
            "Every number below is read from the study's stored tables; the seed's figures "
            "come from the seed report (Tables 1 and 2, section 3). A dash (—) marks a row "
            "that only one side has. Ratios are ours / seed (below 1: ours is lower)."
            if reference
            else f"Every number below is read from the study's stored tables. {NO_REFERENCE}",
        ]
    )


def table1_section(grid: pd.DataFrame, config: StudyConfig, agreement: str = "") -> str:
    reference = has_reference(config.data.dataset)
    ours_rows = []
    for _, row in grid.sort_values("rank").iterrows():
        seed = seed_grid_row(row["lr"], row["weight_decay"])
        seed_val = seed.val_loss if seed else None
        ours_rows.append(
            [
                str(int(row["rank"])),
                fmt_hp(row["lr"]),
                fmt_hp(row["weight_decay"]),
                fmt_spread(row["train_loss_mean"], row["train_loss_std"]),
                fmt_spread(row["val_loss_mean"], row["val_loss_std"]),
                str(int(row["n_folds"])),
                fmt_loss(seed_val),
                fmt_ratio(row["val_loss_mean"], seed_val),
            ]
        )
    seed_rows = []
    for rank, seed in enumerate(SEED_TABLE1, start=1):
        ours = _our_grid_row(grid, seed.lr, seed.weight_decay)
        our_val = None if ours is None else float(ours["val_loss_mean"])
        seed_rows.append(
            [
                str(rank),
                fmt_hp(seed.lr),
                fmt_hp(seed.weight_decay),
                fmt_loss(seed.train_loss),
                fmt_loss(seed.val_loss),
                fmt_loss(our_val),
                fmt_ratio(our_val, seed.val_loss),
            ]
        )
    best = best_grid_row(grid)
    g = config.grid
    headers = ["rank", "lr", "weight decay", "train loss", "validation loss", "folds"]
    best_line = (
        f"**Best (lr, weight decay): lr {fmt_hp(best['lr'])}, weight decay "
        f"{fmt_hp(best['weight_decay'])}** (validation loss "
        f"{fmt_spread(best['val_loss_mean'], best['val_loss_std'])})."
    )
    if not reference:
        return "\n".join(
            [
                "## Table 1: learning rate and weight decay (grid search)",
                "",
                f"Ours: Adam, {g.folds}-fold cross-validation, {_count(g.epochs, 'epoch')}, "
                f"encoding size {g.size}; loss of the last epoch, mean ± standard deviation "
                f"over folds.",
                "",
                md_table(headers, [row[: len(headers)] for row in ours_rows]),
                "",
                best_line,
            ]
        )
    return "\n".join(
        [
            "## Table 1: learning rate and weight decay (grid search)",
            "",
            f"Ours: Adam, {g.folds}-fold cross-validation, {_count(g.epochs, 'epoch')}, "
            f"encoding size "
            f"{g.size}; loss of the last epoch, "
            + (
                "mean ± standard deviation over folds."
                if g.repeats == 1
                else f"each seed's mean over the folds, then mean ± standard deviation over "
                f"{g.repeats} seeds (the same folds, other initial weights and batches)."
            ),
            "",
            md_table(
                [
                    "rank",
                    "lr",
                    "weight decay",
                    "train loss",
                    "validation loss",
                    "folds",
                    "seed validation",
                    "ours/seed",
                ],
                ours_rows,
            ),
            "",
            "The seed's Table 1 (top 5 of 36; 3 folds, 20 epochs) beside ours:",
            "",
            md_table(
                [
                    "seed rank",
                    "lr",
                    "weight decay",
                    "seed train",
                    "seed validation",
                    "our validation",
                    "ours/seed",
                ],
                seed_rows,
            ),
            "",
            f"**Best (lr, weight decay): lr {fmt_hp(best['lr'])}, weight decay "
            f"{fmt_hp(best['weight_decay'])}** (validation loss "
            f"{fmt_spread(best['val_loss_mean'], best['val_loss_std'])}). Seed: lr "
            f"{fmt_hp(SEED_BEST_LR)}, weight decay {fmt_hp(SEED_BEST_WEIGHT_DECAY)} "
            f"({fmt_loss(SEED_TABLE1[0].val_loss)}).",
            *(["", agreement] if agreement else []),
        ]
    )


def figure_markdown(layout: Layout, key: str, report_path: Path | None = None) -> str:
    """Figure ``key`` of ``layout``, linked relative to the folder of ``report_path`` (where
    the report is written; default: the work dir's report.md)."""
    fig = next(f for f in FIGURES if f.key == key)
    at = (report_path or layout.report).parent
    target = layout.figures_dir / fig.filename
    if layout.remote:
        # In an object store: beside the store's report, else the figure's URL.
        link = Path(f"{target.parent.name}/{target.name}") if at == layout.study_dir else target
    else:
        link = Path(os.path.relpath(target, at))
    caption = fig.caption
    if not has_reference(layout.dataset):  # no seed's curve; classes, not digits
        caption = caption.replace(", ours and the seed's", "").replace("by digit", "by class")
    return f"![Figure {fig.key}]({link.as_posix()})\n\n*Figure {fig.key}: {caption}*"


def table2_section(
    sweep: pd.DataFrame,
    config: StudyConfig,
    layout: Layout,
    agreement: str = "",
    report_path: Path | None = None,
) -> str:
    score = score_column(sweep)
    on_test = score == "test_loss"
    ours = {int(row["size"]): row for _, row in sweep.iterrows()}
    rows = []
    for size in sorted(set(ours) | set(SEED_TABLE2)):
        row = ours.get(size)
        seed = SEED_TABLE2.get(size)
        our_loss = None if row is None else float(row[score])
        rows.append(
            [
                str(size),
                DASH if row is None else str(int(row["rank"])),
                DASH if row is None else fmt_spread(row[score], row[f"{score}_std"]),
                fmt_loss(seed),
                fmt_ratio(our_loss, seed),
            ]
        )
    best = best_size_row(sweep)
    s = config.sweep
    reference = has_reference(config.data.dataset)
    scored = (
        "the test set, as the seed did (selection = test: the test set also chose the size)"
        if on_test
        else f"{s.validation_images} images held out of the training set (selection = "
        f"validation; trained on the rest): the test set is kept for the final number only"
    )
    name = "test loss" if on_test else "validation loss"
    spread = (
        "(± their standard deviation)"
        if s.repeats == 1
        else f"per seed, then mean ± standard deviation over {s.repeats} seeds"
    )
    headers = ["size", "our rank", f"our {name}", "seed test loss", "ours/seed"]
    seed_text = (
        "Seed: 50 epochs on the whole training set, scored on the test set, mean of the last "
        "5, one seed."
        if reference
        else ""
    )
    if not reference:  # our sizes only, without the seed's columns
        headers = headers[:3]
        rows = [row[:3] for row in rows if row[1] != DASH]
    return "\n".join(
        [
            "## Table 2: loss against encoding size",
            "",
            f"Ours: {_count(s.epochs, 'epoch')}, ReduceLROnPlateau (patience "
            f"{s.plateau_patience}), each epoch scored on {scored}; score = mean of the last "
            f"{_count(s.score_last, 'epoch')} {spread}. {seed_text}".rstrip(),
            "",
            md_table(headers, rows),
            "",
            f"**Best size: {int(best['size'])}** ({name} {fmt_loss(best[score])})."
            + (
                f" Seed: {SEED_BEST_SIZE} ({fmt_loss(SEED_TABLE2[SEED_BEST_SIZE])})."
                if reference
                else ""
            ),
            *(["", agreement] if agreement else []),
            "",
            figure_markdown(layout, "1a", report_path),
        ]
    )


def final_section(
    tables: StudyTables,
    config: StudyConfig,
    layout: Layout,
    report_path: Path | None = None,
) -> str:
    history = tables.final_history
    sizes = sorted({int(s) for s in history["size"]})
    size = ", ".join(str(s) for s in sizes) if sizes else DASH
    epochs = str(int(history["epoch"].nunique())) if len(history) else DASH
    test_mse = tables.final_test_mse
    n = len(tables.final_test_mses) or 1
    ours = fmt_loss(test_mse) if n == 1 else fmt_spread(test_mse, tables.final_test_mse_std)
    rows = [
        ["encoding size", size, str(SEED_FINAL_SIZE), DASH],
        ["epochs", epochs, "50", DASH],
        [
            "test MSE" if n == 1 else f"test MSE (mean ± std over {n} seeds)",
            ours,
            f"{SEED_FINAL_TEST_MSE:g}",
            fmt_ratio(test_mse, SEED_FINAL_TEST_MSE),
        ],
    ]
    if n > 1:
        rows += [
            [f"test MSE, seed {r}", fmt_loss(v), DASH, DASH]
            for r, v in enumerate(tables.final_test_mses)
        ]
    rows += [
        [name, fmt_loss(value), DASH, DASH]
        for name, value in sorted(tables.final_metrics.items())
        if name not in ("test_mse", "size")
    ]
    best = int(best_size_row(tables.sweep)["size"])
    s = config.sweep
    reference = has_reference(config.data.dataset)
    headers = ["", "ours", "seed", "ours/seed"]
    final_line = (
        f"**Final test MSE: {ours}** (seed: {SEED_FINAL_TEST_MSE:g}, "
        f"ratio {fmt_ratio(test_mse, SEED_FINAL_TEST_MSE)})."
    )
    if not reference:
        headers, rows = headers[:2], [row[:2] for row in rows]
        final_line = f"**Final test MSE: {ours}**."
    trained_on = (
        "the whole training set"
        if s.selection == "test"
        else f"the training set less its {s.validation_images} held-out validation images"
    )
    chosen = (
        f"Its encoding size is fixed by the config (final.size = {config.final.size}"
        + (", the seed's final size" if reference else "")
        + f"); our sweep's best size was {best}."
        if config.final.size
        else f"Its encoding size is our sweep's best ({best})."
    )
    return "\n".join(
        [
            "## Final model",
            "",
            f"Trained on {trained_on} with the best (lr, weight decay) of Table 1 and the "
            f"sweep's scheduler. {chosen}",
            "",
            md_table(headers, rows),
            "",
            final_line,
            "",
            figure_markdown(layout, "1b", report_path),
        ]
    )


def dead_starts_section(tables: StudyTables, config: StudyConfig) -> str:
    """Which training runs started dead (aemnist.summaries.dead_epochs), how often per
    encoding size over the seeds, and what it cost them."""
    grid, sweep = tables.grid, tables.sweep
    score = score_column(sweep)
    runs_per_cell = int(grid["n_folds"].iloc[0]) * int(grid["repeats"].iloc[0])
    grid_dead = int(grid["dead_starts"].sum())
    cells = [
        f"lr {fmt_hp(row['lr'])}, weight decay {fmt_hp(row['weight_decay'])}: "
        f"{int(row['dead_starts'])} of {runs_per_cell}"
        for _, row in grid.sort_values(["lr", "weight_decay"]).iterrows()
        if row["dead_starts"]
    ]
    grid_line = f"Grid search: {grid_dead} of {runs_per_cell * len(grid)} runs started dead" + (
        f" ({'; '.join(cells)})." if cells else "."
    )
    rows = []
    for _, row in sweep.sort_values("size").iterrows():
        repeats = [int(r) for r in row["dead_repeats"]]
        epochs = [int(e) for e in row["dead_epochs"]]
        rows.append(
            [
                str(int(row["size"])),
                f"{len(repeats)} of {int(row['repeats'])}",
                ", ".join(f"seed {r}: {e}" for r, e in zip(repeats, epochs, strict=True)) or DASH,
                fmt_loss(row["dead_loss"]),
                fmt_loss(row["alive_loss"]),
                fmt_loss(row[score]),
            ]
        )
    name = "test loss" if score == "test_loss" else "validation loss"
    final = ", ".join(
        f"seed {r}: {_count(n, 'epoch')}" if n else f"seed {r}: none"
        for r, n in enumerate(tables.final_dead_epochs)
    )
    remedy = (
        "Every model started with its output bias at the training images' mean intensity "
        "(training.output_bias_at_mean), the remedy for dead starts."
        if config.training.output_bias_at_mean
        else "Models started from PyTorch's default initialisation (the seed's protocol; "
        "training.output_bias_at_mean = true is the remedy)."
    )
    return "\n".join(
        [
            "## Dead starts",
            "",
            "A dead start: a run whose first epochs gave every image the same, all-black "
            "output (its reconstructions vary less than 1 % of what the images do and its loss "
            "is above 90 % of an all-black output's, 0.112 on MNIST). Each training run in "
            "MLflow carries its count as metric `dead_epochs` and tag `aemnist.dead_epochs`. "
            + remedy,
            "",
            grid_line,
            "",
            f"Size sweep: seeds that started dead at each size (epochs spent dead), and the "
            f"{name} (mean of the last {_count(config.sweep.score_last, 'epoch')}) of those "
            f"seeds and of the others:",
            "",
            md_table(
                ["size", "started dead", "dead epochs", "their loss", "others' loss", "all"],
                rows,
            ),
            "",
            f"Final model: {final}.",
        ]
    )


def corruption_section(
    corruption: pd.DataFrame,
    config: StudyConfig,
    layout: Layout,
    report_path: Path | None = None,
) -> str:
    rows = [
        [
            str(row["kind"]),
            f"{row['level']:g}",
            f"{fmt_loss(row['mse'])} ± {fmt_loss(row['mse_ci95'])}",
            f"{fmt_loss(row['baseline_mse'])} ± {fmt_loss(row['baseline_mse_ci95'])}",
        ]
        for _, row in corruption.sort_values(["kind", "level"]).iterrows()
    ]
    kinds = [k for k in DEFINITIONS if k in set(corruption["kind"])]
    clip = "on" if config.corruption.clip else "off, as in the seed"
    return "\n".join(
        [
            "## Reconstruction under corruption",
            "",
            "Each test image x is corrupted, then reconstructed; the error is always against "
            "the clean image: MSE(model(corrupt(x)), x), and beside it the corrupted input's "
            "own MSE(corrupt(x), x) (the baseline of doing nothing). Each value is the mean "
            "over the test images of one image's MSE, ± the half-width of its 95 % interval "
            "(1.96 standard errors). The corruptions:",
            "",
            *[f"- **{kind}**: {DEFINITIONS[kind]}" for kind in kinds],
            "",
            f"Clipping of noisy pixels: {clip}.",
            "",
            figure_markdown(layout, "2", report_path),
            "",
            figure_markdown(layout, "3", report_path),
            "",
            md_table(["kind", "level", "reconstruction MSE", "baseline MSE"], rows),
        ]
    )


def embedding_section(
    tables: StudyTables,
    config: StudyConfig,
    layout: Layout,
    report_path: Path | None = None,
) -> str:
    rows = [[name, f"{value:.4f}"] for name, value in sorted(tables.embedding_metrics.items())]
    emb = tables.embedding
    e = config.embedding
    dims = len(emb["z"].iloc[0]) if len(emb) else 0
    spec = dataset_spec(config.data.dataset)
    classes = "digit" if spec.name == "mnist" else f"{spec.title} class"
    seed_map = "; the seed: 2000 images, dimension 20" if has_reference(spec.name) else ""
    names = (
        []
        if spec.name == "mnist"
        else [
            f"{spec.title}'s classes (label: name): "
            + ", ".join(f"{i}: {name}" for i, name in enumerate(spec.classes))
            + ".",
            "",
        ]
    )
    return "\n".join(
        [
            "## Encoding space",
            "",
            f"{len(emb)} test images, encoding dimension {dims}, mapped to 2-D with t-SNE "
            f"(perplexity {e.perplexity:g}, PCA initialisation, random state "
            f"{e.seed_for(config.seed)}){seed_map}. Separation: the "
            f"{e.knn}-nearest-neighbour classifier's 5-fold cross-validated accuracy of the "
            f"{classes} labels, in the latent space and in the 2-D map, and the silhouette of "
            f"the {classes} clusters in each (-1 to 1, higher is better separated).",
            "",
            *names,
            figure_markdown(layout, "4", report_path),
            "",
            md_table(["metric", "value"], rows) if rows else "(no metrics recorded)",
        ]
    )


def study_targets(tables: StudyTables) -> list[Target]:
    """The paper profile's fidelity targets (aemnist.reference), checked on these tables:
    with several seeds, on each seed's numbers (the best validation MSE: each seed's score
    at Table 1's best (lr, weight decay), the one setting every seed's sweep used)."""
    best = best_grid_row(tables.grid)
    score = score_column(tables.sweep)
    best_val: float | tuple[float, ...] = float(best["val_loss_mean"])
    if tables.grid_seeds is not None:
        best_val = tuple(_seed_scores_at(tables.grid_seeds, best))
    sizes: dict[int, float] | dict[int, tuple[float, ...]]
    if tables.sweep_seeds is not None:
        sizes = {
            int(size): tuple(g.sort_values("repeat")["score"])
            for size, g in tables.sweep_seeds.groupby("size")
        }
    else:
        sizes = {int(row["size"]): float(row[score]) for _, row in tables.sweep.iterrows()}
    final = tables.final_test_mses if len(tables.final_test_mses) > 1 else tables.final_test_mse
    return paper_targets(float(best["lr"]), float(best["weight_decay"]), best_val, sizes, final)


def _seed_scores_at(grid_seeds: pd.DataFrame, cell: pd.Series) -> list[float]:
    """Each seed's validation score of Table 1's cell ``cell``, in repeat order."""
    rows = grid_seeds[
        [
            same_value(lr, cell["lr"]) and same_value(wd, cell["weight_decay"])
            for lr, wd in zip(grid_seeds["lr"], grid_seeds["weight_decay"], strict=True)
        ]
    ]
    return [float(v) for v in rows.sort_values("repeat")["val_loss"]]


def _several_seeds(targets: Sequence[Target]) -> bool:
    return any(t.spread is not None and t.spread.n > 1 for t in targets)


def _seed_counts(config: StudyConfig) -> str:
    g, s = config.grid.repeats, config.sweep.repeats
    if g == s:
        return f"{g} seeds"
    return f"the seeds ({g} of the grid, {s} of the sweep and the final model)"


def targets_over_seeds(targets: Sequence[Target], config: StudyConfig) -> str:
    """The targets' table and rule where the study ran with several seeds: for each number,
    the seed's, our mean ± standard deviation and range over the seeds, and whether the
    seed's number lies within our mean ± 2 standard deviations."""

    def row(t: Target) -> list[str]:
        verdict = "tie" if t.tie else "met" if t.met else "**missed**"
        spread = t.spread
        seed = DASH if t.seed is None else f"{t.seed:g}"
        if spread is None:  # no number of ours (a ranking, the settings, a size not swept)
            return [t.name, seed, t.ours, DASH, DASH, verdict]
        if spread.n == 1:
            return [t.name, seed, fmt_loss(spread.mean), DASH, DASH, verdict]
        return [
            t.name,
            seed,
            f"{fmt_spread(spread.mean, spread.std)} ({fmt_ratio(spread.mean, t.seed)} x seed)",
            f"[{fmt_loss(spread.low)}, {fmt_loss(spread.high)}]",
            "within" if t.seed is not None and spread.holds(t.seed) else "outside",
            verdict,
        ]

    return "\n".join(
        [
            f"Over {_seed_counts(config)}: each target is judged on our mean over the seeds "
            f"(its rule unchanged); ± is the sample standard deviation over the seeds, and "
            f"the seed's number is *within* when it lies within our mean ± 2 standard "
            f"deviations, else *outside*. A size ranking is met when the interval (mean ± "
            f"one standard deviation) of every size meant to rank ahead lies wholly below "
            f"that of every size behind, missed when one lies wholly above one behind, and "
            f"otherwise a **tie** (the means differ by less than the spread), counted "
            f"neither met nor missed.",
            "",
            md_table(
                [
                    "target",
                    "seed",
                    "ours: mean ± std",
                    "ours: [min, max]",
                    "seed in mean ± 2 std",
                    "",
                ],
                [row(t) for t in targets],
            ),
        ]
    )


def _agreement_line(what: str, bests: pd.DataFrame, agreeing: int, own: list[str]) -> str:
    """``what`` is the best in ``agreeing`` of the seeds; each seed's own best when they
    differ (``own``: one per seed, in repeat order)."""
    n = len(bests)
    line = f"{what} is the best in {agreeing} of {n} seeds"
    if agreeing < n:
        pairs = zip(bests["repeat"], own, strict=True)
        listed = "; ".join(f"repeat {int(r)}: {o}" for r, o in pairs)
        line += f" (each seed's own best: {listed})"
    return line + "."


def grid_agreement(tables: StudyTables) -> str:
    """How often the seeds agree on Table 1's best (lr, weight decay); "" for one seed."""
    if tables.grid_seeds is None:
        return ""
    best = best_grid_row(tables.grid)
    bests = seed_bests(tables.grid_seeds, GRID_CELL, "val_loss")
    own = [
        f"lr {fmt_hp(r.lr)}, weight decay {fmt_hp(r.weight_decay)} ({fmt_loss(r.val_loss)})"
        for r in bests.itertuples()
    ]
    cell = f"lr {fmt_hp(best['lr'])}, weight decay {fmt_hp(best['weight_decay'])}"
    agreeing = agreement(bests, GRID_CELL, {k: best[k] for k in GRID_CELL})
    return "**Seeds:** " + _agreement_line(f"Table 1's best, {cell},", bests, agreeing, own)


def size_agreement(tables: StudyTables) -> str:
    """How often the seeds agree on Table 2's best size; "" for one seed."""
    if tables.sweep_seeds is None:
        return ""
    best = int(best_size_row(tables.sweep)["size"])
    bests = seed_bests(tables.sweep_seeds, ["size"], "score")
    own = [f"size {int(r.size)} ({fmt_loss(r.score)})" for r in bests.itertuples()]
    agreeing = agreement(bests, ["size"], {"size": best})
    return "**Seeds:** " + _agreement_line(f"Table 2's best, size {best},", bests, agreeing, own)


def targets_section(tables: StudyTables, config: StudyConfig) -> str:
    targets = study_targets(tables)
    met = sum(t.met for t in targets)
    ties = sum(t.tie for t in targets)
    rows = [[t.name, t.ours, "met" if t.met else "**missed**"] for t in targets]
    scope = (
        "The paper profile's targets: what a faithful reproduction of the seed must give."
        if config.profile == "paper"
        else f"The paper profile's targets, checked here on the {config.profile} profile: "
        f"with its smaller grid, data or epochs, misses are expected and say nothing of "
        f"fidelity."
    )
    return "\n".join(
        [
            "## Targets",
            "",
            scope,
            "",
            targets_over_seeds(targets, config)
            if _several_seeds(targets)
            else md_table(["target", "ours", ""], rows),
            "",
            f"**{met} of {len(targets)} targets met" + (f", {ties} tied" if ties else "") + ".**",
        ]
    )


def seed_comparison(tables: StudyTables) -> dict[str, float]:
    """Ours, the seed's and ours/seed side by side as metrics for the parent run: Table 1's
    top 5 (our validation loss at the seed's settings), Table 2's ten sizes, the final test
    MSE; and the count of targets met."""
    out: dict[str, float] = {}

    def put(name: str, ours: float | None, seed: float) -> None:
        out[f"seed.{name}"] = seed
        if ours is not None:
            out[f"ours.{name}"] = ours
            out[f"ratio.{name}"] = ours / seed

    for rank, seed in enumerate(SEED_TABLE1, start=1):
        row = _our_grid_row(tables.grid, seed.lr, seed.weight_decay)
        name = f"table1.rank{rank}.lr{seed.lr:g}.wd{seed.weight_decay:g}.val_loss"
        put(name, None if row is None else float(row["val_loss_mean"]), seed.val_loss)
    score = score_column(tables.sweep)
    ours = {int(row["size"]): float(row[score]) for _, row in tables.sweep.iterrows()}
    for size, seed_loss in sorted(SEED_TABLE2.items()):
        put(f"table2.size{size:02d}.test_loss", ours.get(size), seed_loss)
    put("final.test_mse", tables.final_test_mse, SEED_FINAL_TEST_MSE)
    if len(tables.final_test_mses) > 1:
        out["ours.final.test_mse_std"] = tables.final_test_mse_std
    targets = study_targets(tables)
    out["targets_met"] = float(sum(t.met for t in targets))
    out["targets_total"] = float(len(targets))
    out |= _over_seeds(tables, targets)
    return out


def _over_seeds(tables: StudyTables, targets: Sequence[Target]) -> dict[str, float]:
    """With several seeds: the targets tied, and how many seeds agree on each table's best."""
    out: dict[str, float] = {}
    if _several_seeds(targets):
        out["targets_tied"] = float(sum(t.tie for t in targets))
    if tables.grid_seeds is not None:
        best = best_grid_row(tables.grid)
        bests = seed_bests(tables.grid_seeds, GRID_CELL, "val_loss")
        out["seeds_agreeing.table1_best"] = float(
            agreement(bests, GRID_CELL, {k: best[k] for k in GRID_CELL})
        )
    if tables.sweep_seeds is not None:
        bests = seed_bests(tables.sweep_seeds, ["size"], "score")
        best_size = int(best_size_row(tables.sweep)["size"])
        out["seeds_agreeing.table2_best"] = float(agreement(bests, ["size"], {"size": best_size}))
    return out


def render_report(
    tables: StudyTables,
    config: StudyConfig,
    layout: Layout,
    today: date,
    run: StudyRun | None = None,
    report_path: Path | None = None,
) -> str:
    """The report's Markdown; its figure links (to ``layout``'s figures) are relative to the
    folder of ``report_path`` (default: the work dir's report.md)."""
    # The seed's targets are MNIST's: another dataset's report has none (its header says so).
    targets = [targets_section(tables, config)] if has_reference(config.data.dataset) else []
    sections = [
        header_section(config, today, run),
        *targets,
        table1_section(tables.grid, config, grid_agreement(tables)),
        table2_section(tables.sweep, config, layout, size_agreement(tables), report_path),
        final_section(tables, config, layout, report_path),
        dead_starts_section(tables, config),
        corruption_section(tables.corruption, config, layout, report_path),
        embedding_section(tables, config, layout, report_path),
    ]
    return "\n\n".join(sections) + "\n"


def report_markdown(
    layout: Layout,
    config: StudyConfig,
    report_path: Path | None = None,
    figures_of: Layout | None = None,
    today: date | None = None,
) -> str:
    """The report `aemnist report` writes for the study in ``layout`` (its run and date from
    the run record), without drawing the figures: the links point at those of ``figures_of``
    (default: ``layout``), relative to the folder of ``report_path``."""
    tables = load_study_tables(layout, config)
    run = read_study_run(layout)
    return render_report(
        tables, config, figures_of or layout, report_date(run, today), run, report_path
    )


def stage_public_text(path: Path, text: str) -> Path:
    """``text`` in a new hidden temporary file beside ``path``, readable as the user's umask
    allows (a report written outside the work dir is for others to read, unlike the work
    dir's files); the caller renames it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def build_report(
    layout: Layout,
    config: StudyConfig,
    today: date | None = None,
    run: StudyRun | None = None,
    out: Path | None = None,
) -> Path:
    """Render the figures into ``layout.figures_dir`` and write the report atomically: to
    ``layout.report``, or to ``out`` with its figure links relative to ``out``'s folder.

    The report names ``run``, the MLflow run of the study writing it, and records it beside
    itself (``layout.report_run``) with the date of ``today`` (default: the date of today);
    without ``run`` (`aemnist report`), the recorded run, dated as recorded."""
    if out is not None and not layout.remote and out.resolve() == layout.report.resolve():
        out = None  # the work dir's own report: with its hash record, as always
    tables = load_study_tables(layout, config)
    if run is not None:
        if run.date is None:
            run = run.with_date(today or date.today())
        save_study_run(layout, run)
    else:
        run = read_study_run(layout)
    render_figures(tables, layout)
    text = render_report(tables, config, layout, report_date(run, today), run, out)
    if out is None:
        atomic_write_bytes(layout.report, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return layout.report
    tmp = stage_public_text(out, text)
    try:
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
