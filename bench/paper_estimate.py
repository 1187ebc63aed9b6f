"""The paper profile's wall time on this machine, estimated from measured throughput.

Counts the paper profile's training and evaluation image-steps from its config (grid folds,
sweep sizes, final model), measures fit's training rate and the evaluation rate here (one
process, all cores' threads), and prints the estimate beside the laboratory loop's, measured
in the same run. Pass --measured SECONDS to print a measured paper run beside it.

    python bench/paper_estimate.py [--measured SECONDS]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import SEED, SIZE, laboratory_epochs, machine, mnist, result

from aemnist.config import load_config
from aemnist.model import build_autoencoder
from aemnist.runtime import cpu_count
from aemnist.training import evaluate, fit


def image_steps() -> tuple[int, int]:
    """(training, evaluation) image-steps of the paper profile."""
    c = load_config("paper")
    n_train, n_test = 60000, 10000
    n_grid = len(c.grid.learning_rates) * len(c.grid.weight_decays) * c.grid.folds
    fold_train = n_train * (c.grid.folds - 1) // c.grid.folds
    train = n_grid * c.grid.epochs * fold_train
    evaluation = n_grid * c.grid.epochs * (n_train - fold_train)
    train += len(c.sweep.sizes) * c.sweep.epochs * n_train + c.final.epochs * n_train
    evaluation += (len(c.sweep.sizes) * c.sweep.epochs + c.final.epochs) * n_test
    return train, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", type=float, help="seconds of a measured paper run")
    args = parser.parse_args()
    torch.set_num_threads(cpu_count())
    train_steps, eval_steps = image_steps()
    print(f"machine: {machine()}")
    print(f"paper profile: {train_steps / 1e6:.1f} M training + {eval_steps / 1e6:.1f} M "
          f"evaluation image-steps")  # fmt: skip
    images = mnist(train=True).images
    model = build_autoencoder(SIZE, SEED)
    started = time.perf_counter()
    fit(model, images, images[:256], lr=0.01, weight_decay=5e-6, epochs=1, batch_size=256,
        seed=SEED)  # fmt: skip
    train_rate = images.shape[0] / (time.perf_counter() - started)
    started = time.perf_counter()
    evaluate(model, images[:20000])
    eval_rate = 20000 / (time.perf_counter() - started)
    lab_seconds, _ = laboratory_epochs(build_autoencoder(SIZE, SEED), 1)
    lab_rate = images.shape[0] / lab_seconds
    ours = train_steps / train_rate + eval_steps / eval_rate
    lab = train_steps / lab_rate + eval_steps / eval_rate
    print(f"fit: {train_rate:.0f} training images/s, {eval_rate:.0f} evaluation images/s")
    print(f"laboratory loop: {lab_rate:.0f} training images/s")
    print(f"estimate, one process: {ours / 60:.0f} min (laboratory loop: {lab / 60:.0f} min); "
          f"t-SNE, corruption and orchestration add about a minute")  # fmt: skip
    if args.measured:
        print(f"measured: {args.measured / 60:.0f} min")
    result("paper_estimate", ours / 60, "minutes", lab / 60)


if __name__ == "__main__":
    main()
