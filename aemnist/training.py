"""Training: Adam on the MSE between an image and its reconstruction, from in-memory tensors.

The three training stages of the study share one loop: a grid fold (train on the other folds,
validate on one), a size of the sweep and the final model (the whole training set, the test
loss each epoch, ReduceLROnPlateau on it).
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from aemnist.data import ImageSet, holdout_mask
from aemnist.model import Autoencoder, build_autoencoder, start_at_mean_intensity
from aemnist.runtime import prepare_device
from aemnist.schemas import atomic_write_bytes


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    eval_loss: float
    lr: float
    resumed: bool = False  # restored from a checkpoint rather than trained in this call
    # How much the reconstructions of the evaluated images differ from one another, relative
    # to how much the images do (mean per-pixel variance over the images, output / input):
    # about 1 for a good model, 0 for one that gives every image the same output.
    output_spread: float = math.nan
    # eval_loss over the loss an all-black output would have (the images' mean square, 0.112
    # on MNIST): 1 for a model that outputs 0 everywhere, about 0.6 for the mean image.
    black_ratio: float = math.nan


EpochCallback = Callable[[EpochResult], None]


@dataclass(frozen=True)
class TrainingOptions:
    """How ``fit`` runs its arithmetic: speed switches, each a choice of kernels. They never
    change the mathematics, but they do change the float rounding, which training amplifies
    into other numbers: results are those of the options they were trained with. The bench
    scripts time each switch against the plain loop by passing other values."""

    # Measured in bench/throughput.py on two CPU cores: channels-last weights and images and
    # torch's fused Adam step (CPU and CUDA) train this model about 1.3x faster than the
    # defaults.
    channels_last: bool = True
    fused_adam: bool = True
    # On CUDA, one training step (gather, forward, backward, Adam) is captured as a CUDA graph
    # and replayed: this small model is bound by kernel launches, not arithmetic. Channels-last,
    # the CPU's gain, measured 20 % slower there (bench/gpu.py on an H200). A replayed graph
    # computes exactly what the eager step does (bench/gpu.py), so this one switch is left
    # out of the cache key (aemnist.caching.fingerprint reads metadata "key").
    cuda_graphs: bool = field(default=True, metadata={"key": False})
    cuda_channels_last: bool = False


DEFAULT_OPTIONS = TrainingOptions()


def training_layout(device: str, options: TrainingOptions = DEFAULT_OPTIONS) -> torch.memory_format:
    """The memory layout ``fit`` trains and evaluates in on ``device`` under ``options``."""
    cuda = torch.device(device).type == "cuda"
    channels_last = options.cuda_channels_last if cuda else options.channels_last
    return torch.channels_last if channels_last else torch.contiguous_format


def task_seed(seed: int, *key: object) -> int:
    """A seed for one task, stable across runs and independent of scheduling order."""
    text = repr((seed,) + key).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


def evaluate(
    model: nn.Module, images: torch.Tensor, batch_size: int = 2048, device: str | None = None
) -> float:
    """Mean squared error over every pixel of ``images``, computed on ``device`` (default: the
    model's); the model is left where it was."""
    home = next(model.parameters()).device
    target = torch.device(device) if device is not None else home
    model.to(target)  # outside inference mode: the weights must stay ordinary tensors
    try:
        return _mean_squared_error(model, images.to(target), batch_size)
    finally:
        model.to(home)


@torch.inference_mode()
def _mean_squared_error(model: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    model.eval()
    # Summed on the device: one host sync for the whole set, not one per batch.
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        total += nn.functional.mse_loss(model(batch), batch, reduction="sum").double()
    return float(total) / images.numel()


@torch.inference_mode()
def loss_and_spread(
    model: nn.Module, images: torch.Tensor, batch_size: int, image_spread: float
) -> tuple[float, float]:
    """What ``_mean_squared_error`` gives, and the reconstructions' output_spread (see
    EpochResult) against ``image_spread``, the images' own, from the same forward passes."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    # Per-pixel sums of the outputs and of their squares, in float64: the variance of a
    # collapsed model's outputs is far below float32's resolution of their mean.
    first = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
    second = torch.zeros_like(first)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        output = model(batch)
        total += nn.functional.mse_loss(output, batch, reduction="sum").double()
        output = output.double()
        first += output.sum(0)
        second += output.square().sum(0)
    n = images.shape[0]
    variance = (second / n - (first / n).square()).clamp_min(0).mean()
    return float(total) / images.numel(), float(variance) / image_spread


def pixel_spread(images: torch.Tensor) -> float:
    """The mean per-pixel variance over ``images`` (the unit of output_spread)."""
    return float(images.double().var(0, unbiased=False).mean())


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path) -> dict[str, Any] | None:
    """A checkpoint written by ``fit``, or None if it is unreadable (then training restarts)."""
    try:
        # From bytes: a checkpoint in an object store is no local file (aemnist.storage).
        return torch.load(io.BytesIO(path.read_bytes()), weights_only=True, map_location="cpu")
    except Exception:  # a torn or foreign file: start over rather than fail
        return None


@contextmanager
def task_stream(device: torch.device) -> Iterator[None]:
    """On CUDA, a stream of the task's own: tasks that share the GPU overlap their kernels
    instead of queueing on the default stream."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def _eager_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, keep_grads: bool
) -> torch.Tensor:
    """One Adam step on one batch; returns the batch's mean loss (still on the device)."""
    loss = nn.functional.mse_loss(model(batch), batch)
    # A captured graph owns the gradient buffers: zero them in place rather than drop them.
    optimizer.zero_grad(set_to_none=not keep_grads)
    loss.backward()
    optimizer.step()
    return loss.detach()


_CAPTURE_LOCK = threading.Lock()


class _GraphStep:
    """A full-size training step captured once as a CUDA graph, replayed for every batch.

    Capture needs a few warm-up steps; the weights and the optimiser's state are put back
    afterwards, so training starts from exactly the state it was given."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        batch_size: int,
        total: torch.Tensor,
    ) -> None:
        self.index = torch.arange(batch_size, device=images.device)
        weights = [p.detach().clone() for p in model.parameters()]
        state = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        for _ in range(3):
            _eager_step(model, optimizer, images[self.index], keep_grads=False)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # One capture at a time: entering a capture synchronises the whole device, which
        # would break another thread's capture in progress.
        with (
            _CAPTURE_LOCK,
            torch.cuda.graph(
                self.graph, stream=torch.cuda.current_stream(), capture_error_mode="thread_local"
            ),
        ):
            batch = images[self.index]
            loss = nn.functional.mse_loss(model(batch), batch)
            loss.backward()
            optimizer.step()
            total.add_(loss.detach().double() * batch_size)
        with torch.no_grad():
            for p, saved in zip(model.parameters(), weights, strict=True):
                p.copy_(saved)
            for p, tensors in optimizer.state.items():
                for k, v in tensors.items():
                    if p in state:
                        v.copy_(state[p][k])
                    else:  # a fresh optimiser: Adam starts from zero moments and step 0
                        v.zero_()

    def __call__(self, index: torch.Tensor) -> None:
        self.index.copy_(index)
        self.graph.replay()


def _pin_lr(optimizer: torch.optim.Optimizer, lr: torch.Tensor | None) -> None:
    """Keep the learning rate in the one device tensor a captured graph reads, whatever a
    restored state or the scheduler put in its place."""
    if lr is None:
        return
    for group in optimizer.param_groups:
        if group["lr"] is not lr:
            lr.fill_(float(group["lr"]))
            group["lr"] = lr


class _TrainingStep:
    """``step(index)``: one Adam step on the images ``index`` names, its mean loss times its
    batch size added to ``total`` on the device. A full batch replays the captured CUDA graph
    where there is one; the eager step takes the rest (every batch on the CPU, the last short
    batch of an epoch on CUDA)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        batch_size: int,
        total: torch.Tensor,
        capture: bool,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.images = images
        self.batch_size = batch_size
        self.total = total
        self.graph = _GraphStep(model, optimizer, images, batch_size, total) if capture else None

    def __call__(self, index: torch.Tensor) -> None:
        if self.graph is not None and index.shape[0] == self.batch_size:
            self.graph(index)  # adds to total inside the graph
            return
        loss = _eager_step(
            self.model, self.optimizer, self.images[index], keep_grads=self.graph is not None
        )
        self.total.add_(loss.double() * index.shape[0])


def _resume(
    checkpoint: Path | None,
    resume_key: str | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None,
    generator: torch.Generator,
) -> list[EpochResult]:
    """The finished epochs of ``checkpoint`` if it was written under ``resume_key``, with the
    training state it holds put back into ``model``, ``optimizer``, ``scheduler`` and
    ``generator``; none (and nothing touched) otherwise."""
    if checkpoint is None or resume_key is None or not checkpoint.exists():
        return []
    state = load_training_state(checkpoint)
    if state is None or state.get("key") != resume_key:
        return []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    # Entries are [epoch, train loss, eval loss, lr, output spread, black ratio].
    history = state["history"]
    return [EpochResult(int(entry[0]), *entry[1:4], True, *entry[4:6]) for entry in history]


def _save_checkpoint(
    checkpoint: Path,
    resume_key: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None,
    generator: torch.Generator,
    history: list[EpochResult],
) -> None:
    """The whole training state after the last epoch of ``history``, as ``_resume`` reads it."""
    save_training_state(
        checkpoint,
        {
            "key": resume_key,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": generator.get_state(),
            "history": [
                [h.epoch, h.train_loss, h.eval_loss, h.lr, h.output_spread, h.black_ratio]
                for h in history
            ],
        },
    )


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
    device: str = "cpu",
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> list[EpochResult]:
    """Train ``model`` in place; evaluate on ``eval_images`` after each epoch.

    With ``plateau_patience`` the learning rate is reduced when the evaluation loss has not
    improved for that many epochs (ReduceLROnPlateau, as in the seed's size sweep).

    With ``checkpoint`` the whole training state (model, optimiser, scheduler, shuffling RNG,
    history) is saved after every epoch; a later call with the same ``resume_key`` continues
    from the last finished epoch and ends with the same numbers as an uninterrupted run.
    Restored epochs are passed to ``on_epoch`` too, marked ``resumed``.

    On ``device`` "cuda" both image sets are copied to the GPU once and every batch is
    gathered there; the shuffling order is drawn on the CPU as before (one copy per epoch).
    The model is returned on the CPU either way. ``options`` picks the kernels.

    The images must have the model's dtype: float32 in the study; the tests train in float64
    to compare two computations beyond float32's rounding.
    """
    dev = torch.device(device)
    prepare_device(dev.type)
    with task_stream(dev):
        graphs = dev.type == "cuda" and options.cuda_graphs
        memory_format = training_layout(device, options)
        model.to(dev, memory_format=memory_format)
        train_images = train_images.to(dev).contiguous(memory_format=memory_format)
        eval_images = eval_images.to(dev).contiguous(memory_format=memory_format)
        # A captured step reads the learning rate from a device tensor, so that the scheduler's
        # changes reach it; on the CPU it stays a float.
        lr_tensor = torch.tensor(lr, dtype=torch.float32, device=dev) if graphs else None
        optimizer = torch.optim.Adam(
            model.parameters(),
            lr=lr_tensor if lr_tensor is not None else lr,
            weight_decay=weight_decay,
            fused=options.fused_adam,
            capturable=graphs,
        )
        scheduler = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=plateau_patience)
            if plateau_patience is not None
            else None
        )
        generator = torch.Generator().manual_seed(seed)
        history = _resume(checkpoint, resume_key, model, optimizer, scheduler, generator)
        if on_epoch is not None:
            for result in history:
                on_epoch(result)
        _pin_lr(optimizer, lr_tensor)
        n = train_images.shape[0]
        # Losses are summed on the device: one host sync per epoch, not one per batch.
        total = torch.zeros((), dtype=torch.float64, device=dev)
        capture = graphs and len(history) < epochs and n >= batch_size
        step = _TrainingStep(model, optimizer, train_images, batch_size, total, capture)
        image_spread = pixel_spread(eval_images)
        black_loss = float(eval_images.double().square().mean())
        for epoch in range(len(history) + 1, epochs + 1):
            model.train()
            current_lr = float(optimizer.param_groups[0]["lr"])
            order = torch.randperm(n, generator=generator).to(dev)
            total.zero_()
            for start in range(0, n, batch_size):
                step(order[start : start + batch_size])
            train_loss = float(total) / n
            eval_loss, spread = loss_and_spread(model, eval_images, eval_batch_size, image_spread)
            if scheduler is not None:
                scheduler.step(eval_loss)
                _pin_lr(optimizer, lr_tensor)
            result = EpochResult(
                epoch, train_loss, eval_loss, current_lr, False, spread, eval_loss / black_loss
            )
            history.append(result)
            if checkpoint is not None and resume_key is not None:
                _save_checkpoint(
                    checkpoint, resume_key, model, optimizer, scheduler, generator, history
                )
            if on_epoch is not None:
                on_epoch(result)
    # Back to the default layout, on the CPU: a model loaded from its checkpoint then
    # computes exactly what this one does.
    model.to("cpu", memory_format=torch.contiguous_format)
    return history


