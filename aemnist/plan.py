"""The study's plan: every task and the exact inputs it is keyed on.

The flow submits tasks with these inputs, and ``aemnist status`` recomputes their keys from
them, so the two cannot drift apart. Each task gets only the config fields it uses: changing
the sweep's epochs leaves the download, folds and grid keys unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from aemnist.config import StudyConfig
from aemnist.layout import Layout

if TYPE_CHECKING:  # annotations only: `aemnist run` imports this module before pyarrow
    from aemnist.schemas import TableRef

# The report's figures (aemnist.report.FIGURES), named here to spare this module matplotlib.
REPORT_FIGURES = (
    "fig1a_size_sweep.png",
    "fig1b_training_curves.png",
    "fig2_noise.png",
    "fig3_occlusion.png",
    "fig4_tsne.png",
)

# Stages in order, each with the stages it reads from.
STAGES: dict[str, tuple[str, ...]] = {
    "download": (),
    "folds": ("download",),
    "grid": ("download", "folds"),
    "grid-summary": ("grid",),
    "sweep": ("download", "grid-summary"),
    "sweep-summary": ("sweep",),
    "final": ("download", "grid-summary", "sweep-summary"),
    "corruption": ("download", "final"),
    "embedding": ("download", "final"),
    "report": ("grid-summary", "sweep-summary", "final", "corruption", "embedding"),
}


def downstream(stage: str) -> set[str]:
    """``stage`` and every stage that depends on it, directly or not."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    found = {stage}
    changed = True
    while changed:
        changed = False
        for name, inputs in STAGES.items():
            if name not in found and found.intersection(inputs):
                found.add(name)
                changed = True
    return found


def refreshed_stages(fresh: bool, refresh: list[str] | None) -> set[str]:
    if fresh:
        return set(STAGES)
    out: set[str] = set()
    for stage in refresh or []:
        out |= downstream(stage)
    return out


def on_device(config: StudyConfig) -> dict[str, Any]:
    """The device as a key input of the stages that compute with torch: a result computed on
    a GPU is not reused for a CPU run, nor the reverse (their last digits differ). ``config``
    holds the resolved device (aemnist.runtime.with_resolved_device). Always given, so the
    key the flow computes equals the one the task computes from its bound parameters."""
    return {"device": config.runtime.device}


def grid_labels(config: StudyConfig) -> list[tuple[str, float, float, int]]:
    return [
        (f"grid lr={lr:g} wd={wd:g} fold={fold}", lr, wd, fold)
        for lr in config.grid.learning_rates
        for wd in config.grid.weight_decays
        for fold in range(config.grid.folds)
    ]


def size_label(stage: str, size: int, repeat: int = 0) -> str:
    """A sweep or final task's name; repeat 0 keeps the single-seed name."""
    return f"{stage} size={size}" + (f" repeat={repeat}" if repeat else "")


def sweep_labels(config: StudyConfig) -> list[tuple[str, int, int]]:
    """(label, size, repeat) of every sweep task."""
    return [
        (size_label("sweep", size, repeat), size, repeat)
        for size in config.sweep.sizes
        for repeat in range(config.sweep.repeats)
    ]


def final_labels(config: StudyConfig, size: int) -> list[tuple[str, int]]:
    """(label, repeat) of every final task: one per seed."""
    return [(size_label("final", size, repeat), repeat) for repeat in range(config.sweep.repeats)]


def final_size(config: StudyConfig, best_size: int) -> int:
    """The final model's encoding size: final.size when set, else the sweep's best."""
    return config.final.size or best_size


def folds_inputs(config: StudyConfig, layout: Layout, train: TableRef) -> dict[str, Any]:
    return {
        "layout": layout,
        "train": train,
        "train_limit": config.data.train_limit,
        "k": config.grid.folds,
        "seed": config.seed,
    }


