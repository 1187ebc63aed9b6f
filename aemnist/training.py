"""Training: Adam on the MSE between an image and its reconstruction, from in-memory tensors.

The three training stages of the study share one loop: a grid fold (train on the other folds,
validate on one), a size of the sweep and the final model (the whole training set, the test
loss each epoch, ReduceLROnPlateau on it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from aemnist.data import ImageSet
from aemnist.model import Autoencoder, build_autoencoder
from aemnist.schemas import atomic_write_bytes


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    eval_loss: float
    lr: float
    resumed: bool = False  # restored from a checkpoint rather than trained in this call


EpochCallback = Callable[[EpochResult], None]
# Measured in bench/throughput.py on two CPU cores: channels-last weights and images and
# torch's fused Adam step (CPU and CUDA) train this model about 1.3x faster than the defaults.
# Module constants so that the bench can time each against the plain loop.
CHANNELS_LAST = True
FUSED_ADAM = True


def task_seed(seed: int, *key: object) -> int:
    """A seed for one task, stable across runs and independent of scheduling order."""
    text = repr((seed,) + key).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, batch_size: int = 2048) -> float:
    """Mean squared error over every pixel of ``images``."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        total += nn.functional.mse_loss(model(batch), batch, reduction="sum").double()
    return float(total) / images.numel()


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path) -> dict[str, Any] | None:
    """A checkpoint written by ``fit``, or None if it is unreadable (then training restarts)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # a torn or foreign file: start over rather than fail
        return None


def fit(
    model: Autoencoder,
    train_images: torch.Tensor,
    eval_images: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int,
    plateau_patience: int | None = None,
    eval_batch_size: int = 2048,
    on_epoch: EpochCallback | None = None,
    checkpoint: Path | None = None,
    resume_key: str | None = None,
) -> list[EpochResult]:
    """Train ``model`` in place; evaluate on ``eval_images`` after each epoch.

    With ``plateau_patience`` the learning rate is reduced when the evaluation loss has not
    improved for that many epochs (ReduceLROnPlateau, as in the seed's size sweep).

    With ``checkpoint`` the whole training state (model, optimiser, scheduler, shuffling RNG,
    history) is saved after every epoch; a later call with the same ``resume_key`` continues
    from the last finished epoch and ends with the same numbers as an uninterrupted run.
    Restored epochs are passed to ``on_epoch`` too, marked ``resumed``.
    """
    if CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
        train_images = train_images.contiguous(memory_format=torch.channels_last)
        eval_images = eval_images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=lr, weight_decay=weight_decay, fused=FUSED_ADAM
    )
    scheduler = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=plateau_patience)
        if plateau_patience is not None
        else None
    )
    generator = torch.Generator().manual_seed(seed)
    history: list[EpochResult] = []
    state = load_training_state(checkpoint) if checkpoint and checkpoint.exists() else None
    if state is not None and state.get("key") == resume_key and resume_key is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        for epoch, train_loss, eval_loss, epoch_lr in state["history"]:
            result = EpochResult(int(epoch), train_loss, eval_loss, epoch_lr, resumed=True)
            history.append(result)
            if on_epoch is not None:
                on_epoch(result)
    n = train_images.shape[0]
    for epoch in range(len(history) + 1, epochs + 1):
        model.train()
        current_lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(n, generator=generator)
        # Sum losses on the tensor side: one host sync per epoch, not one per batch.
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, n, batch_size):
            batch = train_images[order[start : start + batch_size]]
            loss = nn.functional.mse_loss(model(batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().double() * batch.shape[0]
        train_loss = float(total) / n
        eval_loss = evaluate(model, eval_images, eval_batch_size)
        if scheduler is not None:
            scheduler.step(eval_loss)
        result = EpochResult(epoch, train_loss, eval_loss, current_lr)
        history.append(result)
        if checkpoint is not None and resume_key is not None:
            save_training_state(
                checkpoint,
                {
                    "key": resume_key,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "generator": generator.get_state(),
                    "history": [[h.epoch, h.train_loss, h.eval_loss, h.lr] for h in history],
                },
            )
        if on_epoch is not None:
            on_epoch(result)
    # Back to the default layout: a model loaded from its checkpoint then computes exactly
    # what this one does.
    model.to(memory_format=torch.contiguous_format)
    return history


def train_fold(
    train: ImageSet,
    folds: pd.DataFrame,
    fold: int,
    *,
    lr: float,
    weight_decay: float,
    size: int,
    epochs: int,
    batch_size: int,
    seed: int,
    eval_batch_size: int = 2048,
    on_epoch: EpochCallback | None = None,
    checkpoint: Path | None = None,
    resume_key: str | None = None,
) -> pd.DataFrame:
    """One cell of the grid search: train on every fold but ``fold``, validate on ``fold``.

    Returns the per-epoch history (the grid_history table)."""
    fold_of = folds.set_index("idx")["fold"].reindex(train.idx).to_numpy()
    if np.isnan(fold_of.astype(float)).any():
        raise ValueError("the folds table does not cover every training image")
    val_mask = torch.from_numpy(fold_of == fold)
    key = task_seed(seed, "grid", lr, weight_decay, fold)
    model = build_autoencoder(size, key)
    history = fit(
        model,
        train.images[~val_mask],
        train.images[val_mask],
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        batch_size=batch_size,
        seed=key,
        eval_batch_size=eval_batch_size,
        on_epoch=on_epoch,
        checkpoint=checkpoint,
        resume_key=resume_key,
    )
    return pd.DataFrame(
        {
            "lr": lr,
            "weight_decay": weight_decay,
            "fold": fold,
            "epoch": [h.epoch for h in history],
            "train_loss": [h.train_loss for h in history],
            "val_loss": [h.eval_loss for h in history],
        }
    )


def train_size(
    train: ImageSet,
    test: ImageSet,
    *,
    size: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    plateau_patience: int,
    batch_size: int,
    seed: int,
    stage: str = "sweep",
    eval_batch_size: int = 2048,
    on_epoch: EpochCallback | None = None,
    checkpoint: Path | None = None,
    resume_key: str | None = None,
) -> tuple[Autoencoder, pd.DataFrame]:
    """Train at encoding ``size`` on the whole training set, scoring the test set each epoch.

    Returns the model and its per-epoch history (the sweep_history table)."""
    key = task_seed(seed, stage, size)
    model = build_autoencoder(size, key)
    history = fit(
        model,
        train.images,
        test.images,
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        batch_size=batch_size,
        seed=key,
        plateau_patience=plateau_patience,
        eval_batch_size=eval_batch_size,
        on_epoch=on_epoch,
        checkpoint=checkpoint,
        resume_key=resume_key,
    )
    model.eval()
    frame = pd.DataFrame(
        {
            "size": size,
            "epoch": [h.epoch for h in history],
            "lr": [h.lr for h in history],
            "train_loss": [h.train_loss for h in history],
            "test_loss": [h.eval_loss for h in history],
        }
    )
    return model, frame
