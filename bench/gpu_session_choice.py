"""Which config bench/gpu_session.sh runs on the lent GPU, from the stacking probe's figure.

The probe (``bench/stacked.py --models 36 --epochs 1 --rounds 1``) ends with one JSON line:
``value`` is the training images/s of 36 grid cells stacked in one task. The separate grid
(``bench/gpu_session.toml``, one seed, 108 fold tasks eight at a time) took 162 s of compute
on the last H200; the stacked grid runs where its seeds fit a grid budget of about that
(``--grid-seconds``, 180): seeds = the most of 3, 2, 1 whose image-steps at the probe's rate
fit it. Pessimistic on purpose: it credits the stacked tasks that share the GPU nothing over
one task alone, so that a stacked grid never makes the session's one study longer than the
separate one it replaces (a ratio of 2 over cells trained one after another, the threshold
before, would have let three seeds take about 550 s where one took 162). No figure (the probe
failed or never ran), or a rate at which not even one seed fits: the separate grid.

Prints the config file to run: the stacked one as committed (three seeds), or a copy of it in
``--scratch`` with fewer grid seeds, or the separate one; and one line on stderr saying why.

    python bench/gpu_session_choice.py PROBE_LOG --profile paper --grid-seconds 180 \\
        --separate bench/gpu_session.toml --stacked bench/gpu_session_stacked.toml --scratch DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from pathlib import Path

from aemnist.config import load_config

MNIST_TRAIN = 60000  # images in MNIST's training set, what train_limit = 0 means


def grid_steps_per_seed(profile: str, config: Path) -> int:
    """Training image-steps of one seed of the grid: every cell trains each fold on the other
    folds' images (about (folds - 1) / folds of the training set) for ``grid.epochs``."""
    c = load_config(profile, config)
    n_train = c.data.train_limit or MNIST_TRAIN
    cells = len(c.grid.learning_rates) * len(c.grid.weight_decays)
    return cells * (c.grid.folds - 1) * n_train * c.grid.epochs


def probe_rate(log: Path) -> float:
    """The stacked images/s the probe printed last, or 0 where it printed none."""
    try:
        lines = log.read_text().strip().splitlines()
        return float(json.loads(lines[-1]).get("value") or 0) if lines else 0.0
    except (OSError, ValueError, AttributeError):
        return 0.0


def stacked_seeds(rate: float, steps_per_seed: int, budget_s: float, most: int) -> int:
    """The most grid seeds (at most ``most``) whose stacked training fits ``budget_s``."""
    if rate <= 0:
        return 0
    return min(most, math.floor(budget_s * rate / steps_per_seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe_log", type=Path)
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--grid-seconds", type=float, default=180.0)
    parser.add_argument("--separate", type=Path, required=True)
    parser.add_argument("--stacked", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True)
    args = parser.parse_args()
    most = tomllib.loads(args.stacked.read_text())["grid"]["repeats"]
    steps = grid_steps_per_seed(args.profile, args.stacked)
    rate = probe_rate(args.probe_log)
    seeds = stacked_seeds(rate, steps, args.grid_seconds, most)
    projected = f"{steps / rate:.3g} s a seed" if rate > 0 else "no figure"
    if seeds < 1:
        print(
            f"stacked {rate:.0f} images/s ({projected}, budget {args.grid_seconds:g} s): "
            f"{args.separate.name}",
            file=sys.stderr,
        )
        print(args.separate.resolve())
        return
    chosen = args.stacked.resolve()
    if seeds < most:
        text = args.stacked.read_text()
        old, new = f"repeats = {most}\n", f"repeats = {seeds}\n"
        grid_at = text.index("[grid]")  # the grid's repeats, not the sweep's
        text = text[:grid_at] + text[grid_at:].replace(old, new, 1)
        args.scratch.mkdir(parents=True, exist_ok=True)
        chosen = args.scratch / args.stacked.name
        chosen.write_text(text)
    print(
        f"stacked {rate:.0f} images/s ({projected}, budget {args.grid_seconds:g} s): "
        f"{chosen.name} with {seeds} grid seed(s)",
        file=sys.stderr,
    )
    print(chosen)


if __name__ == "__main__":
    main()
