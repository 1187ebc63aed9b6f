"""Leakage-free selection and repeated seeds: the sweep scored on held-out images, several
seeds of the grid and the sweep, and how often the seeds agree on the bests."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import pytest
import torch

from aemnist.config import ConfigError, load_config, run_overrides
from aemnist.data import ImageSet, holdout_mask, load_images
from aemnist.schemas import TableRef
from aemnist.summaries import (
    agreement,
    grid_seed_scores,
    grid_summary,
    score_column,
    seed_bests,
    sweep_seed_scores,
    sweep_summary,
)
from aemnist.training import evaluate, train_fold, train_size, training_layout
from flows.cli.options import add_config_options, study_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def evaluate_as_fit(model: torch.nn.Module, images: torch.Tensor) -> float:
    """``evaluate`` in the layout fit evaluates in, so with its kernels: for the same weights
    and images, the very number fit reported (other kernels add in other orders, ~1e-7
    relative per output, which the squared error amplifies)."""
    layout = training_layout("cpu")
    return evaluate(model.to(memory_format=layout), images.contiguous(memory_format=layout))


@pytest.fixture(scope="module")
def small_sets(mnist_tables: dict[str, TableRef]) -> tuple[ImageSet, ImageSet]:
    return (
        load_images(mnist_tables["train"].path, limit=1200),
        load_images(mnist_tables["test"].path, limit=300),
    )


def test_holdout_is_seeded_stratified_and_of_the_asked_size() -> None:
    labels = np.repeat(np.arange(10), 100)

    mask = holdout_mask(labels, 200, seed=3)

    assert mask.sum() == 200
    assert np.bincount(labels[mask]).tolist() == [20] * 10
    assert (holdout_mask(labels, 200, seed=3) == mask).all()
    assert (holdout_mask(labels, 200, seed=4) != mask).any()


def test_validation_selection_scores_held_out_training_images_and_never_the_test_set(
    small_sets: tuple[ImageSet, ImageSet],
) -> None:
    train, test = small_sets
    poisoned = ImageSet(torch.full_like(test.images, float("nan")), test.labels, test.idx)
    kwargs = dict(size=4, lr=5e-3, weight_decay=0.0, epochs=2, plateau_patience=5)

    model, history = train_size(
        train, poisoned, batch_size=64, seed=0, selection="validation", validation_images=200,
        **kwargs,
    )  # fmt: skip

    assert history["test_loss"].isna().all()  # the test set (NaN here) was never scored
    assert history["val_loss"].notna().all()
    held = torch.from_numpy(holdout_mask(train.labels, 200, seed=0))
    assert history["val_loss"].iloc[-1] == evaluate_as_fit(model, train.images[held])
    assert score_column(history) == "val_loss"


def test_test_selection_is_the_seeds_and_leaves_validation_empty(
    small_sets: tuple[ImageSet, ImageSet],
) -> None:
    train, test = small_sets

    model, history = train_size(
        train, test, size=4, lr=5e-3, weight_decay=0.0, epochs=1, plateau_patience=5,
        batch_size=64, seed=0,
    )  # fmt: skip

    assert history["val_loss"].isna().all()
    assert history["test_loss"].iloc[-1] == evaluate_as_fit(model, test.images)
    assert score_column(history) == "test_loss"


def test_table2_ranks_by_the_validation_loss_when_the_sweep_was_scored_on_it() -> None:
    nan = float("nan")
    histories = pd.DataFrame(
        {
            "size": [4, 4, 8, 8],
            "epoch": [1, 2, 1, 2],
            "lr": [1e-3] * 4,
            "train_loss": [0.05, 0.04, 0.03, 0.02],
            "test_loss": [nan] * 4,
            "val_loss": [0.02, 0.01, 0.05, 0.04],  # size 4 better on validation
            "output_spread": [0.5] * 4,
            "black_ratio": [0.3] * 4,
        }
    )

    table = sweep_summary(histories, score_last=2)

    assert table["size"].tolist() == [4, 8]
    assert table["val_loss"].tolist() == pytest.approx([0.015, 0.045])
    assert all(math.isnan(v) for v in table["test_loss"])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sweep": {"selection": "train"}}, "sweep.selection"),
        ({"sweep": {"selection": "validation", "validation_images": 5}}, "sweep.validation_images"),
        (
            {"sweep": {"selection": "validation", "validation_images": 2000}},
            "sweep.validation_images",
        ),
    ],
)
def test_invalid_selection_settings_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        load_config("smoke", overrides=overrides)


def test_quick_selects_on_validation_and_paper_keeps_the_seeds_test_selection() -> None:
    assert load_config("quick").sweep.selection == "validation"
    assert load_config("paper").sweep.selection == "test"
    assert load_config("paper").final.size == 20


def test_repeat_zero_is_the_studys_own_seed_and_other_repeats_train_from_other_seeds(
    small_sets: tuple[ImageSet, ImageSet],
) -> None:
    train, test = small_sets
    kwargs = dict(size=4, lr=5e-3, weight_decay=0.0, epochs=1, plateau_patience=5, batch_size=64)

    _, plain = train_size(train, test, seed=0, **kwargs)
    _, first = train_size(train, test, seed=0, repeat=0, **kwargs)
    _, second = train_size(train, test, seed=0, repeat=1, **kwargs)

    assert first.equals(plain)
    assert (second["repeat"] == 1).all() and (first["repeat"] == 0).all()
    assert second["test_loss"].iloc[0] != first["test_loss"].iloc[0]


def test_a_grid_repeat_trains_the_same_folds_from_another_seed_and_repeat_zero_as_before(
    small_sets: tuple[ImageSet, ImageSet],
) -> None:
    train, _ = small_sets
    folds = pd.DataFrame({"idx": train.idx, "fold": np.arange(len(train.idx)) % 2})
    kwargs = dict(lr=5e-3, weight_decay=0.0, size=4, epochs=1, batch_size=64, seed=0)

    plain = train_fold(train, folds, 1, **kwargs)
    first = train_fold(train, folds, 1, repeat=0, **kwargs)
    second = train_fold(train, folds, 1, repeat=1, **kwargs)

    assert first.equals(plain)  # repeat 0 keeps the study's own seed, so its old tables
    assert list(second.columns) == list(plain.columns)  # the history's schema is unchanged
    assert second["val_loss"].iloc[0] != first["val_loss"].iloc[0]


def _grid_histories(per_seed: dict[int, dict[tuple[float, float], float]]) -> pd.DataFrame:
    """Two folds and two epochs per cell; at the last epoch fold 0 scores ``v - 0.001`` and
    fold 1 ``v + 0.001``, so each seed's fold mean is ``v``."""
    rows = []
    for repeat, cells in per_seed.items():
        for (lr, wd), v in cells.items():
            for fold, shift in ((0, -0.001), (1, 0.001)):
                for epoch, extra in ((1, 0.05), (2, 0.0)):
                    rows.append(
                        {"repeat": repeat, "lr": lr, "weight_decay": wd, "fold": fold,
                         "epoch": epoch, "train_loss": v + shift + extra - 0.002,
                         "val_loss": v + shift + extra, "output_spread": 0.5,
                         "black_ratio": 0.3}
                    )  # fmt: skip
    return pd.DataFrame(rows)


