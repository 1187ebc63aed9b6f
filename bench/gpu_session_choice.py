"""Which config bench/gpu_session.sh runs on the lent GPU, from the stacking probe's figure.

The probe (``bench/stacked.py --models 36 --epochs 1 --rounds 1``) ends with one JSON line:
``value`` is the training images/s of 36 grid cells stacked in one task. The separate config
(``bench/gpu_session.toml``: the grid with one seed, 108 fold tasks, and the sweep with three,
30 tasks, eight at a time) trains in about 310 s on an H200 (the last one lent: 162 s for the
grid's seed, 50 s for the sweep's one). The stacked config (the grid's and the sweep's cells
stacked: ``bench/gpu_session_stacked.toml``, three grid seeds and five sweep seeds) runs
where its training fits that budget (``--train-seconds``, 310) at the probe's rate: with the
most grid seeds (3, 2, 1) that fit, then the most sweep seeds (5, else 3). Pessimistic on
purpose: it credits stacked tasks that share the GPU nothing over one task alone, so that
the stacked config never makes the session's one study longer than the separate one it
replaces (a ratio of 2 over cells trained one after another, the rule before, would have let
three grid seeds take about 550 s where one took 162). No figure (the probe failed or never
ran), a rate at which not even one grid seed with three sweep seeds fits, or a ``--check``
probe without a figure (the sweep's padded sizes, which the 36 grid cells do not exercise,
failed on the device): the separate config.

Prints the config file to run: the stacked one as committed, or a copy of it in ``--scratch``
with fewer seeds, or the separate one; and one line on stderr saying why.

    python bench/gpu_session_choice.py PROBE_LOG --profile paper --train-seconds 310 \\
        --separate bench/gpu_session.toml --stacked bench/gpu_session_stacked.toml --scratch DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from aemnist.config import load_config

MNIST_TRAIN = 60000  # images in MNIST's training set, what train_limit = 0 means


def training_steps(profile: str, config: Path) -> tuple[int, int]:
    """Training image-steps of one seed of the grid and of one seed of the sweep: a grid cell
    trains each fold on the other folds' images (about (folds - 1) / folds of the training
    set) for ``grid.epochs``; a sweep cell on the training set (less the held-out images
    where it selects on them) for ``sweep.epochs``."""
    c = load_config(profile, config)
    n_train = c.data.train_limit or MNIST_TRAIN
    cells = len(c.grid.learning_rates) * len(c.grid.weight_decays)
    grid = cells * (c.grid.folds - 1) * n_train * c.grid.epochs
    fit = n_train - (c.sweep.validation_images if c.sweep.selection == "validation" else 0)
    return grid, len(c.sweep.sizes) * fit * c.sweep.epochs


def probe_rate(log: Path) -> float:
    """The stacked images/s the probe printed last, or 0 where it printed none."""
    try:
        lines = log.read_text().strip().splitlines()
        return float(json.loads(lines[-1]).get("value") or 0) if lines else 0.0
    except (OSError, ValueError, AttributeError):
        return 0.0


def stacked_seeds(
    rate: float, steps: tuple[int, int], budget_s: float, most: tuple[int, int]
) -> tuple[int, int] | None:
    """(grid seeds, sweep seeds) to train stacked within ``budget_s`` at ``rate`` images/s:
    the most grid seeds first (up to ``most[0]``), then the most sweep seeds (``most[1]``,
    else 3); None where not even one grid seed with three sweep seeds fits."""
    if rate <= 0:
        return None
    grid, sweep = steps
    for grid_seeds in range(most[0], 0, -1):
        for sweep_seeds in sorted({most[1], min(3, most[1])}, reverse=True):
            if grid_seeds * grid + sweep_seeds * sweep <= budget_s * rate:
                return grid_seeds, sweep_seeds
    return None


def with_repeats(text: str, grid: int, sweep: int) -> str:
    """A config's text with its [grid] and [sweep] repeats set."""
    out, section = [], ""
    for line in text.splitlines(keepends=True):
        if line.startswith("["):
            section = line.strip()
        if line.startswith("repeats =") and section in ("[grid]", "[sweep]"):
            line = f"repeats = {grid if section == '[grid]' else sweep}\n"
        out.append(line)
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe_log", type=Path)
    parser.add_argument(
        "--check", type=Path, help="another probe's log that must end with a figure (or: separate)"
    )
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--train-seconds", type=float, default=310.0)
    parser.add_argument("--separate", type=Path, required=True)
    parser.add_argument("--stacked", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True)
    args = parser.parse_args()
    committed = tomllib.loads(args.stacked.read_text())
    most = (committed["grid"]["repeats"], committed["sweep"]["repeats"])
    steps = training_steps(args.profile, args.stacked)
    rate = probe_rate(args.probe_log)
    seeds = stacked_seeds(rate, steps, args.train_seconds, most)
    projected = (
        f"{steps[0] / rate:.3g} s a grid seed, {steps[1] / rate:.3g} s a sweep seed"
        if rate > 0
        else "no figure"
    )
    why = f"stacked {rate:.0f} images/s ({projected}, budget {args.train_seconds:g} s)"
    if args.check is not None and probe_rate(args.check) <= 0:
        why += f", but {args.check.name} has no figure (see it)"
        seeds = None
    if seeds is None:
        print(f"{why}: {args.separate.name}", file=sys.stderr)
        print(args.separate.resolve())
        return
    chosen = args.stacked.resolve()
    if seeds != most:
        args.scratch.mkdir(parents=True, exist_ok=True)
        chosen = args.scratch / args.stacked.name
        chosen.write_text(with_repeats(args.stacked.read_text(), *seeds))
    print(f"{why}: {chosen.name}, grid {seeds[0]} seed(s), sweep {seeds[1]}", file=sys.stderr)
    print(chosen)


if __name__ == "__main__":
    main()
