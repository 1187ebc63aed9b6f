"""Aggregate training throughput of a grid stage run through the real Prefect flow, against
the same fold trainings run one after another in a plain loop in one process.

The flow run is `aemnist run` (its temporary Prefect server, the thread-pool task runner with
the workers and torch threads per task that follow from the cores, MLflow nested runs) on the
training set (``--train-limit`` images, 0: all) with a small grid; the stage's wall time is
read off its MLflow runs (first start to last end). The plain loop calls
aemnist.training.train_fold for the same folds with all cores' torch threads. Both compute on
``--device`` (pinned: the config's default, auto, would pick a GPU where there is one), and
take turns ``--rounds`` times (the order reversed every other round); each figure is the
median with its [min, max], the ratio taken within each round.

    python bench/grid.py [--device cpu] [--rounds 3] [--epochs 1] [--train-limit 0]
                         [--workers 0] [--task-runner threads|dask]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from common import REPO_ROOT, announce, bench_dir, mirror, result, scratch, spread
from mlflow import MlflowClient

from aemnist.config import load_config
from aemnist.data import download_mnist, load_images, make_folds
from aemnist.layout import Layout
from aemnist.runtime import cpu_count
from aemnist.schemas import read_frame
from aemnist.tracking import EXPERIMENT, embedded_tracking_uri
from aemnist.training import train_fold

CONFIG = """
profile = "quick"
[data]
train_limit = {train_limit}
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
validation_images = 1000
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
device = "{device}"
"""


def flow_grid(
    epochs: int, workers: int, task_runner: str, device: str, train_limit: int
) -> tuple[float, float, int]:
    """Run the study; returns (stage seconds, whole-run seconds, images trained)."""
    root = scratch()
    config = root / "grid.toml"
    config.write_text(
        CONFIG.format(epochs=epochs, workers=workers, device=device, train_limit=train_limit)
    )
    workdir = root / "work"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--workdir",
         str(workdir), "--mnist-mirror", str(mirror()), "--task-runner", task_runner],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"bench/grid.py: the study run failed ({done.returncode}):\n{done.stderr[-3000:]}")
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


def plain_grid(epochs: int, device: str, train_limit: int) -> tuple[float, int]:
    """The same fold trainings, one after another, all cores' threads."""
    config = load_config(None, None, None)
    tables, _ = download_mnist(bench_dir() / "data", mirror(), force=False)
    train = load_images(tables["train"].path, train_limit)

    folds = make_folds(train.idx, train.labels, 3, config.seed)
    torch.set_num_threads(cpu_count())
    started = time.perf_counter()
    images = 0
    for lr in (1e-2, 5e-3):
        for fold in range(3):
            train_fold(
                train, folds, fold, lr=lr, weight_decay=5e-6, size=6, epochs=epochs,
                batch_size=256, seed=config.seed, device=device,
            )  # fmt: skip
            images += int((folds["fold"] != fold).sum()) * epochs
    return time.perf_counter() - started, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--workers", type=int, default=0, help="task slots (0: one per core)")
    parser.add_argument("--task-runner", choices=("threads", "dask"), default="threads")
    args = parser.parse_args()
    announce(args.device)
    print(f"grid 2 lr x 1 wd x 3 folds, {args.epochs} epoch(s), size 6, training images "
          f"{args.train_limit or 'all'}; flow's task runner {args.task_runner}")  # fmt: skip
    plain: list[float] = []
    flow: list[float] = []
    for round_ in range(args.rounds):
        order = ("plain", "flow") if round_ % 2 == 0 else ("flow", "plain")
        for which in order:
            if which == "plain":
                seconds, plain_images = plain_grid(args.epochs, args.device, args.train_limit)
                plain.append(plain_images / seconds)
                print(f"round {round_ + 1}: plain loop, one fold after another: {seconds:.1f} s, "
                      f"{plain[-1]:.0f} images/s", flush=True)  # fmt: skip
            else:
                stage, whole, images = flow_grid(
                    args.epochs, args.workers, args.task_runner, args.device, args.train_limit
                )
                flow.append(images / stage)
                print(f"round {round_ + 1}: grid stage in the Prefect flow: {stage:.1f} s, "
                      f"{flow[-1]:.0f} images/s (study {whole:.0f} s)", flush=True)  # fmt: skip
        assert images == plain_images, (images, plain_images)
    ratios = [f / p for f, p in zip(flow, plain, strict=True)]
    print(f"images/s, median [min, max] over {args.rounds} rounds: plain loop {spread(plain)}, "
          f"grid stage in the flow {spread(flow)}; ratio {spread(ratios, 2)}")  # fmt: skip
    result("grid", statistics.median(flow), "images/s", statistics.median(plain))


if __name__ == "__main__":
    main()