# Three seeds on a 2-cell grid: (0.01, 1e-5) is best on the mean, but seed 2 prefers 0.005.
SEEDS = {
    0: {(0.01, 1e-5): 0.020, (0.005, 1e-5): 0.024},
    1: {(0.01, 1e-5): 0.021, (0.005, 1e-5): 0.023},
    2: {(0.01, 1e-5): 0.025, (0.005, 1e-5): 0.022},
}


def test_table1_over_seeds_gives_mean_and_std_of_each_seeds_fold_mean() -> None:
    histories = _grid_histories(SEEDS)

    scores = grid_seed_scores(histories)
    table = grid_summary(histories)

    best = scores[(scores["repeat"] == 2) & (scores["lr"] == 0.01)]
    assert best["val_loss"].item() == pytest.approx(0.025)  # the mean over its two folds
    assert table[["lr", "weight_decay"]].iloc[0].tolist() == [0.01, 1e-5]
    assert table["val_loss_mean"].iloc[0] == pytest.approx((0.020 + 0.021 + 0.025) / 3)
    assert table["val_loss_std"].iloc[0] == pytest.approx(np.std([0.020, 0.021, 0.025], ddof=1))
    assert table["train_loss_mean"].iloc[0] == pytest.approx((0.020 + 0.021 + 0.025) / 3 - 0.002)
    assert (table["repeats"] == 3).all() and (table["n_folds"] == 2).all()
    assert table["rank"].tolist() == [1, 2]


