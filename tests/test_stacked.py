"""aemnist.stacked: several grid cells trained at once as one batched model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch

from aemnist.data import ImageSet, load_images, make_folds
from aemnist.model import build_autoencoder
from aemnist.schemas import TableRef
from aemnist.stacked import StackedAutoencoders, fit_stacked, train_fold_group, train_size_group
from aemnist.training import EpochResult, fit, train_fold, train_size

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Three grid cells: each its own learning rate, weight decay, seed (initial weights and
# batch order) and validation fold of the same 1500 real images.
LRS, WDS, SEEDS = [1e-2, 5e-3, 1e-3], [1e-5, 5e-6, 0.0], [11, 22, 33]
# Stacked and separate models do the same arithmetic through different kernels (grouped
# against single convolutions, batched against single matrix products) that add in other
# orders. In float32 that alone moves results by ~1e-7 relative, and 16 Adam steps at lr 1e-2
# amplify it into weight differences of 1e-5 to 1e-3 that depend on the CPU's instruction set
# (AVX-512, AVX2, ...): no float32 tolerance both holds on every x86-64 CPU and still catches
# a slip. So the comparisons run in float64 (eps 2.2e-16), where a sum of N terms is off by at
# most N * eps relative to the sum of their magnitudes: 5.6e-12 for the longest sum of a step
# (a first-layer weight's gradient, 128 images x 14 x 14 = 25088 terms), 8.6e-11 for the
# longest of a loss (the evaluation set's 500 x 784 pixels), typically sqrt(N) * eps.
# Measured: weights within 1e-15 absolute (of magnitudes ~0.1), losses within a few eps, with
# every instruction set torch and oneDNN pick among on an AMD EPYC. rtol 1e-9 and atol 1e-12
# lie above both bounds and 1000x above what was measured, and far below what a difference
# in the arithmetic (an lr, a weight decay, a batch order: >= 1e-4) or a float32 step (~1e-7)
# would give.
RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(scope="module")
def images(mnist_tables: dict[str, TableRef]) -> ImageSet:
    return load_images(mnist_tables["train"].path, limit=1500)


def fold_masks(n: int) -> list[torch.Tensor]:
    return [torch.arange(n) % 3 == k for k in range(3)]


def test_stacked_training_gives_each_model_what_separate_training_gives(
    images: ImageSet,
) -> None:
    x, masks = images.images.double(), fold_masks(len(images))
    separate = []
    for k in range(3):
        model = build_autoencoder(6, SEEDS[k]).double()
        history = fit(
            model, x[~masks[k]], x[masks[k]], lr=LRS[k], weight_decay=WDS[k],
            epochs=2, batch_size=128, seed=SEEDS[k],
        )  # fmt: skip
        separate.append((model, history))
    models = [build_autoencoder(6, seed).double() for seed in SEEDS]

    histories = fit_stacked(
        models, x, [torch.nonzero(~m).squeeze(1) for m in masks], [x[m] for m in masks],
        lrs=LRS, weight_decays=WDS, seeds=SEEDS, epochs=2, batch_size=128,
    )  # fmt: skip

    for k, (model, history) in enumerate(separate):
        assert [h.epoch for h in histories[k]] == [1, 2]
        assert [h.lr for h in histories[k]] == [LRS[k], LRS[k]]
        for ours, theirs in zip(histories[k], history, strict=True):
            assert ours.train_loss == pytest.approx(theirs.train_loss, rel=RTOL)
            assert ours.eval_loss == pytest.approx(theirs.eval_loss, rel=RTOL)
            assert ours.black_ratio == pytest.approx(theirs.black_ratio, rel=RTOL)
            # A variance over the images (E[x^2] - E[x]^2 per pixel, in float64): cancellation
            # can lift relative error by mean^2 / variance, here at most ~1e3 (measured
            # spreads 0.005 to 0.1 of pixels whose mean is ~0.1), so still far under 1e-9.
            assert ours.output_spread == pytest.approx(theirs.output_spread, rel=RTOL)
        for a, b in zip(models[k].parameters(), model.parameters(), strict=True):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    # Not one model trained three times: the cells' losses differ.
    assert len({round(h[-1].eval_loss, 6) for h in histories}) == 3


# One encoding size (the grid's groups), and three (the sweep's: the narrower codes padded
# with zero rows and columns, which must add exactly nothing).
@pytest.mark.parametrize("sizes", [(4, 4, 4), (2, 6, 4)], ids=["one size", "padded sizes"])
def test_stacked_forward_is_each_models_own_forward(
    images: ImageSet, sizes: tuple[int, int, int]
) -> None:
    # In float64, for the reason RTOL gives: the longest sum of the forward pass has 288
    # terms (288 * 2.2e-16 = 6e-14 relative at most), through nine layers.
    models = [
        build_autoencoder(size, seed).double().eval()
        for size, seed in zip(sizes, SEEDS, strict=True)
    ]
    batch = torch.stack([images.images[i * 8 : (i + 1) * 8, 0] for i in range(3)], dim=1)
    batch = batch.double()

    with torch.no_grad():
        out = StackedAutoencoders(models)(batch)

    for k, model in enumerate(models):
        with torch.no_grad():
            alone = model(batch[:, k : k + 1])
        torch.testing.assert_close(out[:, k : k + 1], alone, rtol=RTOL, atol=ATOL)


def test_models_of_different_training_counts_are_refused(images: ImageSet) -> None:
    x = images.images
    with pytest.raises(ValueError, match="equally many images"):
        fit_stacked(
            [build_autoencoder(4, 0), build_autoencoder(4, 1)], x,
            [torch.arange(100), torch.arange(99)], [x[:10], x[:10]],
            lrs=[1e-3, 1e-3], weight_decays=[0.0, 0.0], seeds=[0, 1], epochs=1, batch_size=32,
        )  # fmt: skip


def three_cells(x: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """The three cells of the tests above, as fit_stacked's arguments (but the models)."""
    masks = fold_masks(len(x))
    return masks, {
        "images": x,
        "train_index": [torch.nonzero(~m).squeeze(1) for m in masks],
        "eval_images": [x[m] for m in masks],
        "lrs": LRS,
        "weight_decays": WDS,
        "seeds": SEEDS,
        "batch_size": 128,
    }


