"""Aggregation: the seed's Table 1 (grid search) and Table 2 (size sweep)."""

from __future__ import annotations

import numpy as np
import pandas as pd

GRID_CELL = ["lr", "weight_decay"]


def _repeats(histories: pd.DataFrame) -> pd.DataFrame:
    """The histories with their ``repeat`` column: 0 throughout where it has none (one seed)."""
    return histories if "repeat" in histories.columns else histories.assign(repeat=0)


def grid_seed_scores(histories: pd.DataFrame) -> pd.DataFrame:
    """Each seed's score of each (lr, weight decay): the mean over its folds of the last
    epoch's train and validation loss. Columns repeat, lr, weight_decay, train_loss,
    val_loss, n_folds."""
    histories = _repeats(histories)
    keys = ["repeat", *GRID_CELL, "fold"]
    last = histories.loc[histories.groupby(keys)["epoch"].idxmax()]
    return (
        last.groupby(["repeat", *GRID_CELL])
        .agg(
            train_loss=("train_loss", "mean"),
            val_loss=("val_loss", "mean"),
            n_folds=("fold", "nunique"),
        )
        .reset_index()
    )


def _rank_grid(table: pd.DataFrame) -> pd.DataFrame:
    """Ranked by mean validation loss (rank 1 is the best); equal losses go to the larger
    learning rate, then the larger weight decay."""
    table = table.sort_values(
        ["val_loss_mean", "lr", "weight_decay"], ascending=[True, False, False]
    ).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.fillna({"train_loss_std": 0.0, "val_loss_std": 0.0})


# An epoch is dead when its model gave every image the same, all-black output: its
# reconstructions vary less than DEAD_SPREAD of what the images do (output_spread) and its
# loss is above DEAD_BLACK of an all-black output's (black_ratio; see
# aemnist.training.EpochResult). A run's dead start is its leading dead epochs. Measured
# (2026-11-27, bench/dead_starts.py and probes at sizes 4 and 20, lr 0.01): a collapsed
# model's spread is below 1e-5 and its ratio 0.95-1.02; a model that has not yet learned to
# tell images apart (a few dozen steps) outputs about the mean image, ratio 0.6-0.8, and is
# not dead; a training one's spread is above 0.3 after a full MNIST epoch.
DEAD_SPREAD = 0.01
DEAD_BLACK = 0.9


def dead_epochs(history: pd.DataFrame) -> int:
    """How many epochs a run (its history, in epoch order) spent at an all-black constant
    output before it learned anything: its leading dead epochs. An unmeasured epoch (NaN)
    ends the count."""
    count = 0
    for spread, ratio in zip(history["output_spread"], history["black_ratio"], strict=True):
        if not (spread < DEAD_SPREAD and ratio > DEAD_BLACK):
            break
        count += 1
    return count


def _dead_epochs_of_runs(histories: pd.DataFrame, keys: list[str]) -> pd.Series:
    """Each training run's dead_epochs, indexed by ``keys`` (the columns naming a run)."""
    ordered = histories.sort_values([*keys, "epoch"])
    return ordered.groupby(keys)[["output_spread", "black_ratio"]].apply(dead_epochs)


