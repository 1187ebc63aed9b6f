"""aemnist.model and aemnist.training: the autoencoder, its training loop, checkpoints."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from aemnist.data import ImageSet, load_images, make_folds
from aemnist.model import Autoencoder, build_autoencoder, load_checkpoint, save_checkpoint
from aemnist.schemas import TableRef, write_table
from aemnist.training import evaluate, fit, task_seed, train_fold, training_layout

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def train_images(mnist_tables: dict[str, TableRef]) -> ImageSet:
    """The first 3000 real training images."""
    return load_images(mnist_tables["train"].path, limit=3000)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the model ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 6, 20])
def test_encoder_gives_n_by_d_and_reconstruction_is_an_image_in_unit_range(
    size: int, train_images: ImageSet
) -> None:
    model = build_autoencoder(size, seed=0).eval()
    x = train_images.images[:17]

    with torch.no_grad():
        z = model.encoder(x)
        y = model(x)

    assert z.shape == (17, size)
    assert y.shape == (17, 1, 28, 28)
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_same_seed_builds_identical_weights_and_another_seed_different() -> None:
    assert same_weights(build_autoencoder(6, seed=3), build_autoencoder(6, seed=3))
    assert not same_weights(build_autoencoder(6, seed=3), build_autoencoder(6, seed=4))


def test_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_autoencoder(6, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_models_built_concurrently_in_threads_equal_those_built_sequentially() -> None:
    seeds = list(range(8))
    sequential = {s: build_autoencoder(10, s) for s in seeds}
    built: dict[int, Autoencoder] = {}
    barrier = threading.Barrier(2)

    def build(mine: list[int]) -> None:
        barrier.wait()
        for s in mine:
            built[s] = build_autoencoder(10, s)
            torch.rand(1000)  # other work on the global RNG, as a training thread would do

    threads = [threading.Thread(target=build, args=(seeds[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(built) == seeds
    for s in seeds:
        assert same_weights(built[s], sequential[s]), f"seed {s} differs when built in a thread"


def test_checkpoint_round_trip_gives_identical_outputs(
    tmp_path: Path, train_images: ImageSet
) -> None:
    model = build_autoencoder(7, seed=5)
    fit(
        model,
        train_images.images[:512],
        train_images.images[:64],
        lr=1e-2,
        weight_decay=0.0,
        epochs=1,
        batch_size=128,
        seed=0,
    )
    path = tmp_path / "ckpt" / "model.pt"

    save_checkpoint(model.eval(), path)
    loaded = load_checkpoint(path)

    assert loaded.size == 7
    assert not loaded.training
    assert same_weights(loaded, model)
    x = train_images.images[:100]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in path.parent.iterdir()) == [".model.pt.sha256", "model.pt"]


# --- training -----------------------------------------------------------------------------


def test_a_few_hundred_steps_on_real_images_lower_the_loss(train_images: ImageSet) -> None:
    images = train_images.images
    train, held_out = images[:2500], images[2500:]
    model = build_autoencoder(6, seed=0)
    before = evaluate(model, held_out)

    history = fit(
        model, train, held_out, lr=2e-3, weight_decay=0.0, epochs=2, batch_size=16, seed=0
    )  # 2 x 157 = 314 steps

    assert [h.epoch for h in history] == [1, 2]
    assert history[-1].eval_loss < history[0].eval_loss
    assert history[-1].eval_loss < 0.6 * before
    assert history[-1].train_loss < history[0].train_loss
    # The last epoch's score is the returned model's: scored in the layout fit scored in (its
    # kernels; the contiguous ones add in another order, ~1e-7 relative per output, which the
    # squared error amplifies), the same weights give the very same number.
    layout = training_layout("cpu")
    scored = evaluate(model.to(memory_format=layout), held_out.contiguous(memory_format=layout))
    assert history[-1].eval_loss == scored


def test_fit_is_deterministic_for_a_seed(train_images: ImageSet) -> None:
    images = train_images.images

    def run(seed: int) -> list:
        model = build_autoencoder(4, seed=1)
        return fit(
            model,
            images[:400],
            images[400:500],
            lr=1e-2,
            weight_decay=1e-5,
            epochs=2,
            batch_size=50,
            seed=seed,
        )

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_task_seed_is_stable_and_depends_on_the_key() -> None:
    assert task_seed(0, "grid", 0.01, 5e-6, 1) == task_seed(0, "grid", 0.01, 5e-6, 1)
    assert task_seed(0, "grid", 0.01, 5e-6, 1) != task_seed(0, "grid", 0.01, 5e-6, 2)
    assert task_seed(0, "grid", 0.01, 5e-6, 1) != task_seed(1, "grid", 0.01, 5e-6, 1)
    assert 0 <= task_seed(0, "sweep", 20) < 2**31


def test_train_fold_validates_on_the_requested_fold(train_images: ImageSet) -> None:
    subset = ImageSet(train_images.images[:600], train_images.labels[:600], train_images.idx[:600])
    folds = make_folds(subset.idx, subset.labels, k=3, seed=0)
    shuffled = folds.sample(frac=1.0, random_state=1)  # the table is looked up by idx, not row
    kwargs = dict(lr=5e-3, weight_decay=1e-5, size=4, epochs=2, batch_size=64, seed=11)

    history = train_fold(subset, shuffled, 1, **kwargs)

    assert len(history) == 2
    assert list(history["epoch"]) == [1, 2]
    assert set(history["lr"]) == {5e-3}
    assert set(history["weight_decay"]) == {1e-5}
    assert set(history["fold"]) == {1}

    # The same training, done by hand on the split the fold names, gives the same numbers.
    val = torch.from_numpy(folds.set_index("idx")["fold"].reindex(subset.idx).to_numpy() == 1)
    key = task_seed(11, "grid", 5e-3, 1e-5, 1)
    expected = fit(
        build_autoencoder(4, key),
        subset.images[~val],
        subset.images[val],
        lr=5e-3,
        weight_decay=1e-5,
        epochs=2,
        batch_size=64,
        seed=key,
    )
    assert list(history["val_loss"]) == [h.eval_loss for h in expected]
    assert list(history["train_loss"]) == [h.train_loss for h in expected]


def test_train_fold_history_is_a_grid_history_table(tmp_path: Path, train_images: ImageSet) -> None:
    subset = ImageSet(train_images.images[:300], train_images.labels[:300], train_images.idx[:300])
    folds = make_folds(subset.idx, subset.labels, k=3, seed=0)

    history = train_fold(
        subset, folds, 0, lr=1e-2, weight_decay=0.0, size=3, epochs=1, batch_size=100, seed=0
    )

    ref = write_table(history, tmp_path / "h.parquet", "grid_history")
    assert ref.rows == 1


def test_train_fold_rejects_folds_that_miss_an_image(train_images: ImageSet) -> None:
    subset = ImageSet(train_images.images[:300], train_images.labels[:300], train_images.idx[:300])
    folds = make_folds(subset.idx, subset.labels, k=3, seed=0).iloc[:-1]

    with pytest.raises(ValueError, match="folds"):
        train_fold(
            subset, folds, 0, lr=1e-2, weight_decay=0.0, size=3, epochs=1, batch_size=100, seed=0
        )


def test_evaluate_is_the_pixel_mean_squared_error() -> None:
    # In float64 (eps 2.2e-16): the model's outputs for batches of 3 and of 10 may come from
    # kernels that add in other orders, and the mean here sums 7840 terms in one go. Outputs
    # are off by at most ~9 layers x 288-term sums x eps = 6e-13 relative, the sums by
    # 7840 * eps = 1.7e-12; rel 1e-9 holds above both and fails on a float32 result (~1e-7).
    model = build_autoencoder(3, seed=0).double().eval()
    images = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        expected = torch.mean((model(images) - images) ** 2).item()

    assert evaluate(model, images, batch_size=3) == pytest.approx(expected, rel=1e-9)
