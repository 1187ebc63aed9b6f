"""The encoding space: encode test images, map them to 2-D with t-SNE, measure separation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from aemnist.data import ImageSet
from aemnist.model import Autoencoder

# scikit-learn is imported where used: the flow's module imports this one, and a study's
# start should not wait the 1.5 s that import takes.


def encode(
    model: Autoencoder, images: torch.Tensor, batch_size: int = 2048, device: str = "cpu"
) -> np.ndarray:
    """The latent codes of ``images`` (computed on ``device``) as a CPU array."""
    model.to(device)  # outside inference mode: the weights must stay ordinary tensors
    with torch.inference_mode():
        model.eval()
        images = images.to(device)
        starts = range(0, len(images), batch_size)
        parts = [model.encoder(images[s : s + batch_size]) for s in starts]
        return torch.cat(parts).cpu().numpy()


# A model that collapsed to one output for every image gives every image the same code
# (measured: 200 identical rows of magnitude 0.2); a model that learned anything spreads its
# codes by 1e-2 and more. Below this spread, relative to the codes' magnitude, far above
# float32 rounding (6e-8), the codes are one point.
COLLAPSED_SPREAD = 1e-4


class CollapsedEncodingError(ValueError):
    """The encodings are one point: there is nothing to map."""


def tsne_map(z: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """The 2-D t-SNE map of ``z``. Refuses codes that are all alike: scikit-learn's PCA
    initialisation divides by their spread, and t-SNE then crashes the process (SIGSEGV,
    scikit-learn 1.9.1) instead of raising."""
    from sklearn.manifold import TSNE

    codes = z.astype(np.float64)  # float32's own mean would blur identical rows by 1e-7
    spread = float(codes.std(axis=0).max())
    scale = 1.0 + float(np.abs(codes).mean())
    if spread <= COLLAPSED_SPREAD * scale:
        raise CollapsedEncodingError(
            f"the model encodes all {len(z)} images alike (largest per-dimension spread "
            f"{spread:.1e}, codes of mean magnitude {scale - 1:.2g}): it collapsed to one output "
            "for every image, so there is no map to draw; train it so that it learns (for "
            "instance training.output_bias_at_mean = true, another seed or more data) and run "
            "again"
        )

    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(z)


def knn_accuracy(points: np.ndarray, labels: np.ndarray, k: int, seed: int) -> float:
    """5-fold cross-validated accuracy of a k-NN classifier of the digit labels."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    scores = cross_val_score(KNeighborsClassifier(n_neighbors=k), points, labels, cv=folds)
    return float(np.mean(scores))


def separation_metrics(
    z: np.ndarray, xy: np.ndarray, labels: np.ndarray, k: int, seed: int
) -> dict[str, float]:
    from sklearn.metrics import silhouette_score

    return {
        "knn_accuracy_latent": knn_accuracy(z, labels, k, seed),
        "knn_accuracy_tsne": knn_accuracy(xy, labels, k, seed),
        "silhouette_latent": float(silhouette_score(z, labels)),
        "silhouette_tsne": float(silhouette_score(xy, labels)),
    }


def sample_indices(n_total: int, n: int, seed: int) -> np.ndarray:
    """A seeded sample of ``n`` positions, in increasing order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=min(n, n_total), replace=False))


def embed(
    model: Autoencoder,
    test: ImageSet,
    n_images: int,
    perplexity: float,
    knn: int,
    seed: int,
    device: str = "cpu",
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The embedding table (idx, label, z, tsne_x, tsne_y) and the separation metrics."""
    rows = sample_indices(len(test), n_images, seed)
    z = encode(model, test.images[torch.from_numpy(rows)], device=device)
    labels = test.labels[rows]
    xy = tsne_map(z, perplexity, seed)
    frame = pd.DataFrame(
        {
            "idx": test.idx[rows],
            "label": labels,
            "z": list(z.astype(np.float32)),
            "tsne_x": xy[:, 0],
            "tsne_y": xy[:, 1],
        }
    )
    return frame, separation_metrics(z, xy, labels, knn, seed)
