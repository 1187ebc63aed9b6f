"""Aggregation: the seed's Table 1 (grid search) and Table 2 (size sweep)."""

from __future__ import annotations

import pandas as pd


def grid_summary(histories: pd.DataFrame) -> pd.DataFrame:
    """Table 1: per (lr, weight decay), the mean and spread over folds of the last epoch's
    train and validation loss, ranked by mean validation loss (rank 1 is the best)."""
    last = histories.loc[histories.groupby(["lr", "weight_decay", "fold"])["epoch"].idxmax()]
    table = (
        last.groupby(["lr", "weight_decay"])
        .agg(
            train_loss_mean=("train_loss", "mean"),
            train_loss_std=("train_loss", "std"),
            val_loss_mean=("val_loss", "mean"),
            val_loss_std=("val_loss", "std"),
            n_folds=("fold", "nunique"),
        )
        .reset_index()
        .sort_values(["val_loss_mean", "lr", "weight_decay"], ascending=[True, False, False])
        .reset_index(drop=True)
    )
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.fillna({"train_loss_std": 0.0, "val_loss_std": 0.0})


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
