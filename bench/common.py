"""What the bench scripts share: the MNIST tables, the laboratory loop, the JSON result line."""

from __future__ import annotations

import gzip
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python bench/NAME.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from aemnist.data import MIRROR_ENV, ImageSet, download_mnist, load_images  # noqa: E402
from aemnist.runtime import machine_tags  # noqa: E402

# The laboratory's settings (design.md): encoding size 20, batch 256, Adam.
SIZE = 20
BATCH = 256
LR = 0.01
WEIGHT_DECAY = 5e-6
SEED = 0


def mirror() -> Path:
    path = os.environ.get(MIRROR_ENV) or str(REPO_ROOT.parent / "shared" / "data" / "mnist")
    if not Path(path).is_dir():
        sys.exit(f"bench: MNIST not found at {path}; set {MIRROR_ENV} to a folder of the 4 files")
    return Path(path)


def bench_dir() -> Path:
    """Scratch space kept between bench runs (the parquet tables are built once)."""
    root = Path(os.environ.get("AEMNIST_BENCH_DIR", REPO_ROOT / "aemnist-runs" / "bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def mnist(train: bool = True) -> ImageSet:
    tables, _ = download_mnist(bench_dir() / "data", mirror(), force=False)
    return load_images(tables["train" if train else "test"].path)


def torchvision_root() -> Path:
    """The four raw IDX files where torchvision's MNIST dataset looks for them."""
    root = bench_dir() / "torchvision"
    raw = root / "MNIST" / "raw"
    if not raw.is_dir():
        raw.mkdir(parents=True)
        for gz in mirror().glob("*-ubyte.gz"):
            with gzip.open(gz) as src, (raw / gz.name[:-3]).open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return root


def laboratory_epochs(
    model: nn.Module,
    epochs: int,
    seed: int = SEED,
    epoch_seconds: list[float] | None = None,
    limit: int = 0,
) -> tuple[float, list[float]]:
    """The laboratory loop: torchvision's MNIST with ToTensor through a shuffling DataLoader,
    Adam, MSE. Returns the seconds spent training and each epoch's mean training loss; each
    epoch's seconds are appended to ``epoch_seconds`` if given. ``limit``: the first that
    many images only (0: all)."""
    from torch.utils.data import DataLoader, RandomSampler, Subset
    from torchvision import datasets, transforms

    dataset = datasets.MNIST(
        torchvision_root(), train=True, download=False, transform=transforms.ToTensor()
    )
    if limit:
        dataset = Subset(dataset, range(limit))
    # shuffle=True, with the sampler's own seeded generator: a DataLoader also draws a base
    # seed from its generator, so sharing one would shift the permutation that fit draws.
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = []
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for images, _labels in loader:
            loss = nn.functional.mse_loss(model(images), images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * images.shape[0]
            count += images.shape[0]
        losses.append(total / count)
        if epoch_seconds is not None:
            epoch_seconds.append(time.perf_counter() - started - sum(epoch_seconds))
    return time.perf_counter() - started, losses


def machine(device: str | None = None) -> str:
    """What the figures were measured on, as a study's parent run records it (CPU model and
    the cores this process may use, the GPU torch sees, torch's and Python's versions), and
    the device the bench computes on."""
    tags = machine_tags("auto")
    gpu = "no GPU" if tags["machine.gpu"] == "none" else tags["machine.gpu"]
    text = (
        f"{tags['machine.cpu']}, {gpu}, torch {tags['machine.torch']}, "
        f"Python {tags['machine.python']}"
    )
    return text + (f"; device {device}" if device else "")


def announce(device: str | None = None) -> None:
    """The first lines of every bench: the machine, the date and the command that ran, so that
    a figure copied from its output carries all three."""
    print(f"machine: {machine(device)}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)


def spread(values: Sequence[float], digits: int = 0) -> str:
    """Median and [min, max] of a bench's rounds: what every figure is reported as (the best
    of each side against the other would compare two lucky rounds)."""
    return (
        f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, "
        f"{max(values):.{digits}f}]"
    )


def result(name: str, value: float, unit: str, baseline: float) -> None:
    """The one JSON line every bench script ends with."""
    line = {
        "bench": name,
        "value": round(value, 3),
        "unit": unit,
        "baseline": round(baseline, 3),
        "ratio": round(value / baseline, 3) if baseline else None,
    }
    print(json.dumps(line), flush=True)


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="aemnist-bench-"))
