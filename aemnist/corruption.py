"""Reconstruction under corruption: Gaussian noise and occlusion (seed-report.txt, section 3).

The error is always measured against the clean image: MSE(model(corrupt(x)), x). Beside it,
MSE(corrupt(x), x) is the baseline of doing nothing.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

KINDS = ("noise", "occlusion")


def add_noise(images: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """x + alpha * N(0, 1), as in the seed (no clipping)."""
    if alpha == 0:
        return images.clone()
    return images + alpha * torch.randn(images.shape, generator=generator)


def occlude(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Set a random ``fraction`` of each image's pixels to 0 (the same count in every image)."""
    n, pixels = images.shape[0], images[0].numel()
    k = int(round(fraction * pixels))
    if k == 0:
        return images.clone()
    ranks = torch.rand((n, pixels), generator=generator).argsort(dim=1).argsort(dim=1)
    keep = (ranks >= k).reshape(images.shape)
    return images * keep


def corrupt(
    images: torch.Tensor, kind: str, level: float, generator: torch.Generator
) -> torch.Tensor:
    if kind == "noise":
        return add_noise(images, level, generator)
    if kind == "occlusion":
        return occlude(images, level, generator)
    raise ValueError(f"unknown corruption kind {kind!r}; choose one of {KINDS}")


def corruption_curves(
    model: nn.Module,
    images: torch.Tensor,
    levels: dict[str, tuple[float, ...]],
    seed: int,
    batch_size: int = 2048,
    device: str = "cpu",
) -> pd.DataFrame:
    """The corruption table: kind, level, mse (reconstruction) and baseline_mse (input).

    The corruptions are drawn on the CPU (the same draws whatever the device); the model
    reconstructs on ``device`` and is left there."""
    model.to(device)  # outside inference mode: the weights must stay ordinary tensors
    with torch.inference_mode():
        model.eval()
        rows = []
        for kind, kind_levels in levels.items():
            for level in kind_levels:
                generator = torch.Generator().manual_seed(seed)
                sq_rec = torch.zeros((), dtype=torch.float64, device=device)
                sq_in = torch.zeros((), dtype=torch.float64, device=device)
                for start in range(0, images.shape[0], batch_size):
                    clean = images[start : start + batch_size]
                    noisy = corrupt(clean, kind, level, generator).to(device)
                    clean = clean.to(device)
                    sq_rec += ((model(noisy) - clean) ** 2).double().sum()
                    sq_in += ((noisy - clean) ** 2).double().sum()
                rows.append(
                    {
                        "kind": kind,
                        "level": float(level),
                        "mse": float(sq_rec) / images.numel(),
                        "baseline_mse": float(sq_in) / images.numel(),
                    }
                )
    return pd.DataFrame(rows)


@torch.inference_mode()
def corruption_examples(
    model: nn.Module, image: torch.Tensor, kind: str, levels: tuple[float, ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """For one image (1, 28, 28): its corrupted versions and their reconstructions,
    each an array (len(levels), 28, 28)."""
    model.eval()
    corrupted, restored = [], []
    for level in levels:
        generator = torch.Generator().manual_seed(seed)
        noisy = corrupt(image.unsqueeze(0), kind, level, generator)
        corrupted.append(noisy[0, 0].numpy())
        restored.append(model(noisy)[0, 0].numpy())
    return np.stack(corrupted), np.stack(restored)


def examples_frame(
    model: nn.Module, image: torch.Tensor, levels: dict[str, tuple[float, ...]], seed: int
) -> pd.DataFrame:
    """The corruption_examples table: one image (1, 28, 28) corrupted at every level of every
    kind, and its reconstruction (on the CPU), as flat pixel lists."""
    model.to("cpu")
    rows = []
    for kind, kind_levels in levels.items():
        corrupted, restored = corruption_examples(model, image, kind, kind_levels, seed)
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
