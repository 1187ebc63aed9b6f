"""Leakage-free selection and repeated seeds: the sweep scored on held-out images, several seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from aemnist.config import ConfigError, load_config
from aemnist.data import ImageSet, holdout_mask, load_images
from aemnist.schemas import TableRef
from aemnist.summaries import score_column, sweep_summary
from aemnist.training import evaluate, train_size, training_layout

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