def validation_mask(train: ImageSet, folds: pd.DataFrame, fold: int) -> torch.Tensor:
    """Which of ``train``'s images lie in ``fold`` (the grid cell's validation images)."""
    fold_of = folds.set_index("idx")["fold"].reindex(train.idx).to_numpy()
    if np.isnan(fold_of.astype(float)).any():
        raise ValueError("the folds table does not cover every training image")
    return torch.from_numpy(fold_of == fold)


def grid_model(
    train_images: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    fold: int,
    size: int,
    seed: int,
    repeat: int = 0,
    output_bias_at_mean: bool = False,
) -> tuple[Autoencoder, int]:
    """A grid cell's untrained model and the seed of its batch order, both drawn from the
    cell itself (never from the order cells run in): trained alone (``train_fold``) or
    stacked with others (aemnist.stacked), a cell starts from the same weights. The model
    takes the images' dtype (float32 in the study; float64 in tests that compare the two)."""
    key = task_seed(seed, "grid", lr, weight_decay, fold, *([repeat] if repeat else []))
    return _untrained(size, key, train_images, output_bias_at_mean), key


def _untrained(size: int, key: int, images: torch.Tensor, output_bias_at_mean: bool) -> Autoencoder:
    """The model a task starts from: drawn from ``key``, in ``images``' dtype, its output
    bias at their mean intensity where asked."""
    model = build_autoencoder(size, key).to(images.dtype)
    if output_bias_at_mean:
        start_at_mean_intensity(model, images)
    return model


