"""The laboratory's convolutional autoencoder (design.md), with an encoding of size ``d``."""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import torch
from torch import nn

from aemnist.schemas import atomic_write_bytes
from aemnist.storage import as_path

# Seeding the global RNG and building the model must not interleave between threads that
# build models at the same time, or two tasks could swap initial weights.
_INIT_LOCK = threading.Lock()


class Encoder(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.ReLU(True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(True),
            nn.Conv2d(16, 32, 3, stride=2, padding=0),
            nn.ReLU(True),
        )
        self.linear = nn.Sequential(
            nn.Flatten(start_dim=1),
            nn.Linear(3 * 3 * 32, 64),
            nn.ReLU(True),
            nn.Linear(64, size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(x))


class Decoder(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = nn.Sequential(
            nn.Linear(size, 64),
            nn.ReLU(True),
            nn.Linear(64, 3 * 3 * 32),
            nn.ReLU(True),
            nn.Unflatten(dim=1, unflattened_size=(32, 3, 3)),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 3, stride=2, output_padding=0),
            nn.ReLU(True),
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(True),
            nn.ConvTranspose2d(8, 1, 3, stride=2, padding=1, output_padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.linear(z))


class Autoencoder(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.encoder = Encoder(size)
        self.decoder = Decoder(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build_autoencoder(size: int, seed: int) -> Autoencoder:
    """A freshly initialised autoencoder whose weights depend on ``seed`` alone."""
    with _INIT_LOCK:
        state = torch.random.get_rng_state()
        model = Autoencoder(size)
        torch.random.set_rng_state(state)
    # Re-initialise from a private generator, as PyTorch's default init does from the global
    # one (same draws in the same order, so the same weights as torch.manual_seed(seed) then
    # Autoencoder(size)): another thread drawing from the global RNG cannot change them.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return model


def start_at_mean_intensity(model: Autoencoder, images: torch.Tensor) -> None:
    """Set the output layer's bias to the logit of ``images``' mean intensity: the untrained
    model then reconstructs every pixel near the mean brightness (MNIST: 0.13).

    Why: with PyTorch's default initialisation the untrained model gives every image nearly
    the same output, 0.5 everywhere; every pixel's error then has the same sign, Adam's first
    steps (each about lr in size, whatever the gradient) push the output layer in unison
    towards 0 and overshoot: the sigmoid saturates at an all-black image, its gradient falls
    below Adam's epsilon and the run stays there for epochs (a dead start: 2 of 10 seeds at
    size 20, lr 0.01). Started at the mean, the errors have both signs and it does not
    happen (0 of 10; bench/dead_starts.py measures it over seeds)."""
    mean = float(images.double().mean().clamp(1e-4, 1 - 1e-4))
    output = model.decoder.deconv[-2]
    with torch.no_grad():
        output.bias.fill_(math.log(mean / (1 - mean)))


def save_checkpoint(model: Autoencoder, path: Path) -> None:
    payload = {"size": model.size, "state_dict": model.state_dict()}
    atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path | str) -> Autoencoder:
    # From bytes: a checkpoint in an object store is no local file (aemnist.storage).
    raw = as_path(path).read_bytes()
    payload = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    model = Autoencoder(int(payload["size"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model
