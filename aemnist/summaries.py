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


def grid_summary(histories: pd.DataFrame) -> pd.DataFrame:
    """Table 1: per (lr, weight decay), the last epoch's train and validation loss, ranked by
    mean validation loss (rank 1 is the best).

    With one seed, mean ± standard deviation over the folds; with several (``repeat``), each
    seed's score is its mean over the folds, and the table gives their mean ± standard
    deviation over the seeds (``repeats``: how many)."""
    histories = _repeats(histories)
    n_seeds = histories["repeat"].nunique()
    if n_seeds > 1:
        per_seed = grid_seed_scores(histories)
        table = (
            per_seed.groupby(GRID_CELL)
            .agg(
                train_loss_mean=("train_loss", "mean"),
                train_loss_std=("train_loss", "std"),
                val_loss_mean=("val_loss", "mean"),
                val_loss_std=("val_loss", "std"),
                n_folds=("n_folds", "min"),
                repeats=("repeat", "nunique"),
            )
            .reset_index()
        )
        return _rank_grid(table)
    last = histories.loc[histories.groupby([*GRID_CELL, "fold"])["epoch"].idxmax()]
    table = (
        last.groupby(GRID_CELL)
        .agg(
            train_loss_mean=("train_loss", "mean"),
            train_loss_std=("train_loss", "std"),
            val_loss_mean=("val_loss", "mean"),
            val_loss_std=("val_loss", "std"),
            n_folds=("fold", "nunique"),
        )
        .reset_index()
        .assign(repeats=1)
    )
    return _rank_grid(table)


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
