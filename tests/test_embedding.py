"""aemnist.embedding: encoding, t-SNE map, cluster-separation metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aemnist.data import ImageSet, load_images
from aemnist.embedding import (
    CollapsedEncodingError,
    embed,
    encode,
    knn_accuracy,
    sample_indices,
    separation_metrics,
    tsne_map,
)
from aemnist.model import build_autoencoder
from aemnist.schemas import SCHEMAS, TableRef, read_table, write_table

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def test_set(mnist_tables: dict[str, TableRef]) -> ImageSet:
    """The first 1000 real test images."""
    return load_images(mnist_tables["test"].path, limit=1000)


def blobs(
    n_per: int = 30, k: int = 10, dim: int = 8, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` tight, far-apart Gaussian clusters in ``dim`` dimensions and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(k, dim))
    labels = np.repeat(np.arange(k), n_per)
    points = centres[labels] + rng.normal(scale=0.3, size=(k * n_per, dim))
    return points.astype(np.float32), labels


def test_tsne_map_gives_two_coordinates_per_point() -> None:
    points, _ = blobs(n_per=12)

    xy = tsne_map(points, perplexity=10.0, seed=0)

    assert xy.shape == (120, 2)
    assert np.isfinite(xy).all()


def test_knn_accuracy_on_well_separated_clusters_is_above_ninety_percent() -> None:
    points, labels = blobs()

    assert knn_accuracy(points, labels, k=5, seed=0) > 0.9
    xy = tsne_map(points, perplexity=15.0, seed=0)
    metrics = separation_metrics(points, xy, labels, k=5, seed=0)
    assert metrics["knn_accuracy_latent"] > 0.9
    assert metrics["knn_accuracy_tsne"] > 0.9
    assert metrics["silhouette_latent"] > 0.5


def test_knn_accuracy_on_shuffled_labels_is_near_chance() -> None:
    points, labels = blobs()
    shuffled = np.random.default_rng(1).permutation(labels)

    assert knn_accuracy(points, shuffled, k=5, seed=0) < 0.3


def test_encode_gives_one_latent_vector_per_image(test_set: ImageSet) -> None:
    model = build_autoencoder(5, seed=0)

    z = encode(model, test_set.images[:70], batch_size=32)

    assert z.shape == (70, 5)


def test_sample_indices_are_seeded_distinct_and_sorted() -> None:
    rows = sample_indices(1000, 200, seed=3)

    assert len(rows) == 200 and len(set(rows.tolist())) == 200
    assert (np.diff(rows) > 0).all()
    assert np.array_equal(rows, sample_indices(1000, 200, seed=3))
    assert not np.array_equal(rows, sample_indices(1000, 200, seed=4))
    assert len(sample_indices(50, 200, seed=0)) == 50


def test_embed_returns_n_rows_of_the_embedding_schema_and_bounded_metrics(
    tmp_path: Path, test_set: ImageSet
) -> None:
    model = build_autoencoder(6, seed=0)

    frame, metrics = embed(model, test_set, n_images=200, perplexity=15.0, knn=5, seed=0)

    assert len(frame) == 200
    ref = write_table(frame, tmp_path / "embedding.parquet", "embedding")
    table = read_table(ref.path, "embedding")
    assert table.schema.remove_metadata().equals(SCHEMAS["embedding"])
    assert table.num_rows == 200
    assert all(len(z) == 6 for z in table.column("z").to_pylist())
    label_of = dict(zip(test_set.idx.tolist(), test_set.labels.tolist(), strict=True))
    assert [label_of[i] for i in frame["idx"]] == frame["label"].tolist()
    assert frame["idx"].is_unique

    assert set(metrics) == {
        "knn_accuracy_latent",
        "knn_accuracy_tsne",
        "silhouette_latent",
        "silhouette_tsne",
    }
    for name in ("knn_accuracy_latent", "knn_accuracy_tsne"):
        assert 0.0 <= metrics[name] <= 1.0, (name, metrics[name])
    for name in ("silhouette_latent", "silhouette_tsne"):
        assert -1.0 <= metrics[name] <= 1.0, (name, metrics[name])


def test_codes_of_a_collapsed_model_are_refused_with_the_cause_not_a_crash() -> None:
    # A collapsed model gives every image one code (one measured: 200 identical rows of
    # magnitude 0.2). scikit-learn 1.9.1's t-SNE takes the process down (SIGSEGV) on such rows;
    # the map must refuse them first, naming the cause and a fix.
    rng = np.random.default_rng(0)
    z = np.tile(rng.uniform(-0.5, 0.5, size=20).astype(np.float32), (200, 1))
    with pytest.raises(CollapsedEncodingError, match="encodes all 200 images alike") as caught:
        tsne_map(z, perplexity=30.0, seed=0)
    assert "output_bias_at_mean" in str(caught.value)
    # Codes a few float32 roundings apart are still one point.
    with pytest.raises(CollapsedEncodingError):
        tsne_map(z + rng.normal(scale=1e-7, size=z.shape).astype(np.float32), 30.0, 0)
    # One dimension that varies is a map to draw.
    z[:, 3] = rng.normal(size=200)
    assert tsne_map(z, perplexity=30.0, seed=0).shape == (200, 2)
