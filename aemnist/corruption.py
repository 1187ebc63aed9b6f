"""Reconstruction under corruption: Gaussian noise and occlusion (seed-report.txt, section 3).

The error is always measured against the clean image: MSE(model(corrupt(x)), x). Beside it,
MSE(corrupt(x), x) is the baseline of doing nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from aemnist.config import CorruptionConfig

KINDS = ("noise", "occlusion", "patch")
# What each kind does, as the report defines it.
DEFINITIONS = {
    "noise": "x + α·N(0, 1) per pixel, α the level (clipped to [0, 1] when corruption.clip)",
    "occlusion": "a random mask: the given fraction of each image's pixels set to 0",
    "patch": "a square patch at a random place, covering the given fraction of the image, set to 0",
}
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: 95 % two-sided intervals


def levels_of(config: CorruptionConfig) -> dict[str, tuple[float, ...]]:
    """Each kind's levels: the noise levels, and the occlusion fractions for both masks."""
    return {
        "noise": config.noise_levels,
        "occlusion": config.occlusion_levels,
        "patch": config.occlusion_levels,
    }


def add_noise(
    images: torch.Tensor, alpha: float, generator: torch.Generator, clip: bool = False
) -> torch.Tensor:
    """x + alpha * N(0, 1); the seed does not clip, ``clip`` keeps pixels in [0, 1]."""
    if alpha == 0:
        return images.clone()
    noisy = images + alpha * torch.randn(images.shape, generator=generator)
    return noisy.clamp_(0.0, 1.0) if clip else noisy


def occlude(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Set a random ``fraction`` of each image's pixels to 0 (the same count in every image)."""
    n, pixels = images.shape[0], images[0].numel()
    k = int(round(fraction * pixels))
    if k == 0:
        return images.clone()
    ranks = torch.rand((n, pixels), generator=generator).argsort(dim=1).argsort(dim=1)
    keep = (ranks >= k).reshape(images.shape)
    return images * keep


def occlude_patch(
    images: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """Set a square patch of each image to 0, its side the nearest to cover ``fraction`` of
    the image, at a random place drawn for each image."""
    n, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    side = min(height, width, int(round((fraction * height * width) ** 0.5)))
    if side == 0:
        return images.clone()
    top = torch.randint(0, height - side + 1, (n,), generator=generator)
    left = torch.randint(0, width - side + 1, (n,), generator=generator)
    rows = torch.arange(height)
    cols = torch.arange(width)
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    patch = inside_rows[:, :, None] & inside_cols[:, None, :]
    return images * ~patch.reshape(n, 1, height, width)


def corrupt(
    images: torch.Tensor,
    kind: str,
    level: float,
    generator: torch.Generator,
    clip: bool = False,
) -> torch.Tensor:
    if kind == "noise":
        return add_noise(images, level, generator, clip)
    if kind == "occlusion":
        return occlude(images, level, generator)
    if kind == "patch":
        return occlude_patch(images, level, generator)
    raise ValueError(f"unknown corruption kind {kind!r}; choose one of {KINDS}")


def corruption_curves(
    model: nn.Module,
    images: torch.Tensor,
    levels: dict[str, tuple[float, ...]],
    seed: int,
    batch_size: int = 2048,
    device: str = "cpu",
    clip: bool = False,
) -> pd.DataFrame:
    """The corruption table: kind, level, mse (reconstruction) and baseline_mse (input), each
    the mean over the images of one image's MSE, with the half-width of its 95 % interval.

    The corruptions are drawn on the CPU (the same draws whatever the device); the model
    reconstructs on ``device`` and is left there."""
    model.to(device)  # outside inference mode: the weights must stay ordinary tensors
    n = images.shape[0]
    rows = []
    with torch.inference_mode():
        model.eval()
        for kind, kind_levels in levels.items():
            for level in kind_levels:
                generator = torch.Generator().manual_seed(seed)
                # Per image: the sum and the sum of squares of its MSE, for the interval.
                sums = torch.zeros((2, 2), dtype=torch.float64, device=device)
                for start in range(0, n, batch_size):
                    clean = images[start : start + batch_size]
                    noisy = corrupt(clean, kind, level, generator, clip).to(device)
                    clean = clean.to(device)
                    for i, x in enumerate((model(noisy), noisy)):
                        per_image = ((x - clean) ** 2).flatten(1).double().mean(dim=1)
                        sums[i, 0] += per_image.sum()
                        sums[i, 1] += (per_image**2).sum()
                (rec_sum, rec_sq), (in_sum, in_sq) = sums.tolist()
                rows.append(
                    {
                        "kind": kind,
                        "level": float(level),
                        "mse": rec_sum / n,
                        "mse_ci95": _half_width(rec_sum, rec_sq, n),
                        "baseline_mse": in_sum / n,
                        "baseline_mse_ci95": _half_width(in_sum, in_sq, n),
                    }
                )
    return pd.DataFrame(rows)


def _half_width(total: float, squares: float, n: int) -> float:
    """The half-width of the normal 95 % interval of a mean, from the sum and the sum of
    squares of ``n`` values (0 for a single value)."""
    if n < 2:
        return 0.0
    variance = max(0.0, (squares - total * total / n) / (n - 1))
    return Z95 * (variance / n) ** 0.5


@torch.inference_mode()
def corruption_examples(
    model: nn.Module,
    image: torch.Tensor,
    kind: str,
    levels: tuple[float, ...],
    seed: int,
    clip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """For one image (1, 28, 28): its corrupted versions and their reconstructions,
    each an array (len(levels), 28, 28)."""
    model.eval()
    corrupted, restored = [], []
    for level in levels:
        generator = torch.Generator().manual_seed(seed)
        noisy = corrupt(image.unsqueeze(0), kind, level, generator, clip)
        corrupted.append(noisy[0, 0].numpy())
        restored.append(model(noisy)[0, 0].numpy())
    return np.stack(corrupted), np.stack(restored)


def examples_frame(
    model: nn.Module,
    image: torch.Tensor,
    levels: dict[str, tuple[float, ...]],
    seed: int,
    clip: bool = False,
) -> pd.DataFrame:
    """The corruption_examples table: one image (1, 28, 28) corrupted at every level of every
    kind, and its reconstruction (on the CPU), as flat pixel lists."""
    model.to("cpu")
    rows = []
    for kind, kind_levels in levels.items():
        corrupted, restored = corruption_examples(model, image, kind, kind_levels, seed, clip)
        for level, c, r in zip(kind_levels, corrupted, restored, strict=True):
            rows.append(
                {
                    "kind": kind,
                    "level": level,
                    "corrupted": c.reshape(-1),
                    "restored": r.reshape(-1),
                }
            )
    return pd.DataFrame(rows)
