"""Several autoencoders of one architecture trained at once, as one batched model.

Each model keeps its own parameters, learning rate, weight decay, initial weights and
shuffling order; one step runs them all through grouped convolutions and batched matrix
products (model k sees its own batch in input channel k), and torch's Adam updates each
model's parameters as a group of its own. The arithmetic per model is the one
``aemnist.training.fit`` does; only the kernels that carry it differ (grouped instead of
single convolutions), so results agree with separate training to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from aemnist.model import Autoencoder
from aemnist.runtime import prepare_device
from aemnist.training import DEFAULT_OPTIONS, EpochResult, TrainingOptions, evaluate

# The last two transposed convolutions of the decoder (aemnist.model.Decoder).
_UPSAMPLE = {"stride": 2, "padding": 1, "output_padding": 1}


class StackedAutoencoders(nn.Module):
    """``models`` side by side: input (batch, n_models, 28, 28), output the same shape,
    model k reading and writing channel k. The models' own parameters are used (joined
    for each step), so training this trains them."""

    def __init__(self, models: Sequence[Autoencoder]) -> None:
        super().__init__()
        sizes = {m.size for m in models}
        if len(sizes) != 1:
            raise ValueError(f"stacked models must share one encoding size, got {sorted(sizes)}")
        self.models = nn.ModuleList(models)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n = x.shape[0], len(self.models)
        h = F.relu(self._conv(x, "encoder.conv.0", stride=2, padding=1))
        h = F.relu(self._conv(h, "encoder.conv.2", stride=2, padding=1))
        h = F.relu(self._conv(h, "encoder.conv.4", stride=2, padding=0))
        # (batch, n*32, 3, 3) -> (n, batch, 288): each model's flattening order (c, y, x)
        h = h.reshape(batch, n, -1).transpose(0, 1)
        h = F.relu(self._linear(h, "encoder.linear.1"))
        z = self._linear(h, "encoder.linear.3")
        h = F.relu(self._linear(z, "decoder.linear.0"))
        h = F.relu(self._linear(h, "decoder.linear.2"))
        h = h.transpose(0, 1).reshape(batch, n * 32, 3, 3)
        h = F.relu(self._deconv(h, "decoder.deconv.0", stride=2))
        h = F.relu(self._deconv(h, "decoder.deconv.2", **_UPSAMPLE))
        out = self._deconv(h, "decoder.deconv.4", **_UPSAMPLE)
        return torch.sigmoid(out)


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
    eval_batch_size: int = 2048,
    device: str = "cpu",
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> list[list[EpochResult]]:
    """Train ``models`` in place, at once: model k on ``images[train_index[k]]`` with Adam
    at ``lrs[k]`` and ``weight_decays[k]``, its batches drawn as ``fit`` draws them from
    ``seeds[k]``; evaluated on ``eval_images[k]`` after each epoch. Every model must see
    the same number of training images (one step count). On ``device`` "cuda" the images
    are copied there once and batches gathered there. Of ``options`` only ``fused_adam``
    applies (the stacked step is neither captured nor channels-last). Returns each model's
    history; the models are left on the CPU."""
    n = {int(index.shape[0]) for index in train_index}
    if len(n) != 1:
        raise ValueError(f"stacked models must train on equally many images, got {sorted(n)}")
    (count,) = n
    dev = torch.device(device)
    prepare_device(dev.type)
    stacked = StackedAutoencoders(models).to(dev)
    optimizer = torch.optim.Adam(
        [
            {"params": list(m.parameters()), "lr": lr, "weight_decay": wd}
            for m, lr, wd in zip(models, lrs, weight_decays, strict=True)
        ],
        fused=options.fused_adam,
    )
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    flat = images.to(dev).reshape(images.shape[0], -1)
    on_device = [index.to(dev) for index in train_index]
    evals = [e.to(dev) for e in eval_images]
    histories: list[list[EpochResult]] = [[] for _ in models]
    for epoch in range(1, epochs + 1):
        stacked.train()
        # Row i holds each model's i-th image of this epoch; the orders are drawn on the CPU
        # from each model's own generator, as fit draws them.
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
            optimizer.zero_grad(set_to_none=True)
            # Each model's gradient is that of its own mean loss: the sum couples nothing.
            per_model.sum().backward()
            optimizer.step()
            totals += per_model.detach().double() * rows.shape[0]
        train_losses = (totals / count).tolist()  # one host sync per epoch
        for k, model in enumerate(models):
            eval_loss = evaluate(model, evals[k], eval_batch_size)
            histories[k].append(EpochResult(epoch, train_losses[k], eval_loss, float(lrs[k])))
    stacked.to("cpu")
    return histories
