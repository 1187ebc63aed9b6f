"""Several autoencoders of one architecture trained at once, as one batched model.

Each model keeps its own parameters, learning rate, weight decay, initial weights,
shuffling order and, where asked, learning-rate schedule; one step runs them all through
grouped convolutions and batched matrix products (model k sees its own batch in input
channel k), and an Adam of its own updates each model. The arithmetic per model is the one
``aemnist.training.fit`` does; only the kernels that carry it differ (grouped instead of
single convolutions), so results agree with separate training to float rounding.

The grid and the sweep train their cells this way when ``runtime.stacked_cells`` > 1
(``train_fold_group``, ``train_size_group``; the sweep's sizes padded to the widest): on a
GPU this small model is bound by kernel launches, and N stacked models cost about the
launches of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from aemnist.data import ImageSet
from aemnist.model import Autoencoder
from aemnist.runtime import prepare_device
from aemnist.training import (
    DEFAULT_OPTIONS,
    EpochCallback,
    EpochResult,
    TrainingOptions,
    grid_history_frame,
    grid_model,
    load_training_state,
    loss_and_spread,
    pixel_spread,
    save_training_state,
    size_history_frame,
    size_model,
    size_split,
    task_stream,
    validation_mask,
)

# The last two transposed convolutions of the decoder (aemnist.model.Decoder).
_UPSAMPLE = {"stride": 2, "padding": 1, "output_padding": 1}


class StackedAutoencoders(nn.Module):
    """``models`` side by side: input (batch, n_models, 28, 28), output the same shape,
    model k reading and writing channel k. The models' own parameters are used (joined
    for each step), so training this trains them.

    Models of other encoding sizes (the sweep's) are padded to the widest: the code layer's
    extra rows and the decoder's extra input columns are zeros, constants outside the
    models, so each padded code unit is exactly 0 and adds exactly 0; no gradient reaches
    them, and each model computes what it computes alone (the matrix products sum over a
    wider row, so to float rounding)."""

    def __init__(self, models: Sequence[Autoencoder]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.sizes = [m.size for m in models]
        self.width = max(self.sizes)
        hidden = models[0].encoder.linear[3].in_features
        dtype = models[0].encoder.linear[3].weight.dtype
        # Per model, the zero rows that widen its code layer (none for the widest); buffers,
        # so that they move to the device with the models.
        for k, size in enumerate(self.sizes):
            self.register_buffer(
                f"pad_{k}", torch.zeros(self.width - size, hidden, dtype=dtype), persistent=False
            )

    @property
    def padded(self) -> bool:
        return len(set(self.sizes)) > 1

    def _joined(self, pick: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``pick`` of every model, weights and biases joined along the channels."""
        layers = [m.get_submodule(pick) for m in self.models]
        return torch.cat([a.weight for a in layers]), torch.cat([a.bias for a in layers])

    def _conv(self, x: torch.Tensor, pick: str, **kw: int) -> torch.Tensor:
        return F.conv2d(x, *self._joined(pick), groups=len(self.models), **kw)

    def _deconv(self, x: torch.Tensor, pick: str, **kw: int) -> torch.Tensor:
        return F.conv_transpose2d(x, *self._joined(pick), groups=len(self.models), **kw)

    def _linear(self, h: torch.Tensor, pick: str) -> torch.Tensor:
        """h: (n_models, batch, in) -> (n_models, batch, out), model k's layer on row k."""
        layers = [m.get_submodule(pick) for m in self.models]
        weight = torch.stack([a.weight for a in layers]).transpose(1, 2)
        bias = torch.stack([a.bias for a in layers]).unsqueeze(1)
        return torch.baddbmm(bias, h, weight)

    def _pads(self) -> list[torch.Tensor]:
        return [self.get_buffer(f"pad_{k}") for k in range(len(self.models))]

    def _encode(self, h: torch.Tensor) -> torch.Tensor:
        """The code layer, widened to ``width`` by zero rows where sizes differ."""
        if not self.padded:
            return self._linear(h, "encoder.linear.3")
        n, layers = len(self.models), [m.encoder.linear[3] for m in self.models]
        pads = self._pads()
        # One cat for all models (one kernel): model k's weight rows, then its zero rows.
        weight = torch.cat(
            [t for a, pad in zip(layers, pads, strict=True) for t in (a.weight, pad)]
        )
        bias = torch.cat(
            [t for a, pad in zip(layers, pads, strict=True) for t in (a.bias, pad[:, 0])]
        )
        weight = weight.view(n, self.width, -1).transpose(1, 2)
        return torch.baddbmm(bias.view(n, 1, self.width), h, weight)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's first layer, reading ``width`` code units (the padded ones zero)."""
        if not self.padded:
            return self._linear(z, "decoder.linear.0")
        n, layers = len(self.models), [m.decoder.linear[0] for m in self.models]
        weight = torch.cat(
            [t for a, pad in zip(layers, self._pads(), strict=True) for t in (a.weight.t(), pad)]
        ).view(n, self.width, -1)
        bias = torch.stack([a.bias for a in layers]).unsqueeze(1)
        return torch.baddbmm(bias, z, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n = x.shape[0], len(self.models)
        h = F.relu(self._conv(x, "encoder.conv.0", stride=2, padding=1))
        h = F.relu(self._conv(h, "encoder.conv.2", stride=2, padding=1))
        h = F.relu(self._conv(h, "encoder.conv.4", stride=2, padding=0))
        # (batch, n*32, 3, 3) -> (n, batch, 288): each model's flattening order (c, y, x)
        h = h.reshape(batch, n, -1).transpose(0, 1)
        h = F.relu(self._linear(h, "encoder.linear.1"))
        z = self._encode(h)
        h = F.relu(self._decode(z))
        h = F.relu(self._linear(h, "decoder.linear.2"))
        h = h.transpose(0, 1).reshape(batch, n * 32, 3, 3)
        h = F.relu(self._deconv(h, "decoder.deconv.0", stride=2))
        h = F.relu(self._deconv(h, "decoder.deconv.2", **_UPSAMPLE))
        out = self._deconv(h, "decoder.deconv.4", **_UPSAMPLE)
        return torch.sigmoid(out)


Scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau


def _resume(
    checkpoint: Path | None,
    resume_key: str | None,
    models: Sequence[Autoencoder],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Scheduler | None],
    generators: Sequence[torch.Generator],
) -> list[list[EpochResult]]:
    """Each model's finished epochs in ``checkpoint`` if it was written under ``resume_key``
    for as many models, with the training state it holds put back; none (and nothing
    touched) otherwise."""
    if checkpoint is None or resume_key is None or not checkpoint.exists():
        return [[] for _ in models]
    state = load_training_state(checkpoint)
    # (A checkpoint of one optimiser for all models, as written before the sweep stacked,
    # has no "optimizers": it is not resumed.)
    if (
        state is None
        or state.get("key") != resume_key
        or len(state.get("optimizers", ())) != len(models)
    ):
        return [[] for _ in models]
    for model, weights in zip(models, state["models"], strict=True):
        model.load_state_dict(weights)
    for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
        if scheduler is not None:
            scheduler.load_state_dict(saved)
    for generator, saved in zip(generators, state["generators"], strict=True):
        generator.set_state(saved)
    # state["history"][epoch][model] is [epoch, train loss, eval loss, lr, spread, black ratio].
    return [
        [EpochResult(int(e[k][0]), *e[k][1:4], True, *e[k][4:6]) for e in state["history"]]
        for k in range(len(models))
    ]


def _save_checkpoint(
    checkpoint: Path,
    resume_key: str,
    models: Sequence[Autoencoder],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Scheduler | None],
    generators: Sequence[torch.Generator],
    histories: Sequence[Sequence[EpochResult]],
) -> None:
    """The whole state after the last finished epoch, as ``_resume`` reads it; its "history"
    has one entry per epoch, as ``fit``'s checkpoint does (`aemnist status` counts them)."""
    save_training_state(
        checkpoint,
        {
            "key": resume_key,
            "models": [m.state_dict() for m in models],
            "optimizers": [o.state_dict() for o in optimizers],
            "schedulers": [s.state_dict() if s is not None else None for s in schedulers],
            "generators": [g.get_state() for g in generators],
            "history": [
                [
                    [h.epoch, h.train_loss, h.eval_loss, h.lr, h.output_spread, h.black_ratio]
                    for h in epoch
                ]
                for epoch in zip(*histories, strict=True)
            ],
        },
    )


