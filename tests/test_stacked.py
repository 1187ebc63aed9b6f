"""aemnist.stacked: several grid cells trained at once as one batched model."""

from __future__ import annotations

import pytest
import torch

from aemnist.data import ImageSet, load_images
from aemnist.model import build_autoencoder
from aemnist.schemas import TableRef
from aemnist.stacked import StackedAutoencoders, fit_stacked
from aemnist.training import fit

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
        for a, b in zip(models[k].parameters(), model.parameters(), strict=True):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    # Not one model trained three times: the cells' losses differ.
    assert len({round(h[-1].eval_loss, 6) for h in histories}) == 3


def test_stacked_forward_is_each_models_own_forward(images: ImageSet) -> None:
    # In float64, for the reason RTOL gives: the longest sum of the forward pass has 288
    # terms (288 * 2.2e-16 = 6e-14 relative at most), through nine layers.
    models = [build_autoencoder(4, seed).double().eval() for seed in SEEDS]
    batch = torch.stack([images.images[i * 8 : (i + 1) * 8, 0] for i in range(3)], dim=1)
    batch = batch.double()

    with torch.no_grad():
        out = StackedAutoencoders(models)(batch)

    for k, model in enumerate(models):
        with torch.no_grad():
            alone = model(batch[:, k : k + 1])
        torch.testing.assert_close(out[:, k : k + 1], alone, rtol=RTOL, atol=ATOL)


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