def test_each_models_epochs_reach_its_own_callback_in_order(images: ImageSet) -> None:
    _, args = three_cells(images.images)
    seen: list[list[EpochResult]] = [[], [], []]
    histories = fit_stacked(
        [build_autoencoder(6, seed) for seed in SEEDS], **args, epochs=2,
        on_epoch=[seen[k].append for k in range(3)],
    )  # fmt: skip
    assert seen == histories
    assert all(not h.resumed for h in seen[0])
    with pytest.raises(ValueError, match="2 epoch callbacks for 3 models"):
        fit_stacked(
            [build_autoencoder(6, seed) for seed in SEEDS], **args, epochs=1,
            on_epoch=[seen[0].append, seen[1].append],
        )  # fmt: skip


def test_a_resumed_stack_ends_exactly_where_an_uninterrupted_one_does(
    images: ImageSet, tmp_path: Path
) -> None:
    # Bit-identity: the same computation on the same machine, so no tolerance.
    _, args = three_cells(images.images)
    straight_models = [build_autoencoder(6, seed) for seed in SEEDS]
    straight = fit_stacked(straight_models, **args, epochs=3)

    checkpoint = tmp_path / "stack.pt"
    models = [build_autoencoder(6, seed) for seed in SEEDS]
    fit_stacked(models, **args, epochs=2, checkpoint=checkpoint, resume_key="k")  # stopped
    # A checkpoint of another key is ignored: that run starts over (and here goes 1 epoch).
    other = fit_stacked(
        [build_autoencoder(6, seed) for seed in SEEDS], **args, epochs=1,
        checkpoint=tmp_path / "other.pt", resume_key="other",
    )  # fmt: skip
    assert [h.epoch for h in other[0]] == [1]
    seen: list[list[EpochResult]] = [[], [], []]
    fresh = [build_autoencoder(6, seed) for seed in SEEDS]  # as a new process builds them
    resumed = fit_stacked(
        fresh, **args, epochs=3, checkpoint=checkpoint, resume_key="k",
        on_epoch=[seen[k].append for k in range(3)],
    )  # fmt: skip

    for k in range(3):
        assert [h.resumed for h in seen[k]] == [True, True, False]
        assert [dataclasses.replace(h, resumed=False) for h in resumed[k]] == straight[k]
        for a, b in zip(fresh[k].parameters(), straight_models[k].parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_fold_group_gives_each_cell_what_train_fold_gives_it(images: ImageSet) -> None:
    # In float64 for RTOL's reason; the cells share fold 1 of a stratified 3-fold split, as
    # the grid's stacked groups do, with two repeats of one setting among them.
    x = dataclasses.replace(images, images=images.images.double())
    folds = make_folds(x.idx, x.labels, 3, seed=0)
    cells = [(1e-2, 1e-5, 0), (5e-3, 0.0, 0), (5e-3, 0.0, 1)]
    common = {"size": 6, "epochs": 2, "batch_size": 128, "seed": 7, "output_bias_at_mean": True}

    stacked = train_fold_group(x, folds, 1, cells, **common)

    for (lr, wd, repeat), ours in zip(cells, stacked, strict=True):
        alone = train_fold(x, folds, 1, lr=lr, weight_decay=wd, repeat=repeat, **common)
        assert list(ours.columns) == list(alone.columns)
        pd.testing.assert_frame_equal(ours, alone, check_exact=False, rtol=RTOL, atol=ATOL)
    # Each cell trained from its own draw: the two repeats differ.
    assert not stacked[1]["val_loss"].equals(stacked[2]["val_loss"])


def test_a_size_group_gives_each_size_what_train_size_gives_it_schedule_included(
    mnist_tables: dict[str, TableRef], tmp_path: Path
) -> None:
    # The sweep's way: sizes 2 and 6 side by side (the narrower padded), the same images,
    # each with its own ReduceLROnPlateau on its own test loss. In float64 for RTOL's reason.
    def double(table: str, limit: int) -> ImageSet:
        loaded = load_images(mnist_tables[table].path, limit=limit)
        return dataclasses.replace(loaded, images=loaded.images.double())

    train, test = double("train", 1500), double("test", 500)
    cells = [(2, 0), (6, 1)]
    common = {
        "lr": 1e-2, "weight_decay": 1e-5, "plateau_patience": 0, "batch_size": 128, "seed": 7
    }  # fmt: skip

    stacked = train_size_group(train, test, cells, epochs=4, **common)

    for (size, repeat), ours in zip(cells, stacked, strict=True):
        _, alone = train_size(train, test, size=size, repeat=repeat, epochs=4, **common)
        pd.testing.assert_frame_equal(ours, alone, check_exact=False, rtol=RTOL, atol=ATOL)
    # Each model kept its own schedule (measured: size 6 repeat 1 stalled at epoch 2 and was
    # cut to 1e-3, then 1e-4; size 2 kept 1e-2): one cut, the other not.
    assert list(stacked[0]["lr"]) == [1e-2] * 4
    assert list(stacked[1]["lr"])[2:] == pytest.approx([1e-3, 1e-4])

    # Stopped after epoch 3 and resumed: the schedules come back with the models, and the
    # histories end exactly as the uninterrupted ones (same machine: no tolerance).
    checkpoint = tmp_path / "sweep-stack.pt"
    train_size_group(train, test, cells, epochs=3, checkpoint=checkpoint, resume_key="k", **common)
    resumed = train_size_group(
        train, test, cells, epochs=4, checkpoint=checkpoint, resume_key="k", **common
    )
    for ours, straight in zip(resumed, stacked, strict=True):
        pd.testing.assert_frame_equal(ours, straight, check_exact=True)