def test_table1_of_one_seed_is_over_the_folds_as_before() -> None:
    one = _grid_histories({0: SEEDS[0]})

    with_column = grid_summary(one)
    without = grid_summary(one.drop(columns="repeat"))

    pd.testing.assert_frame_equal(with_column, without)
    assert (without["repeats"] == 1).all()
    # ± is over the two folds (0.001 either side of the mean), not over seeds.
    assert without["val_loss_std"].iloc[0] == pytest.approx(np.std([-0.001, 0.001], ddof=1))


def test_each_seeds_own_best_and_how_many_seeds_agree_with_the_table() -> None:
    scores = grid_seed_scores(_grid_histories(SEEDS))

    bests = seed_bests(scores, ["lr", "weight_decay"], "val_loss")

    assert bests["repeat"].tolist() == [0, 1, 2]
    assert bests["lr"].tolist() == [0.01, 0.01, 0.005]
    assert agreement(bests, ["lr", "weight_decay"], {"lr": 0.01, "weight_decay": 1e-5}) == 2
    # Values compared as numbers: 0.01 written as 0.1 / 10 is the same learning rate.
    assert agreement(bests, ["lr", "weight_decay"], {"lr": 0.1 / 10, "weight_decay": 1e-5}) == 2
    assert agreement(bests, ["lr", "weight_decay"], {"lr": 0.005, "weight_decay": 1e-5}) == 1


def test_equal_scores_go_to_the_larger_lr_in_table1_and_the_smaller_size_in_table2() -> None:
    grid = pd.DataFrame(
        {"repeat": [0, 0], "lr": [0.005, 0.01], "weight_decay": [1e-5, 1e-5],
         "val_loss": [0.02, 0.02]}
    )  # fmt: skip
    sizes = pd.DataFrame({"repeat": [0, 0], "size": [8, 4], "score": [0.03, 0.03]})

    assert seed_bests(grid, ["lr", "weight_decay"], "val_loss")["lr"].tolist() == [0.01]
    assert seed_bests(sizes, ["size"], "score")["size"].tolist() == [4]


def test_each_seeds_table2_score_is_what_table2_averages_over_the_seeds() -> None:
    nan = float("nan")
    rows = [
        {"size": size, "repeat": repeat, "epoch": epoch, "lr": 1e-3, "train_loss": 0.0,
         "test_loss": 0.1 / size + 0.01 * repeat + 0.01 / epoch, "val_loss": nan,
         "output_spread": 0.5, "black_ratio": 0.3}
        for size in (4, 8) for repeat in (0, 1) for epoch in (1, 2, 3)
    ]  # fmt: skip
    histories = pd.DataFrame(rows)

    scores = sweep_seed_scores(histories, score_last=2)
    table = sweep_summary(histories, score_last=2).set_index("size")

    assert len(scores) == 4
    per_size = scores.groupby("size")["score"]
    assert per_size.mean().to_dict() == pytest.approx(table["test_loss"].to_dict())
    assert per_size.std().to_dict() == pytest.approx(table["test_loss_std"].to_dict())
    assert seed_bests(scores, ["size"], "score")["size"].tolist() == [8, 8]


def test_repeats_on_the_command_line_repeat_the_grid_and_the_sweep() -> None:
    parser = argparse.ArgumentParser()
    add_config_options(parser)

    config = study_config(parser.parse_args(["--profile", "smoke", "--repeats", "3"]))

    assert (config.grid.repeats, config.sweep.repeats) == (3, 3)
    assert run_overrides(repeats=2) == {"grid": {"repeats": 2}, "sweep": {"repeats": 2}}
    assert load_config("smoke").grid.repeats == 1
    # A config file may repeat one stage alone.
    assert load_config("smoke", overrides={"grid": {"repeats": 2}}).sweep.repeats == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_grid_repeats_below_one_are_refused_naming_the_field(bad: int) -> None:
    with pytest.raises(ConfigError, match=r"^grid\.repeats:"):
        load_config("smoke", overrides={"grid": {"repeats": bad}})
