"""Training throughput of one task (aemnist.training.fit) against the laboratory loop.

Both train the laboratory autoencoder (size 20) on the 60000 training images with batch 256,
Adam (lr 0.01, weight decay 5e-6), the same initial weights and the same shuffling order (the
DataLoader's RandomSampler and ``fit`` draw the same permutation from the same seed), in this
one process with the same torch threads; so their per-epoch losses must agree to float
tolerance, and the script says whether they do. ``fit`` evaluates a 256-image set after each
epoch (the laboratory loop evaluates nothing); everything else it does is timed. The loops
take turns ``--rounds`` times (the order reversed every other round); each figure is the
median with its [min, max], each ratio taken within a round.

    python bench/throughput.py [--epochs 2] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from common import (
    BATCH,
    LR,
    SEED,
    SIZE,
    WEIGHT_DECAY,
    announce,
    laboratory_epochs,
    mnist,
    result,
    spread,
)

from aemnist.model import build_autoencoder
from aemnist.runtime import cpu_count
from aemnist.training import DEFAULT_OPTIONS, fit

# fit as shipped, and with each speed-up off, to show what each brings.
VARIANTS = {
    "fit": DEFAULT_OPTIONS,
    "fit, no channels-last": replace(DEFAULT_OPTIONS, channels_last=False),
    "fit, no fused Adam": replace(DEFAULT_OPTIONS, fused_adam=False),
    "fit, plain (neither)": replace(DEFAULT_OPTIONS, channels_last=False, fused_adam=False),
}


def ours(images: torch.Tensor, epochs: int, variant: str = "fit") -> tuple[float, list[float]]:
    model = build_autoencoder(SIZE, SEED)
    started = time.perf_counter()
    history = fit(
        model,
        images,
        images[:256],
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        epochs=epochs,
        batch_size=BATCH,
        seed=SEED,
        options=VARIANTS[variant],
    )
    return time.perf_counter() - started, [h.train_loss for h in history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--threads", type=int, default=cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = mnist(train=True).images
    n = args.epochs * train.shape[0]
    announce("cpu")
    print(f"torch threads: {args.threads}; {args.epochs} epochs")

    rates: dict[str, list[float]] = {"laboratory loop": []} | {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {}
    for round_ in range(1, args.rounds + 1):
        order = list(rates) if round_ % 2 else list(reversed(rates))
        for name in order:
            if name == "laboratory loop":
                seconds, losses[name] = laboratory_epochs(
                    build_autoencoder(SIZE, SEED), args.epochs
                )
            else:
                seconds, losses[name] = ours(train, args.epochs, name)
            rates[name].append(n / seconds)
        print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    lab = rates["laboratory loop"]
    print(f"\nimages/s and x laboratory loop (within each round), median [min, max] over "
          f"{args.rounds} rounds; epoch losses")  # fmt: skip
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, lab, strict=True)]
        print(
            f"{name:24s} {spread(values):>22s} {spread(ratios, 2):>18s}  "
            + " ".join(f"{x:.6f}" for x in losses[name])
        )
    for name in VARIANTS:
        worst = max(
            abs(a - b) / a for a, b in zip(losses["laboratory loop"], losses[name], strict=True)
        )
        print(f"largest relative loss difference, {name} vs laboratory loop: {worst:.1e}")
    result("throughput", statistics.median(rates["fit"]), "images/s", statistics.median(lab))


if __name__ == "__main__":
    main()
