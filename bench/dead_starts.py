"""Dead starts over seeds: how often a training run sits at a constant output for its first
epochs, and what it costs, with the output bias started at the images' mean intensity
(``training.output_bias_at_mean``) and without (PyTorch's default initialisation, the seed's).

Each seed is one repeat of the study's final-model task (``train_size``, stage "final":
repeat r draws its own initial weights and batches), trained both ways on the same images,
the two ways alternating which goes first. Printed per seed: the epochs spent dead
(aemnist.summaries.dead_epochs) and the last epoch's test loss; then per way: how many seeds
started dead, the test loss mean ± standard deviation and range over all seeds, and over the
seeds that did not start dead.

    python bench/dead_starts.py [--size 20] [--lr 0.01] [--seeds 10] [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import WEIGHT_DECAY, machine, mnist

from aemnist.summaries import dead_epochs
from aemnist.training import train_size

WAYS = {"default init": False, "output bias at mean": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=0, help="0 = all 60000 images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = mnist(train=True), mnist(train=False)
    if args.train_limit:
        train = type(train)(
            train.images[: args.train_limit],
            train.labels[: args.train_limit],
            train.idx[: args.train_limit],
        )
    print(
        f"{machine()}; size {args.size}, lr {args.lr:g}, weight decay {args.weight_decay:g}, "
        f"{args.epochs} epochs on {len(train)} images, {args.seeds} seeds, device cpu"
    )
    outcome: dict[str, list[tuple[int, float]]] = {way: [] for way in WAYS}
    for repeat in range(args.seeds):
        ways = list(WAYS) if repeat % 2 == 0 else list(reversed(WAYS))
        line = []
        for way in ways:
            started = time.perf_counter()
            _, history = train_size(
                train,
                test,
                size=args.size,
                lr=args.lr,
                weight_decay=args.weight_decay,
                epochs=args.epochs,
                plateau_patience=5,
                batch_size=256,
                seed=0,
                stage="final",
                repeat=repeat,
                output_bias_at_mean=WAYS[way],
            )
            dead = dead_epochs(history)
            loss = float(history["test_loss"].iloc[-1])
            outcome[way].append((dead, loss))
            took = time.perf_counter() - started
            line.append(f"{way}: dead {dead}, test {loss:.5f} ({took:.0f} s)")
        print(f"seed {repeat}: " + "; ".join(sorted(line)), flush=True)
    for way, runs in outcome.items():
        losses = [loss for _, loss in runs]
        alive = [loss for dead, loss in runs if not dead]
        dead_runs = sum(1 for dead, _ in runs if dead)
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(
            f"{way}: {dead_runs} of {len(runs)} seeds started dead; test loss after "
            f"{args.epochs} epochs {statistics.mean(losses):.5f} ± {spread:.5f} "
            f"[{min(losses):.5f}, {max(losses):.5f}]; without the dead starts "
            f"{statistics.mean(alive) if alive else float('nan'):.5f} ({len(alive)} seeds)"
        )


if __name__ == "__main__":
    main()
