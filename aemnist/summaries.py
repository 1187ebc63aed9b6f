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


def sweep_summary(histories: pd.DataFrame, score_last: int) -> pd.DataFrame:
    """Table 2: per size, the mean test loss of the last ``score_last`` epochs, ranked."""
    rows = []
    for size, h in histories.groupby("size"):
        tail = h.sort_values("epoch").tail(score_last)
        rows.append(
            {
                "size": int(size),
                "test_loss": tail["test_loss"].mean(),
                "test_loss_std": tail["test_loss"].std() if len(tail) > 1 else 0.0,
                "train_loss": tail["train_loss"].mean(),
                "epochs_scored": len(tail),
            }
        )
    table = pd.DataFrame(rows).sort_values(["test_loss", "size"]).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table
