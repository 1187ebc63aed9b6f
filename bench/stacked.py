"""Grid cells trained at once as one batched model (aemnist.stacked) against the same cells
trained one after another by ``aemnist.training.fit`` as the grid tasks train them.

Each cell is a grid fold of full size (40000 training and 20000 validation images, size 6,
batch 256) with its own learning rate, weight decay and seed; ``--sizes 2,4,...`` gives cell k
the k-th of those encoding sizes (in turn), as the sweep's stacked groups have them (the
narrower codes padded to the widest). Printed for each N: both
images/s (training images of all cells over the wall time, evaluation included), their
ratio, and how far the stacked cells' losses are from the separate ones (different kernels
round differently; fit's channels-last layout on the CPU adds its own rounding). The two take
turns ``--rounds`` times (the order reversed every other round): median and [min, max], the
ratio taken within each round.

    python bench/stacked.py [--models 2,4,8] [--epochs 1] [--rounds 3] [--device cpu|cuda]
                            [--sizes 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import announce, mnist, result, spread

from aemnist.model import build_autoencoder
from aemnist.runtime import cpu_count
from aemnist.stacked import fit_stacked
from aemnist.training import EpochResult, fit

TRAIN, VAL, SIZE, BATCH = 40000, 20000, 6, 256
LRS = (1e-2, 5e-3, 1e-3, 5e-4)
WDS = (1e-5, 5e-6)


def cells(n: int) -> list[tuple[float, float, int]]:
    """(lr, weight decay, seed) of n grid cells."""
    return [(LRS[k % len(LRS)], WDS[k // len(LRS) % len(WDS)], 100 + k) for k in range(n)]


def sizes(n: int, offered: list[int]) -> list[int]:
    """The encoding size of each of n cells: the offered sizes in turn."""
    return [offered[k % len(offered)] for k in range(n)]


def separate(
    images: torch.Tensor, n: int, epochs: int, device: str, offered: list[int]
) -> tuple[float, list[list[EpochResult]]]:
    started = time.perf_counter()
    histories = [
        fit(
            build_autoencoder(size, seed),
            images[:TRAIN],
            images[TRAIN : TRAIN + VAL],
            lr=lr,
            weight_decay=wd,
            epochs=epochs,
            batch_size=BATCH,
            seed=seed,
            device=device,
        )  # fmt: skip
        for (lr, wd, seed), size in zip(cells(n), sizes(n, offered), strict=True)
    ]
    return n * TRAIN * epochs / (time.perf_counter() - started), histories


def stacked(
    images: torch.Tensor, n: int, epochs: int, device: str, offered: list[int]
) -> tuple[float, list[list[EpochResult]]]:
    chosen = cells(n)
    started = time.perf_counter()
    histories = fit_stacked(
        [
            build_autoencoder(size, seed)
            for (_, _, seed), size in zip(chosen, sizes(n, offered), strict=True)
        ],
        images,
        [torch.arange(TRAIN)] * n,
        [images[TRAIN : TRAIN + VAL]] * n,
        lrs=[lr for lr, _, _ in chosen],
        weight_decays=[wd for _, wd, _ in chosen],
        seeds=[seed for _, _, seed in chosen],
        epochs=epochs,
        batch_size=BATCH,
        device=device,
    )
    return n * TRAIN * epochs / (time.perf_counter() - started), histories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2,4,8", help="cells trained at once")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--sizes", default=str(SIZE), help="encoding sizes, given in turn")
    args = parser.parse_args()
    offered = [int(x) for x in args.sizes.split(",")]
    torch.set_num_threads(cpu_count())
    announce(args.device)
    print(f"{torch.get_num_threads()} threads, {args.epochs} epoch(s) per cell, sizes {offered}")
    images = mnist(train=True).images
    best: tuple[float, float, int] = (0.0, 0.0, 0)
    for n in (int(x) for x in args.models.split(",")):
        alone: list[float] = []
        together: list[float] = []
        worst = 0.0
        for round_ in range(args.rounds):
            for way in ("separate", "stacked") if round_ % 2 == 0 else ("stacked", "separate"):
                if way == "separate":
                    rate, reference = separate(images, n, args.epochs, args.device, offered)
                    alone.append(rate)
                else:
                    rate, histories = stacked(images, n, args.epochs, args.device, offered)
                    together.append(rate)
            worst = max(
                worst,
                *(
                    abs(a.eval_loss - b.eval_loss) / b.eval_loss
                    for ours, theirs in zip(histories, reference, strict=True)
                    for a, b in zip(ours, theirs, strict=True)
                ),
            )
        ratios = [t / a for t, a in zip(together, alone, strict=True)]
        print(
            f"{n} cells: one after another {spread(alone)} images/s, stacked {spread(together)} "
            f"images/s, ratio {spread(ratios, 2)}; largest relative validation-loss "
            f"difference {worst:.1e}",
            flush=True,
        )
        ratio = statistics.median(ratios)
        if best[2] == 0 or ratio > best[0] / best[1]:  # the best median ratio's N
            best = (statistics.median(together), statistics.median(alone), n)
    name = "stacked-grid" if len(offered) == 1 else "stacked-sizes"
    result(f"{name}-{args.device}", best[0], "images/s", best[1])


if __name__ == "__main__":
    main()