def grid_history_frame(
    lr: float, weight_decay: float, fold: int, history: list[EpochResult]
) -> pd.DataFrame:
    """A grid cell's per-epoch history as the grid_history table holds it."""
    return pd.DataFrame(
        {
            "lr": lr,
            "weight_decay": weight_decay,
            "fold": fold,
            "epoch": [h.epoch for h in history],
            "train_loss": [h.train_loss for h in history],
            "val_loss": [h.eval_loss for h in history],
            "output_spread": [h.output_spread for h in history],
            "black_ratio": [h.black_ratio for h in history],
        }
    )


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
    repeat: int = 0,
    output_bias_at_mean: bool = False,
    eval_batch_size: int = 2048,
    on_epoch: EpochCallback | None = None,
    checkpoint: Path | None = None,
    resume_key: str | None = None,
    device: str = "cpu",
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> pd.DataFrame:
    """One cell of the grid search: train on every fold but ``fold``, validate on ``fold``.
    ``repeat`` > 0 draws other initial weights and batches on the same folds (repeat 0: the
    study's own).

    Returns the per-epoch history (the grid_history table)."""
    val_mask = validation_mask(train, folds, fold)
    model, key = grid_model(
        train.images[~val_mask], lr=lr, weight_decay=weight_decay, fold=fold, size=size,
        seed=seed, repeat=repeat, output_bias_at_mean=output_bias_at_mean,
    )  # fmt: skip
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
        device=device,
        options=options,
    )
    return grid_history_frame(lr, weight_decay, fold, history)


