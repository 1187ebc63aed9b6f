"""The paper profile's wall time on this machine, projected from measured throughput.

Counts the paper profile's training and evaluation image-steps from its config and folds
(each grid cell's other folds, the sweep's tasks and repeats, the final model; bench/gpu.py's
count), measures fit's steady training rate and the evaluation rate here (one process, all
cores' threads), and prints the projection beside the laboratory loop's. Like with like: fit
and the laboratory loop each train ``--epochs`` epochs (epoch 1 warm-up, the rest timed),
taking turns ``--rounds`` times (the order reversed every other round); each figure is the
median with its [min, max]. A projection, not a run: pass --measured SECONDS to print a
measured paper run beside it.

    python bench/paper_estimate.py [--rounds 3] [--epochs 2] [--train-images 60000]
                                   [--measured SECONDS]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import SEED, SIZE, announce, bench_dir, laboratory_epochs, mirror, result, spread
from gpu import image_steps

from aemnist import plan
from aemnist.config import load_config
from aemnist.data import download_mnist, load_images, make_folds
from aemnist.model import build_autoencoder
from aemnist.runtime import cpu_count
from aemnist.training import evaluate, fit


def steps(profile: str) -> tuple[int, int]:
    """(training, evaluation) image-steps of the profile, from its config and folds."""
    c = load_config(profile)
    tables, _ = download_mnist(bench_dir() / "data", mirror(), force=False)
    train = load_images(tables["train"].path, c.data.train_limit)
    n_test = len(load_images(tables["test"].path, c.data.test_limit).idx)
    folds = make_folds(train.idx, train.labels, c.grid.folds, c.seed)
    training = sum(sum(v) for v in image_steps(c, train, folds).values())
    # Each epoch is scored: a grid cell on its own fold, a sweep or final task on the test
    # set or the held-out validation images; the final model once more on the test set.
    scored = c.sweep.validation_images if c.sweep.selection == "validation" else n_test
    evaluation = sum(
        int((folds["fold"] == fold).sum()) * c.grid.epochs for _, _, fold, _ in plan.grid_cells(c)
    ) + c.sweep.repeats * scored * (len(c.sweep.sizes) * c.sweep.epochs + c.final.epochs)
    return training, evaluation + c.sweep.repeats * n_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--epochs", type=int, default=2, help="epoch 1 is warm-up, never timed")
    parser.add_argument(
        "--train-images", type=int, default=60000, help="images per timed epoch (both loops)"
    )
    parser.add_argument("--measured", type=float, help="seconds of a measured paper run")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 is the warm-up, never timed")
    torch.set_num_threads(cpu_count())
    announce("cpu")
    train_steps, eval_steps = steps(args.profile)
    print(f"{args.profile} profile: {train_steps:,} training + {eval_steps:,} evaluation "
          f"image-steps (from its config)")  # fmt: skip
    tables, _ = download_mnist(bench_dir() / "data", mirror(), force=False)
    images = load_images(tables["train"].path, args.train_images).images
    n = images.shape[0]
    rates: dict[str, list[float]] = {"fit": [], "laboratory loop": [], "evaluation": []}
    for round_ in range(args.rounds):
        for which in ("fit", "laboratory loop") if round_ % 2 == 0 else ("laboratory loop", "fit"):
            seconds: list[float] = []
            if which == "fit":
                marks = [time.perf_counter()]
                model = build_autoencoder(SIZE, SEED)
                fit(model, images, images[:256], lr=0.01, weight_decay=5e-6, epochs=args.epochs,
                    batch_size=256, seed=SEED,
                    on_epoch=lambda _, m=marks: m.append(time.perf_counter()))  # fmt: skip
                seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
                started = time.perf_counter()
                evaluate(model, images[: min(20000, n)])
                rates["evaluation"].append(min(20000, n) / (time.perf_counter() - started))
            else:
                laboratory_epochs(
                    build_autoencoder(SIZE, SEED),
                    args.epochs,
                    epoch_seconds=seconds,
                    limit=args.train_images,
                )
            rates[which].append(n * (args.epochs - 1) / sum(seconds[1:]))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    ours = [
        train_steps / r + eval_steps / e
        for r, e in zip(rates["fit"], rates["evaluation"], strict=True)
    ]
    lab = [
        train_steps / r + eval_steps / e
        for r, e in zip(rates["laboratory loop"], rates["evaluation"], strict=True)
    ]
    print(f"images/s, median [min, max] over {args.rounds} rounds (steady epochs): "
          + ", ".join(f"{k} {spread(v)}" for k, v in rates.items()))  # fmt: skip
    print(f"projection, one process: {spread([s / 60 for s in ours])} min (laboratory loop: "
          f"{spread([s / 60 for s in lab])} min); t-SNE, corruption and orchestration not "
          f"included")  # fmt: skip
    if args.measured:
        print(f"measured: {args.measured / 60:.0f} min")
    result("paper_estimate", statistics.median(ours) / 60, "minutes", statistics.median(lab) / 60)


if __name__ == "__main__":
    main()
