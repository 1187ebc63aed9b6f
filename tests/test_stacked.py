"""aemnist.stacked: several grid cells trained at once as one batched model."""

from __future__ import annotations

import pytest
import torch

import aemnist.training
from aemnist.data import ImageSet, load_images
from aemnist.model import build_autoencoder
from aemnist.schemas import TableRef
from aemnist.stacked import StackedAutoencoders, fit_stacked
from aemnist.training import fit

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Three grid cells: each its own learning rate, weight decay, seed (initial weights and
# batch order) and validation fold of the same 1500 real images.
LRS, WDS, SEEDS = [1e-2, 5e-3, 1e-3], [1e-5, 5e-6, 0.0], [11, 22, 33]


@pytest.fixture(scope="module")
def images(mnist_tables: dict[str, TableRef]) -> ImageSet:
    return load_images(mnist_tables["train"].path, limit=1500)


def fold_masks(n: int) -> list[torch.Tensor]:
    return [torch.arange(n) % 3 == k for k in range(3)]


def test_stacked_training_gives_each_model_what_separate_training_gives(
    images: ImageSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Separate training in the layout the stacked model uses (channels-last kernels round
    # differently): then only grouped against single convolutions differ, in the last bits.
    monkeypatch.setattr(aemnist.training, "CHANNELS_LAST", False)
    x, masks = images.images, fold_masks(len(images))
    separate = []
    for k in range(3):
        model = build_autoencoder(6, SEEDS[k])
        history = fit(
            model, x[~masks[k]], x[masks[k]], lr=LRS[k], weight_decay=WDS[k],
            epochs=2, batch_size=128, seed=SEEDS[k],
        )  # fmt: skip
        separate.append((model, history))
    models = [build_autoencoder(6, seed) for seed in SEEDS]

    histories = fit_stacked(
        models, x, [torch.nonzero(~m).squeeze(1) for m in masks], [x[m] for m in masks],
        lrs=LRS, weight_decays=WDS, seeds=SEEDS, epochs=2, batch_size=128,
    )  # fmt: skip

    for k, (model, history) in enumerate(separate):
        assert [h.epoch for h in histories[k]] == [1, 2]
        assert [h.lr for h in histories[k]] == [LRS[k], LRS[k]]
        for ours, theirs in zip(histories[k], history, strict=True):
            assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
            assert ours.eval_loss == pytest.approx(theirs.eval_loss, rel=1e-4)
        for a, b in zip(models[k].parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # Not one model trained three times: the cells' losses differ.
    assert len({round(h[-1].eval_loss, 6) for h in histories}) == 3


def test_stacked_forward_is_each_models_own_forward(images: ImageSet) -> None:
    models = [build_autoencoder(4, seed).eval() for seed in SEEDS]
    batch = torch.stack([images.images[i * 8 : (i + 1) * 8, 0] for i in range(3)], dim=1)

    with torch.no_grad():
        out = StackedAutoencoders(models)(batch)

    for k, model in enumerate(models):
        with torch.no_grad():
            alone = model(batch[:, k : k + 1])
        torch.testing.assert_close(out[:, k : k + 1], alone, rtol=1e-5, atol=1e-6)


def test_models_of_different_sizes_or_training_counts_are_refused(images: ImageSet) -> None:
    x = images.images
    with pytest.raises(ValueError, match="one encoding size"):
        StackedAutoencoders([build_autoencoder(4, 0), build_autoencoder(6, 0)])
    with pytest.raises(ValueError, match="equally many images"):
        fit_stacked(
            [build_autoencoder(4, 0), build_autoencoder(4, 1)], x,
            [torch.arange(100), torch.arange(99)], [x[:10], x[:10]],
            lrs=[1e-3, 1e-3], weight_decays=[0.0, 0.0], seeds=[0, 1], epochs=1, batch_size=32,
        )  # fmt: skip
