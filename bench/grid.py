"""Aggregate training throughput of a grid stage run through the real Prefect flow, against
the same fold trainings run one after another in a plain loop in one process.

The flow run is `aemnist run` (its temporary Prefect server, the thread-pool task runner with
the workers and torch threads per task that follow from the cores, MLflow nested runs) on the
full training set with a small grid; the stage's wall time is read off its MLflow runs (first
start to last end). The plain loop calls aemnist.training.train_fold for the same folds with
all cores' torch threads.

    python bench/grid.py [--epochs 1] [--workers 0] [--task-runner threads|dask]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
from common import REPO_ROOT, machine, mirror, mnist, result, scratch
from mlflow import MlflowClient

from aemnist.config import load_config
from aemnist.data import make_folds
from aemnist.layout import Layout
from aemnist.runtime import cpu_count
from aemnist.schemas import read_frame
from aemnist.tracking import EXPERIMENT, embedded_tracking_uri
from aemnist.training import train_fold

CONFIG = """
profile = "quick"
[data]
train_limit = 0
test_limit = 2000
[grid]
learning_rates = [1e-2, 5e-3]
weight_decays = [5e-6]
folds = 3
epochs = {epochs}
size = 6
[sweep]
sizes = [2]
epochs = 1
score_last = 1
[final]
epochs = 1
[corruption]
noise_levels = [0.0, 0.5]
occlusion_levels = [0.0, 0.5]
n_images = 200
[embedding]
n_images = 200
perplexity = 20.0
knn = 5
[runtime]
workers = {workers}
"""


def flow_grid(epochs: int, workers: int, task_runner: str) -> tuple[float, float, int]:
    """Run the study; returns (stage seconds, whole-run seconds, images trained)."""
    root = scratch()
    config = root / "grid.toml"
    config.write_text(CONFIG.format(epochs=epochs, workers=workers))
    workdir = root / "work"
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--workdir",
         str(workdir), "--mnist-mirror", str(mirror()), "--task-runner", task_runner],
        cwd=REPO_ROOT, check=True, capture_output=True,
    )  # fmt: skip
    whole = time.monotonic() - started
    client = MlflowClient(embedded_tracking_uri(workdir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id], "tags.stage = 'grid'", max_results=1000
    )  # fmt: skip
    stage = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    folds = read_frame(Layout(workdir).folds, "folds")
    images = sum(int((folds["fold"] != int(r.data.params["fold"])).sum()) for r in runs) * epochs
    return stage, whole, images


def plain_grid(epochs: int) -> tuple[float, int]:
    """The same fold trainings, one after another, all cores' threads."""
    config = load_config(None, None, None)
    train = mnist(train=True)

    folds = make_folds(train.idx, train.labels, 3, config.seed)
    torch.set_num_threads(cpu_count())
    started = time.perf_counter()
    images = 0
    for lr in (1e-2, 5e-3):
        for fold in range(3):
            train_fold(
                train, folds, fold, lr=lr, weight_decay=5e-6, size=6, epochs=epochs,
                batch_size=256, seed=config.seed,
            )  # fmt: skip
            images += int((folds["fold"] != fold).sum()) * epochs
    return time.perf_counter() - started, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="task slots (0: one per core)")
    parser.add_argument("--task-runner", choices=("threads", "dask"), default="threads")
    args = parser.parse_args()
    print(f"machine: {machine()}; grid 2 lr x 1 wd x 3 folds, {args.epochs} epoch(s), size 6")
    plain_seconds, plain_images = plain_grid(args.epochs)
    plain = plain_images / plain_seconds
    print(f"plain loop, one fold after another: {plain_seconds:.1f} s, {plain:.0f} images/s")
    stage, whole, images = flow_grid(args.epochs, args.workers, args.task_runner)
    assert images == plain_images, (images, plain_images)
    rate = images / stage
    print(
        f"grid stage in the Prefect flow ({args.task_runner}): {stage:.1f} s, {rate:.0f} "
        f"images/s (whole study run {whole:.0f} s)"
    )
    print(f"ratio: {rate / plain:.2f}")
    result("grid", rate, "images/s", plain)


if __name__ == "__main__":
    main()