def grid_inputs(
    config: StudyConfig,
    layout: Layout,
    train: TableRef,
    folds: TableRef,
    lr: float,
    weight_decay: float,
    fold: int,
) -> dict[str, Any]:
    return {
        "layout": layout,
        "train": train,
        "folds": folds,
        "train_limit": config.data.train_limit,
        "lr": lr,
        "weight_decay": weight_decay,
        "fold": fold,
        "size": config.grid.size,
        "epochs": config.grid.epochs,
        "training": config.training,
        "seed": config.seed,
        **on_device(config),
    }


def grid_summary_inputs(layout: Layout, histories: list[TableRef]) -> dict[str, Any]:
    return {"layout": layout, "histories": histories}


def sweep_inputs(
    config: StudyConfig,
    layout: Layout,
    train: TableRef,
    test: TableRef,
    size: int,
    lr: float,
    weight_decay: float,
    repeat: int = 0,
) -> dict[str, Any]:
    return {
        "layout": layout,
        "train": train,
        "test": test,
        "repeat": repeat,
        "train_limit": config.data.train_limit,
        "test_limit": config.data.test_limit,
        "size": size,
        "lr": lr,
        "weight_decay": weight_decay,
        "epochs": config.sweep.epochs,
        "plateau_patience": config.sweep.plateau_patience,
        "selection": config.sweep.selection,
        "validation_images": config.sweep.validation_images,
        "training": config.training,
        "seed": config.seed,
        **on_device(config),
    }


def sweep_summary_inputs(
    config: StudyConfig, layout: Layout, histories: list[TableRef]
) -> dict[str, Any]:
    return {"layout": layout, "histories": histories, "score_last": config.sweep.score_last}


def final_inputs(
    config: StudyConfig,
    layout: Layout,
    train: TableRef,
    test: TableRef,
    size: int,
    lr: float,
    weight_decay: float,
    repeat: int = 0,
) -> dict[str, Any]:
    inputs = sweep_inputs(config, layout, train, test, size, lr, weight_decay, repeat)
    inputs["epochs"] = config.final.epochs
    return inputs


def corruption_inputs(
    config: StudyConfig, layout: Layout, test: TableRef, model: TableRef
) -> dict[str, Any]:
    return {
        "layout": layout,
        "test": test,
        "test_limit": config.data.test_limit,
        "model": model,
        "corruption": config.corruption,
        "training": config.training,
        "seed": config.seed,
        **on_device(config),
    }


def embedding_inputs(
    config: StudyConfig, layout: Layout, test: TableRef, model: TableRef
) -> dict[str, Any]:
    return {
        "layout": layout,
        "test": test,
        "test_limit": config.data.test_limit,
        "model": model,
        "embedding": config.embedding,
        "seed": config.seed,
        **on_device(config),
    }


def report_inputs(config: StudyConfig, layout: Layout, tables: list[TableRef]) -> dict[str, Any]:
    return {"config": config, "layout": layout, "tables": tables}


def outputs(stage: str, inputs: dict[str, Any]) -> list[Path]:
    """The files a task writes (given its inputs): checked before its result is reused, so a
    missing or damaged one is recomputed."""
    layout: Layout = inputs["layout"]
    if stage == "folds":
        return [layout.folds]
    if stage == "grid":
        return [layout.grid_history(inputs["lr"], inputs["weight_decay"], inputs["fold"])]
    if stage == "grid-summary":
        return [layout.grid_summary]
    if stage == "sweep":
        return [layout.sweep_history(inputs["size"], inputs["repeat"])]
    if stage == "sweep-summary":
        return [layout.sweep_summary]
    if stage == "final":
        repeat = inputs["repeat"]
        return [
            layout.final_model_of(repeat),
            layout.final_history_of(repeat),
            layout.final_metrics_of(repeat),
        ]
    if stage == "corruption":
        return [layout.corruption, layout.corruption_examples]
    if stage == "embedding":
        return [layout.embedding, layout.embedding_metrics]
    if stage == "report":
        return [layout.report] + [layout.figures_dir / name for name in REPORT_FIGURES]
    raise ValueError(f"no outputs known for stage {stage!r}")