def size_split(
    train: ImageSet, test: ImageSet, selection: str, validation_images: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images a sweep or final task trains on and those it scores each epoch on: the
    whole training set and the test set, or (``selection`` "validation") the training set
    less ``validation_images`` held out of it (stratified, seeded) and those."""
    if selection == "validation":
        held = torch.from_numpy(holdout_mask(train.labels, validation_images, seed))
        return train.images[~held], train.images[held]
    return train.images, test.images


def size_model(
    fit_images: torch.Tensor,
    *,
    size: int,
    seed: int,
    stage: str = "sweep",
    repeat: int = 0,
    output_bias_at_mean: bool = False,
) -> tuple[Autoencoder, int]:
    """A sweep or final task's untrained model and the seed of its batch order, both drawn
    from the task itself (as ``grid_model`` does for a grid cell): trained alone
    (``train_size``) or stacked (``aemnist.stacked.train_size_group``), a size starts from
    the same weights. The model takes the images' dtype."""
    key = task_seed(seed, stage, size, *([repeat] if repeat else []))
    return _untrained(size, key, fit_images, output_bias_at_mean), key


def size_history_frame(
    size: int, repeat: int, selection: str, history: list[EpochResult]
) -> pd.DataFrame:
    """A sweep or final task's per-epoch history as the sweep_history table holds it: the
    scored loss in the column its ``selection`` names, the other left empty."""
    scores = [h.eval_loss for h in history]
    unscored = [float("nan")] * len(history)
    return pd.DataFrame(
        {
            "size": size,
            "repeat": repeat,
            "epoch": [h.epoch for h in history],
            "lr": [h.lr for h in history],
            "train_loss": [h.train_loss for h in history],
            "test_loss": scores if selection == "test" else unscored,
            "val_loss": scores if selection == "validation" else unscored,
            "output_spread": [h.output_spread for h in history],
            "black_ratio": [h.black_ratio for h in history],
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
    repeat: int = 0,
    selection: str = "test",
    validation_images: int = 10000,
    output_bias_at_mean: bool = False,
    eval_batch_size: int = 2048,
    on_epoch: EpochCallback | None = None,
    checkpoint: Path | None = None,
    resume_key: str | None = None,
    device: str = "cpu",
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> tuple[Autoencoder, pd.DataFrame]:
    """Train at encoding ``size``, scoring each epoch on the set ``selection`` names: the
    test set, on the whole training set (the seed's way), or ``validation_images`` held out
    of the training set (stratified, seeded), on the rest; the test set is then not seen.
    ``repeat`` > 0 draws other initial weights and batches (repeat 0: the study's own).

    Returns the model and its per-epoch history (the sweep_history table)."""
    fit_images, eval_images = size_split(train, test, selection, validation_images, seed)
    model, key = size_model(
        fit_images, size=size, seed=seed, stage=stage, repeat=repeat,
        output_bias_at_mean=output_bias_at_mean,
    )  # fmt: skip
    history = fit(
        model,
        fit_images,
        eval_images,
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
        device=device,
        options=options,
    )
    model.eval()
    return model, size_history_frame(size, repeat, selection, history)