def _with_dead_starts(table: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    """Table 1 with, per cell, how many of its runs (folds and seeds) started dead."""
    runs = [*GRID_CELL, "fold", "repeat"]
    dead = (_dead_epochs_of_runs(_repeats(histories), runs) > 0).groupby(GRID_CELL).sum()
    cells = zip(table["lr"], table["weight_decay"], strict=True)
    return table.assign(dead_starts=[int(dead.get(cell, 0)) for cell in cells])


def grid_summary(histories: pd.DataFrame) -> pd.DataFrame:
    """Table 1: per (lr, weight decay), the last epoch's train and validation loss, ranked by
    mean validation loss (rank 1 is the best).

    With one seed, mean ± standard deviation over the folds; with several (``repeat``), each
    seed's score is its mean over the folds, and the table gives their mean ± standard
    deviation over the seeds (``repeats``: how many)."""
    histories = _repeats(histories)
    if histories["repeat"].nunique() > 1:  # a row per seed and cell: its fold mean
        rows, folds = grid_seed_scores(histories), ("n_folds", "min")
    else:  # a row per fold and cell: its last epoch
        rows = histories.loc[histories.groupby([*GRID_CELL, "fold"])["epoch"].idxmax()]
        folds = ("fold", "nunique")
    table = (
        rows.groupby(GRID_CELL)
        .agg(
            train_loss_mean=("train_loss", "mean"),
            train_loss_std=("train_loss", "std"),
            val_loss_mean=("val_loss", "mean"),
            val_loss_std=("val_loss", "std"),
            n_folds=folds,
            repeats=("repeat", "nunique"),
        )
        .reset_index()
    )
    return _with_dead_starts(_rank_grid(table), histories)


def score_column(frame: pd.DataFrame) -> str:
    """The loss a sweep table was scored on: ``val_loss`` where it holds values (validation
    selection), else ``test_loss`` (the seed's selection on the test set)."""
    if "val_loss" in frame.columns and frame["val_loss"].notna().any():
        return "val_loss"
    return "test_loss"


def _mean_std(values: pd.Series | None) -> tuple[float, float]:
    """Mean and standard deviation of the values present (std 0 for one value; both NaN
    for none)."""
    values = pd.Series(dtype=float) if values is None else values.dropna()
    if values.empty:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


def _dead_starts_at_size(histories: pd.DataFrame, score: str, score_last: int) -> dict:
    """The seeds (repeats) of one size that started dead, their dead epochs, and the size's
    score (mean of the last ``score_last`` epochs) over those seeds and over the others: what
    a dead start cost (NaN where a group is empty)."""
    dead: dict[int, int] = {}
    scores: dict[int, float] = {}
    for repeat, run in histories.groupby("repeat"):
        run = run.sort_values("epoch")
        dead[int(repeat)] = dead_epochs(run)
        scores[int(repeat)] = float(run[score].tail(score_last).mean())

    def mean(repeats: list[int]) -> float:
        return float(pd.Series([scores[r] for r in repeats], dtype=float).mean())

    started_dead = [r for r, n in dead.items() if n]
    return {
        "dead_repeats": started_dead,
        "dead_epochs": [dead[r] for r in started_dead],
        "dead_loss": mean(started_dead),
        "alive_loss": mean([r for r in dead if r not in started_dead]),
    }


def sweep_summary(histories: pd.DataFrame, score_last: int) -> pd.DataFrame:
    """Table 2: per size, the mean loss of the last ``score_last`` epochs (on the test set or
    the held-out validation images, whichever the sweep was scored on), ranked.

    With one seed, ± is the spread of those last epochs; with several (``repeat``), each
    seed's score is its last epochs' mean, and the table gives their mean ± standard
    deviation over the seeds."""
    score = score_column(histories)
    if "repeat" not in histories.columns:
        histories = histories.assign(repeat=0)
    rows = []
    for size, h in histories.groupby("size"):
        tails = [r.sort_values("epoch").tail(score_last) for _, r in h.groupby("repeat")]
        row: dict[str, float | int] = {"size": int(size)}
        for column in ("test_loss", "val_loss"):
            if len(tails) == 1:
                row[column], row[f"{column}_std"] = _mean_std(tails[0].get(column))
            else:
                per_seed = pd.Series([_mean_std(t.get(column))[0] for t in tails])
                row[column], row[f"{column}_std"] = _mean_std(per_seed)
        row["train_loss"] = float(pd.concat([t["train_loss"] for t in tails]).mean())
        row["epochs_scored"] = len(tails[0])
        row["repeats"] = len(tails)
        row |= _dead_starts_at_size(h, score, score_last)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values([score, "size"]).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def sweep_seed_scores(histories: pd.DataFrame, score_last: int) -> pd.DataFrame:
    """Each seed's Table 2 score of each size: the mean of its last ``score_last`` epochs'
    scored loss (as sweep_summary scores one seed). Columns repeat, size, score."""
    score = score_column(histories)
    histories = _repeats(histories)
    rows = [
        {
            "repeat": int(repeat),
            "size": int(size),
            "score": float(h.sort_values("epoch").tail(score_last)[score].mean()),
        }
        for (repeat, size), h in histories.groupby(["repeat", "size"])
    ]
    return pd.DataFrame(rows, columns=["repeat", "size", "score"])


def seed_bests(scores: pd.DataFrame, keys: list[str], score: str) -> pd.DataFrame:
    """Each seed's own best: per ``repeat``, the row of ``scores`` with the lowest ``score``;
    equal scores go to the larger value of the first key (Table 1's tie rule: the larger
    learning rate), for sizes to the smaller (Table 2's). Columns repeat, *keys, score; one
    row per seed, in repeat order."""
    larger_first = keys != ["size"]
    ordered = scores.sort_values(
        ["repeat", score, *keys], ascending=[True, True, *([not larger_first] * len(keys))]
    )
    return ordered.groupby("repeat").head(1)[["repeat", *keys, score]].reset_index(drop=True)


def agreement(bests: pd.DataFrame, keys: list[str], best: dict[str, float]) -> int:
    """How many seeds' own best (``seed_bests``) is the table's ``best`` (its values of
    ``keys``), hyperparameters compared as the same number up to float noise."""
    same = pd.Series(True, index=bests.index)
    for key in keys:
        same &= np.isclose(bests[key].astype(float), float(best[key]), rtol=1e-9, atol=0.0)
    return int(same.sum())


def flat_table(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its list cells (Table 2's dead-start seeds) as "1, 3" text: what a CSV
    preview in MLflow and a Prefect table artifact (JSON) can show."""
    return frame.map(
        lambda v: ", ".join(str(x) for x in v) if isinstance(v, (list, np.ndarray)) else v
    )