def fit_stacked(
    models: Sequence[Autoencoder],
    images: torch.Tensor,
    train_index: Sequence[torch.Tensor],
    eval_images: Sequence[torch.Tensor],
    *,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    plateau_patience: int | None = None,
    eval_batch_size: int = 2048,
    on_epoch: Sequence[EpochCallback] | None = None,
    checkpoint: Path | None = None,
    resume_key: str | None = None,
    device: str = "cpu",
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> list[list[EpochResult]]:
    """Train ``models`` in place, at once: model k on ``images[train_index[k]]`` with Adam
    at ``lrs[k]`` and ``weight_decays[k]``, its batches drawn as ``fit`` draws them from
    ``seeds[k]``; evaluated on ``eval_images[k]`` after each epoch (loss, output spread and
    black ratio, as ``fit`` reports them), each result passed to ``on_epoch[k]``. Every model
    must see the same number of training images (one step count); their encoding sizes may
    differ (``StackedAutoencoders`` pads them).

    With ``plateau_patience`` each model's learning rate follows a ReduceLROnPlateau of its
    own on its own evaluation loss, as ``fit``'s does: each model has its own Adam (torch
    steps an optimiser's parameter groups one by one anyway, so this costs what one with a
    group per model does).

    With ``checkpoint`` the whole state (models, optimiser, shuffling RNGs, histories) is
    saved after every epoch; a later call with the same ``resume_key`` continues from the
    last finished epoch, its restored epochs passed to ``on_epoch`` marked ``resumed``.

    On ``device`` "cuda" the images are copied there once, batches gathered there, and the
    work runs on a stream of its own (as ``fit``'s). Of ``options`` only ``fused_adam``
    applies (the stacked step is neither captured nor channels-last). Returns each model's
    history; the models are left on the CPU."""
    n = {int(index.shape[0]) for index in train_index}
    if len(n) != 1:
        raise ValueError(f"stacked models must train on equally many images, got {sorted(n)}")
    if on_epoch is not None and len(on_epoch) != len(models):
        raise ValueError(f"{len(on_epoch)} epoch callbacks for {len(models)} models")
    (count,) = n
    dev = torch.device(device)
    prepare_device(dev.type)
    with task_stream(dev):
        stacked = StackedAutoencoders(models).to(dev)
        optimizers = [
            torch.optim.Adam(m.parameters(), lr=lr, weight_decay=wd, fused=options.fused_adam)
            for m, lr, wd in zip(models, lrs, weight_decays, strict=True)
        ]
        schedulers = [
            Scheduler(optimizer, patience=plateau_patience)
            if plateau_patience is not None
            else None
            for optimizer in optimizers
        ]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        histories = _resume(checkpoint, resume_key, models, optimizers, schedulers, generators)
        if on_epoch is not None:
            for callback, history in zip(on_epoch, histories, strict=True):
                for result in history:
                    callback(result)
        flat = images.to(dev).reshape(images.shape[0], -1)
        on_device = [index.to(dev) for index in train_index]
        evals = [e.to(dev) for e in eval_images]
        spreads = [pixel_spread(e) for e in evals]
        blacks = [float(e.double().square().mean()) for e in evals]
        for epoch in range(len(histories[0]) + 1, epochs + 1):
            stacked.train()
            current_lrs = [float(o.param_groups[0]["lr"]) for o in optimizers]
            # Row i holds each model's i-th image of this epoch; the orders are drawn on the
            # CPU from each model's own generator, as fit draws them.
            orders = torch.stack(
                [
                    index[torch.randperm(count, generator=g).to(dev)]
                    for index, g in zip(on_device, generators, strict=True)
                ],
                dim=1,
            )
            totals = torch.zeros(len(models), dtype=torch.float64, device=dev)
            for start in range(0, count, batch_size):
                rows = orders[start : start + batch_size]
                batch = flat[rows].reshape(rows.shape[0], len(models), 28, 28)
                per_model = F.mse_loss(stacked(batch), batch, reduction="none").mean(dim=(0, 2, 3))
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                # Each model's gradient is that of its own mean loss: the sum couples nothing.
                per_model.sum().backward()
                for optimizer in optimizers:
                    optimizer.step()
                totals += per_model.detach().double() * rows.shape[0]
            train_losses = (totals / count).tolist()  # one host sync per epoch
            results = []
            for k, model in enumerate(models):
                eval_loss, spread = loss_and_spread(model, evals[k], eval_batch_size, spreads[k])
                if schedulers[k] is not None:
                    schedulers[k].step(eval_loss)
                results.append(
                    EpochResult(
                        epoch,
                        train_losses[k],
                        eval_loss,
                        current_lrs[k],
                        False,
                        spread,
                        eval_loss / blacks[k],
                    )
                )
            for history, result in zip(histories, results, strict=True):
                history.append(result)
            if checkpoint is not None and resume_key is not None:
                _save_checkpoint(
                    checkpoint, resume_key, models, optimizers, schedulers, generators, histories
                )
            if on_epoch is not None:
                for callback, result in zip(on_epoch, results, strict=True):
                    callback(result)
    for model in models:
        model.to("cpu")
    return histories


def train_fold_group(
    train: ImageSet,
    folds: pd.DataFrame,
    fold: int,
    cells: Sequence[tuple[float, float, int]],
    *,
    size: int,
    epochs: int,
    batch_size: int,
    seed: int,
    output_bias_at_mean: bool = False,
    eval_batch_size: int = 2048,
    on_epoch: Sequence[EpochCallback] | None = None,
    checkpoint: Path | None = None,
    resume_key: str | None = None,
    device: str = "cpu",
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> list[pd.DataFrame]:
    """Grid cells of one fold trained at once: each of ``cells`` (lr, weight decay, repeat)
    trains on every fold but ``fold`` and validates on it, from the initial weights and
    batch order ``aemnist.training.train_fold`` gives it, so that each history agrees with
    that cell's own ``train_fold`` to float rounding.

    Returns each cell's per-epoch history (the grid_history table), in ``cells``' order."""
    val_mask = validation_mask(train, folds, fold)
    fit_images = train.images[~val_mask]
    drawn = [
        grid_model(
            fit_images,
            lr=lr,
            weight_decay=wd,
            fold=fold,
            size=size,
            seed=seed,
            repeat=repeat,
            output_bias_at_mean=output_bias_at_mean,
        )
        for lr, wd, repeat in cells
    ]
    models = [model for model, _ in drawn]
    # The images once, each model's training rows into them: the cells share their fold.
    index = torch.nonzero(~val_mask).squeeze(1)
    eval_images = train.images[val_mask]
    histories = fit_stacked(
        models,
        train.images,
        [index] * len(cells),
        [eval_images] * len(cells),
        lrs=[lr for lr, _, _ in cells],
        weight_decays=[wd for _, wd, _ in cells],
        seeds=[key for _, key in drawn],
        epochs=epochs,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        on_epoch=on_epoch,
        checkpoint=checkpoint,
        resume_key=resume_key,
        device=device,
        options=options,
    )
    return [
        grid_history_frame(lr, wd, fold, history)
        for (lr, wd, _), history in zip(cells, histories, strict=True)
    ]


def train_size_group(
    train: ImageSet,
    test: ImageSet,
    cells: Sequence[tuple[int, int]],
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    plateau_patience: int,
    batch_size: int,
    seed: int,
    stage: str = "sweep",
    selection: str = "test",
    validation_images: int = 10000,
    output_bias_at_mean: bool = False,
    eval_batch_size: int = 2048,
    on_epoch: Sequence[EpochCallback] | None = None,
    checkpoint: Path | None = None,
    resume_key: str | None = None,
    device: str = "cpu",
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> list[pd.DataFrame]:
    """Sizes of the sweep trained at once: each of ``cells`` (size, repeat) from the initial
    weights and batch order ``aemnist.training.train_size`` gives it, on the same images,
    each with its own ReduceLROnPlateau, so that each history agrees with that size's own
    ``train_size`` to float rounding.

    Returns each cell's per-epoch history (the sweep_history table), in ``cells``' order."""
    fit_images, eval_images = size_split(train, test, selection, validation_images, seed)
    drawn = [
        size_model(
            fit_images,
            size=size,
            seed=seed,
            stage=stage,
            repeat=repeat,
            output_bias_at_mean=output_bias_at_mean,
        )
        for size, repeat in cells
    ]
    histories = fit_stacked(
        [model for model, _ in drawn],
        fit_images,
        [torch.arange(fit_images.shape[0])] * len(cells),
        [eval_images] * len(cells),
        lrs=[lr] * len(cells),
        weight_decays=[weight_decay] * len(cells),
        seeds=[key for _, key in drawn],
        epochs=epochs,
        batch_size=batch_size,
        plateau_patience=plateau_patience,
        eval_batch_size=eval_batch_size,
        on_epoch=on_epoch,
        checkpoint=checkpoint,
        resume_key=resume_key,
        device=device,
        options=options,
    )
    return [
        size_history_frame(size, repeat, selection, history)
        for (size, repeat), history in zip(cells, histories, strict=True)
    ]
