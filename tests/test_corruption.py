"""aemnist.corruption: noise and occlusion, and the reconstruction error under them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aemnist.corruption import (
    KINDS,
    Z95,
    corrupt,
    corruption_curves,
    corruption_examples,
    occlude,
    occlude_patch,
)
from aemnist.data import ImageSet, load_images
from aemnist.model import Autoencoder, build_autoencoder
from aemnist.schemas import SCHEMAS, TableRef, read_table, write_table
from aemnist.training import fit

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def clean_images(mnist_tables: dict[str, TableRef]) -> torch.Tensor:
    """The first 500 real test images."""
    return load_images(mnist_tables["test"].path, limit=500).images


@pytest.fixture(scope="module")
def trained_model(mnist_tables: dict[str, TableRef], clean_images: torch.Tensor) -> Autoencoder:
    """An autoencoder trained for one epoch on 3000 real training images."""
    train: ImageSet = load_images(mnist_tables["train"].path, limit=3000)
    model = build_autoencoder(8, seed=0)
    fit(
        model,
        train.images,
        clean_images,
        lr=2e-3,
        weight_decay=0.0,
        epochs=1,
        batch_size=16,
        seed=0,
    )
    return model.eval()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
def test_level_zero_is_the_identity(kind: str, clean_images: torch.Tensor) -> None:
    out = corrupt(clean_images, kind, 0.0, gen())

    assert torch.equal(out, clean_images)
    assert out.data_ptr() != clean_images.data_ptr()  # a copy, safe to change


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9, 1.0])
def test_occlusion_zeroes_that_fraction_of_every_images_pixels(fraction: float) -> None:
    images = torch.ones(20, 1, 28, 28)

    out = occlude(images, fraction, gen())

    zeros = (out == 0).reshape(20, -1).sum(dim=1)
    assert zeros.tolist() == [round(fraction * 784)] * 20
    assert set(out.unique().tolist()) <= {0.0, 1.0}


def test_occlusion_only_zeroes_pixels_and_varies_between_images(clean_images: torch.Tensor) -> None:
    images = clean_images[:10]

    out = occlude(images, 0.3, gen())

    changed = out != images
    assert (out[changed] == 0).all()
    masks = (out == 0) & (images != 0)
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize(("fraction", "side"), [(0.1, 9), (0.25, 14), (0.5, 20), (1.0, 28)])
def test_patch_zeroes_one_square_covering_the_fraction_at_a_place_drawn_per_image(
    fraction: float, side: int
) -> None:
    images = torch.ones(20, 1, 28, 28)

    out = occlude_patch(images, fraction, gen())

    zeros = out[:, 0] == 0
    assert zeros.reshape(20, -1).sum(dim=1).tolist() == [side * side] * 20
    for mask in zeros:  # one solid square: its bounding box is all zeros
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        assert len(rows) == side and len(cols) == side
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    if side < 28:
        assert len({tuple(m.nonzero()[0].tolist()) for m in zeros}) > 1


def test_noise_is_clipped_to_the_pixel_range_only_when_asked(clean_images: torch.Tensor) -> None:
    raw = corrupt(clean_images, "noise", 0.5, gen())
    clipped = corrupt(clean_images, "noise", 0.5, gen(), clip=True)

    assert raw.min() < 0 and raw.max() > 1
    assert clipped.min() == 0 and clipped.max() == 1
    assert torch.equal(clipped, raw.clamp(0, 1))


def test_intervals_are_1_96_standard_errors_of_the_per_image_mse(
    clean_images: torch.Tensor,
) -> None:
    # The table runs the model on batches of 64, this test on all 200 images at once, and a
    # kernel may add in another order for another batch size: ~1e-7 relative per output in
    # float32, which the one-pass variance amplifies by mean/std ~ 50 (per-image MSEs of an
    # untrained model hardly vary). In float64 (eps 2.2e-16) an output's rounding is at most
    # ~9 layers x 288-term sums x eps = 6e-13 relative, a per-image MSE's about twice that;
    # the one-pass variance adds n * eps * mean^2 / var = 200 * 2.2e-16 * 2700 = 1.2e-10 at
    # most. rel 1e-9 lies above those bounds (measured: 2e-16 and 2e-13) and far below
    # what another mask or another formula would give.
    model = build_autoencoder(4, seed=0).double()
    images = clean_images[:200].double()

    table = corruption_curves(model, images, {"occlusion": (0.5,)}, seed=0, batch_size=64)

    occluded = corrupt(images, "occlusion", 0.5, gen(0))
    with torch.no_grad():
        per_image = ((model(occluded) - images) ** 2).flatten(1).double().mean(dim=1)
    row = table.iloc[0]
    assert row["mse"] == pytest.approx(per_image.mean().item(), rel=1e-9)
    assert row["mse_ci95"] == pytest.approx(Z95 * per_image.std().item() / 200**0.5, rel=1e-9)
    assert 0 < row["baseline_mse_ci95"] < row["baseline_mse"]


def test_noise_adds_gaussian_noise_of_the_given_scale(clean_images: torch.Tensor) -> None:
    out = corrupt(clean_images, "noise", 0.5, gen())

    diff = out - clean_images
    assert diff.mean().item() == pytest.approx(0.0, abs=0.01)
    assert diff.std().item() == pytest.approx(0.5, rel=0.01)


def test_corruption_is_seeded(clean_images: torch.Tensor) -> None:
    for kind in KINDS:
        assert torch.equal(
            corrupt(clean_images, kind, 0.5, gen(3)), corrupt(clean_images, kind, 0.5, gen(3))
        )
        assert not torch.equal(
            corrupt(clean_images, kind, 0.5, gen(3)), corrupt(clean_images, kind, 0.5, gen(4))
        )


def test_unknown_kind_is_rejected(clean_images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="blur"):
        corrupt(clean_images, "blur", 0.5, gen())


def test_baseline_mse_is_zero_at_level_zero_and_grows_strictly_with_the_level(
    clean_images: torch.Tensor,
) -> None:
    levels = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
    model = build_autoencoder(4, seed=0)

    table = corruption_curves(model, clean_images, {k: levels for k in KINDS}, seed=0)

    for kind in KINDS:
        baseline = table.loc[table["kind"] == kind, "baseline_mse"].tolist()
        assert baseline[0] == 0.0
        assert all(a < b for a, b in zip(baseline, baseline[1:], strict=False)), (kind, baseline)
    noise = table[table["kind"] == "noise"].set_index("level")["baseline_mse"]
    assert noise[1.0] == pytest.approx(1.0, rel=0.02)  # E[(alpha * N(0,1))^2] = alpha^2
    occl = table[table["kind"] == "occlusion"].set_index("level")["baseline_mse"]
    # The same float32 squares (exactly rounded, so equal), summed in float64 in another
    # order: 784 + 500 terms, at most 1284 * 2.2e-16 = 2.8e-13 relative apart. (A float32 sum
    # of the 392000 squares could be 1e-6 off: log2(392000) * 6e-8.)
    assert occl[1.0] == pytest.approx(float((clean_images**2).double().mean()), rel=1e-12)


def test_reconstruction_mse_does_not_fall_as_the_level_grows(
    trained_model: Autoencoder, clean_images: torch.Tensor
) -> None:
    levels = (0.0, 0.5, 1.0)

    table = corruption_curves(
        trained_model, clean_images, {k: levels for k in KINDS}, seed=0, batch_size=128
    )

    for kind in KINDS:
        mse = table.loc[table["kind"] == kind, "mse"].tolist()
        assert all(a <= b for a, b in zip(mse, mse[1:], strict=False)), (kind, mse)
    clean = table.loc[table["level"] == 0.0, "mse"]
    assert clean.nunique() == 1  # level 0 is the same clean reconstruction for both kinds
    assert clean.iloc[0] < 0.08  # it learned something: a constant output scores about 0.10


def test_corruption_table_has_the_corruption_schema(
    tmp_path: Path, trained_model: Autoencoder, clean_images: torch.Tensor
) -> None:
    levels = {"noise": (0.0, 0.5), "occlusion": (0.0, 0.3, 0.6)}

    table = corruption_curves(trained_model, clean_images[:50], levels, seed=0)
    ref = write_table(table, tmp_path / "corruption.parquet", "corruption")

    back = read_table(ref.path, "corruption")
    assert back.schema.remove_metadata().equals(SCHEMAS["corruption"])
    assert back.num_rows == 5
    assert all(v > 0 for v in back.column("mse_ci95").to_pylist())
    assert back.column("kind").to_pylist() == ["noise"] * 2 + ["occlusion"] * 3
    assert back.column("level").to_pylist() == [0.0, 0.5, 0.0, 0.3, 0.6]


def test_corruption_examples_give_one_corrupted_and_restored_image_per_level(
    trained_model: Autoencoder, clean_images: torch.Tensor
) -> None:
    corrupted, restored = corruption_examples(
        trained_model, clean_images[0], "occlusion", (0.0, 0.5, 1.0), seed=0
    )

    assert corrupted.shape == (3, 28, 28) and restored.shape == (3, 28, 28)
    assert (corrupted[0] == clean_images[0, 0].numpy()).all()
    assert (corrupted[2] == 0).all()
    assert restored.min() >= 0.0 and restored.max() <= 1.0
