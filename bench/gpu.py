"""The GPU path: one training task's images/s on the device against the same task on the
same machine's CPU, several tasks sharing the device, and the whole paper profile's compute.

Runs with the library alone (no Prefect or MLflow: a bare GPU machine has neither), calling
the functions the study's tasks wrap with the inputs the flow gives them, so the tables it
writes are the ones `aemnist run --profile paper --device cuda` computes on that GPU.

    python bench/gpu.py [--device cuda] [--rounds 3] [--epochs 2] [--concurrency 1,2,4,8]
                        [--paper WORKDIR [--resume] [--profile paper]] [--archive FILE.tar.gz]

Like with like: every run of a task trains the same fold for the same ``--epochs`` on every
device; epoch 1 is the warm-up (graph capture, kernel choice, allocator) on both sides and
the later epochs are timed (each with its validation pass, as in the study). The devices
take turns, ``--rounds`` times (the order reversed every other round), and each figure is
the median with its [min, max] over the rounds; a ratio is taken within a round.

1. throughput: a grid-fold task (size 6, 40000 training and 20000 validation images, batch
   256) on the CPU (every core: the baseline) and on the device as shipped (CUDA graph,
   contiguous layout), with channels-last, and without the graph. Printed beside each:
   whether every round gave bit-identical losses, and how far the losses are from the CPU's
   (different kernels round differently).
2. concurrency: N such tasks at once in N threads (each on its own CUDA stream): aggregate
   images/s, start-up included (the same for every N), for each N, in rounds.
3. --paper WORKDIR: the profile end to end (folds, grid, Table 1, sweep, Table 2, final
   model, corruption, embedding) with the median-best concurrency of step 2; wall time per
   stage, and image-steps per stage counted from the profile's config. Beside it, what the
   CPU's measured steady rate projects for the same image-steps (a projection, not a run).
   The work dir then renders its report with `aemnist report --workdir`. A work dir with an
   earlier run's tables is refused unless --resume: then a task whose table exists is kept
   (the saved config must match), and once a stage computes anything every later stage is
   computed again.
4. --verify N: train the first N grid cells again, with other tasks beside them than in the
   paper run, and check that their tables are identical to the paper run's.

`--device cpu` rehearses all of it on the CPU (the "device" is then the CPU too); with
`--fold-train 3000 --profile smoke` it takes a minute or two on two cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tarfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from common import announce, mirror, mnist, result, spread

from aemnist import plan
from aemnist.config import StudyConfig, load_config, read_saved_config, run_overrides, save_config
from aemnist.corruption import corruption_curves, examples_frame, levels_of
from aemnist.data import ImageSet, download_mnist, load_images, make_folds
from aemnist.embedding import embed
from aemnist.layout import Layout
from aemnist.model import build_autoencoder, load_checkpoint, save_checkpoint
from aemnist.runtime import cpu_count, prepare_device, set_torch_threads
from aemnist.schemas import metrics_frame, read_frame, write_table
from aemnist.summaries import grid_summary, sweep_summary
from aemnist.training import DEFAULT_OPTIONS, TrainingOptions, evaluate, fit, train_fold, train_size

SIZE, BATCH, LR, WD, SEED = 6, 256, 0.01, 5e-6, 0
CPU = "cpu (every core, baseline)"


def fold_task(
    images: torch.Tensor,
    n_train: int,
    device: str,
    epochs: int,
    seed: int = SEED,
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> tuple[list[float], list[float]]:
    """A grid-fold-sized fit (``n_train`` training images, half as many for validation);
    returns each epoch's training loss and its wall seconds (its validation pass included)."""
    marks = [time.perf_counter()]
    history = fit(
        build_autoencoder(SIZE, seed),
        images[:n_train],
        images[n_train : n_train + n_train // 2],
        lr=LR,
        weight_decay=WD,
        epochs=epochs,
        batch_size=BATCH,
        seed=seed,
        device=device,
        on_epoch=lambda _: marks.append(time.perf_counter()),
        options=options,
    )
    return [h.train_loss for h in history], [b - a for a, b in zip(marks, marks[1:], strict=False)]


def variants(device: str) -> dict[str, tuple[str, TrainingOptions]]:
    """The runs of each round: name -> (device, options). The CPU's is the baseline."""
    if device == "cpu":  # a rehearsal: the "device" is the CPU too
        return {CPU: ("cpu", DEFAULT_OPTIONS), "cpu (rehearsal device)": ("cpu", DEFAULT_OPTIONS)}

    def cuda(graphs: bool, channels_last: bool) -> tuple[str, TrainingOptions]:
        options = dataclasses.replace(
            DEFAULT_OPTIONS, cuda_graphs=graphs, cuda_channels_last=channels_last
        )
        return "cuda", options

    return {
        CPU: ("cpu", DEFAULT_OPTIONS),
        "cuda, graph, contiguous (shipped)": cuda(True, False),
        "cuda, graph, channels-last": cuda(True, True),
        "cuda, eager, contiguous": cuda(False, False),
    }


def throughput(
    images: torch.Tensor,
    n_train: int,
    device: str,
    rounds: int,
    epochs: int,
    baseline_only: bool = False,
) -> tuple[dict[str, list[float]], TrainingOptions]:
    """Each run's steady images/s per round, the devices taking turns; and the options the
    rest runs with (the shipped ones, or without the graph if its capture failed here)."""
    runs = variants(device)
    if baseline_only:
        runs = {CPU: runs[CPU]}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, list[list[float]]] = {name: [] for name in runs}
    failed: set[str] = set()
    for round_ in range(rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            if name in failed:
                continue
            where, options = runs[name]
            # The CPU baseline gets every core; a CUDA task's host thread needs one.
            torch.set_num_threads(cpu_count())
            try:
                loss, seconds = fold_task(images, n_train, where, epochs, options=options)
            except Exception:  # report and go on: the other runs still measure
                traceback.print_exc()
                print(f"{name}: FAILED")
                failed.add(name)
                continue
            rates[name].append(n_train * (epochs - 1) / sum(seconds[1:]))
            losses[name].append(loss)
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items() if k not in failed),
            flush=True,
        )
    cpu = rates[CPU]
    timed = "epoch 2" if epochs == 2 else f"epochs 2..{epochs}"
    print(f"\nsteady {timed} of a fold task ({n_train} training images), images/s, "
          f"median [min, max] over {rounds} rounds:")  # fmt: skip
    for name, values in rates.items():
        if name in failed or not values:
            continue
        ratios = [v / c for v, c in zip(values, cpu, strict=False)]
        versus = "" if name == CPU else f"  x cpu {spread(ratios, 2)} (within each round)"
        same = all(run == losses[name][0] for run in losses[name])
        worst = max(abs(a - b) / b for a, b in zip(losses[name][0], losses[CPU][0], strict=True))
        print(
            f"  {name:36s} {spread(values)}{versus}; losses "
            f"{' '.join(f'{x:.6f}' for x in losses[name][0])}; every round identical: {same}; "
            f"largest relative difference from the cpu's: {worst:.1e}"
        )
    shipped = "cuda, graph, contiguous (shipped)"
    graphs = device == "cuda" and shipped not in failed
    options = dataclasses.replace(DEFAULT_OPTIONS, cuda_graphs=graphs) if device == "cuda" else (
        DEFAULT_OPTIONS
    )  # fmt: skip
    return {k: v for k, v in rates.items() if k not in failed}, options


def concurrency(
    images: torch.Tensor,
    n_train: int,
    device: str,
    counts: list[int],
    rounds: int,
    epochs: int,
    options: TrainingOptions,
) -> dict[int, list[float]]:
    """Aggregate images/s of N fold tasks at once, start-up included, N taking turns."""
    rates: dict[int, list[float]] = {n: [] for n in counts}
    failed: set[int] = set()
    set_torch_threads(1 if device == "cpu" else cpu_count())
    for _ in range(rounds):
        for n in counts:
            if n in failed:
                continue
            started = time.perf_counter()
            try:
                with ThreadPoolExecutor(n) as pool:
                    list(
                        pool.map(
                            lambda i: fold_task(images, n_train, device, epochs, i, options),
                            range(n),
                        )
                    )
            except Exception:
                traceback.print_exc()
                print(f"{n} tasks at once: FAILED")
                failed.add(n)
                continue
            rates[n].append(n * epochs * n_train / (time.perf_counter() - started))
    print(f"\nfold tasks at once ({epochs} epochs each, start-up included), images/s together, "
          f"median [min, max] over {rounds} rounds:")  # fmt: skip
    for n, values in rates.items():
        if values:
            print(f"  {n:3d} at once: {spread(values)}", flush=True)
    return {n: v for n, v in rates.items() if v}


# --- the paper profile, through the library calls the study's tasks make ----------------------


def image_steps(config: StudyConfig, train: ImageSet, folds: pd.DataFrame) -> dict[str, list[int]]:
    """Training image-steps of each task of each training stage, from the run's own config
    and folds: a grid cell trains on the other folds' images, a sweep or final task on the
    training set (less the held-out validation images when the sweep selects on them)."""
    c = config
    n = len(train.idx) - (c.sweep.validation_images if c.sweep.selection == "validation" else 0)
    return {
        "grid": [
            int((folds["fold"] != fold).sum()) * c.grid.epochs
            for _, _, fold, _ in plan.grid_cells(c)
        ],
        "sweep": [n * c.sweep.epochs] * len(plan.sweep_cells(c)),
        "final": [n * c.final.epochs] * c.sweep.repeats,
    }


def final_files(layout: Layout, size: int, repeat: int) -> tuple[Path, Path, Path]:
    """The final task's model, history and metrics, in a folder named by the model's size: a
    run at another size (the sweep's best against a fixed ``final.size``) never passes for
    this one. The report's fixed paths get copies once the stage is done."""
    folder = layout.root / "final" / f"size={size}"
    tail = f"_repeat={repeat}" if repeat else ""
    return (
        folder / f"model{tail}.pt",
        folder / f"history{tail}.parquet",
        folder / f"metrics{tail}.parquet",
    )


def comparable(config: StudyConfig) -> dict[str, Any]:
    """What a resumed run must share with the run whose tables it keeps: all but where and
    how parallel it computes (the recipe trains grid and sweep on a GPU, the rest on a CPU)."""
    return {k: v for k, v in config.to_dict().items() if k != "runtime"}


def check_workdir(layout: Layout, config: StudyConfig, resume: bool) -> None:
    """A run writes into an empty work dir; --resume keeps an earlier run's tables only when
    its saved config is this one's (device and concurrency aside)."""
    earlier = [p for p in layout.root.glob("*") if p.name != "data"] if layout.root.exists() else []
    if not earlier:
        return
    if not resume:
        raise SystemExit(
            f"bench/gpu.py: {layout.root} holds an earlier run ({len(earlier)} entries such as "
            f"{earlier[0].name}); pass --resume to keep its tables, or name an empty work dir"
        )
    if not layout.config.exists():
        raise SystemExit(
            f"bench/gpu.py: {layout.root} has tables but no {layout.config.name}; --resume "
            "cannot tell which config made them: name an empty work dir"
        )
    saved, ours = comparable(read_saved_config(layout.config)), comparable(config)
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if differ:
        raise SystemExit(
            f"bench/gpu.py: --resume: {layout.config} differs from this run's config in "
            f"{', '.join(differ)}; run the same profile, or name an empty work dir"
        )


class PaperRun:
    """The profile's stages in the order the flow runs them, with the workers and torch
    threads the flow resolves (aemnist.plan.resolve_study), the work dir archived after each
    stage. With ``resume`` a task whose table exists is kept until a stage computes anything;
    every later stage is then computed in full (its inputs may have changed)."""

    def __init__(
        self,
        workdir: Path,
        config: StudyConfig,
        resume: bool = False,
        archive: Path | None = None,
        options: TrainingOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.study = plan.resolve_study(config, workdir, options=options)
        self.config = self.study.config
        self.layout = self.study.layout
        self.options = options
        self.resume = resume
        self.archive = archive
        self.walls: dict[str, float] = {}
        # Per library call: (start, end) on the perf_counter clock, for bench/overhead.py.
        self.calls: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.computed = False  # a stage computed something: later ones keep nothing
        self.planned: dict[str, list[int]] = {}  # each training task's image-steps
        self.steps: dict[str, int] = {}  # those of the tasks computed (not kept), per stage

    def keep(self, *paths: Path) -> bool:
        return self.resume and not self.computed and all(p.exists() for p in paths)

    def stage(
        self, name: str, tasks: list[Callable[[], object] | None], threads: int | None = None
    ) -> None:
        """Run a stage's tasks (None: kept from the work dir), each with its torch threads."""
        started = time.perf_counter()
        todo = [t for t in tasks if t is not None]
        if name in self.planned:
            computed = zip(tasks, self.planned[name], strict=True)
            self.steps[name] = sum(steps for task, steps in computed if task is not None)
        done = [0]

        def run(task: Callable[[], object]) -> None:
            set_torch_threads(threads or self.study.threads)
            begun = time.perf_counter()
            task()
            with self.lock:
                self.calls.append((begun, time.perf_counter()))
                done[0] += 1
                print(f"  {name} {done[0]}/{len(todo)} at {time.perf_counter() - started:.0f} s")

        with ThreadPoolExecutor(self.study.workers) as pool:
            list(pool.map(run, todo))
        self.computed = self.computed or bool(todo)
        self.walls[name] = time.perf_counter() - started
        kept = f", {len(tasks) - len(todo)} kept from the work dir (--resume)" if len(todo) < len(
            tasks
        ) else ""  # fmt: skip
        print(f"{name}: {len(todo)} tasks in {self.walls[name]:.1f} s{kept}", flush=True)
        self.save()

    def save(self) -> None:
        if self.archive is None:
            return
        with tarfile.open(self.archive, "w:gz") as tar:
            for path in sorted(self.layout.root.rglob("*")):
                if path.is_file() and "data" not in path.relative_to(self.layout.root).parts:
                    tar.add(path, path.relative_to(self.layout.root))

    def timed(self, task: Callable[[], object]) -> None:
        """A library call outside the fan-outs (folds, summaries), timed as compute too."""
        begun = time.perf_counter()
        task()
        self.calls.append((begun, time.perf_counter()))

    def run(self) -> float:
        c, layout, device = self.config, self.layout, self.config.runtime.device
        started = time.perf_counter()
        layout.root.mkdir(parents=True, exist_ok=True)
        save_config(c, layout.config)
        loaded: dict[str, ImageSet] = {}

        def load() -> None:
            tables, _ = download_mnist(layout.data_dir, mirror(), force=False)
            loaded["train"] = load_images(tables["train"].path, c.data.train_limit)
            loaded["test"] = load_images(tables["test"].path, c.data.test_limit)
            if not self.keep(layout.folds):
                write_table(
                    make_folds(loaded["train"].idx, loaded["train"].labels, c.grid.folds, c.seed),
                    layout.folds,
                    "folds",
                )
                self.computed = True

        self.timed(load)
        train, test = loaded["train"], loaded["test"]
        folds = read_frame(layout.folds, "folds")
        self.planned = image_steps(c, train, folds)
        planned = ", ".join(f"{k} {sum(v):,}" for k, v in self.planned.items())
        print(f"training image-steps from the config: {planned}", flush=True)

        def grid_task(lr: float, wd: float, fold: int, repeat: int) -> Callable[[], object] | None:
            path = layout.grid_history(lr, wd, fold, repeat)
            if self.keep(path):
                return None
            return lambda: write_table(
                train_fold(
                    train, folds, fold, lr=lr, weight_decay=wd, size=c.grid.size,
                    epochs=c.grid.epochs, batch_size=c.training.batch_size, seed=c.seed,
                    repeat=repeat, output_bias_at_mean=c.training.output_bias_at_mean,
                    eval_batch_size=c.training.eval_batch_size, device=device,
                    options=self.options,
                ),
                path,
                "grid_history",
            )  # fmt: skip

        cells = plan.grid_cells(c)
        self.stage("grid", [grid_task(*cell) for cell in cells])
        best: dict[str, Any] = {}

        def table1() -> None:
            frames = [
                read_frame(layout.grid_history(*cell), "grid_history").assign(repeat=cell[3])
                for cell in cells
            ]
            table = grid_summary(pd.concat(frames, ignore_index=True))
            write_table(table, layout.grid_summary, "grid_summary")
            best["lr"], best["wd"] = float(table.iloc[0].lr), float(table.iloc[0].weight_decay)

        self.timed(table1)
        lr, wd = best["lr"], best["wd"]
        print(f"Table 1: best lr {lr:g}, weight decay {wd:g}")

        def size_task(size: int, stage: str, repeat: int) -> Callable[[], object] | None:
            final = stage == "final"
            files = final_files(layout, size, repeat) if final else None
            path = files[1] if files else layout.sweep_history(size, repeat)
            if self.keep(*(files or (path,))):
                return None

            def task() -> None:
                model, history = train_size(
                    train, test, size=size, lr=lr, weight_decay=wd,
                    epochs=c.final.epochs if final else c.sweep.epochs,
                    plateau_patience=c.sweep.plateau_patience,
                    selection=c.sweep.selection, validation_images=c.sweep.validation_images,
                    batch_size=c.training.batch_size, seed=c.seed, stage=stage, repeat=repeat,
                    output_bias_at_mean=c.training.output_bias_at_mean,
                    eval_batch_size=c.training.eval_batch_size, device=device,
                    options=self.options,
                )  # fmt: skip
                if files:
                    finish_final(files, model, test, c, lr, wd, size, device)
                write_table(history, path, "sweep_history")

            return task

        sweep = plan.sweep_cells(c)
        self.stage("sweep", [size_task(size, "sweep", repeat) for size, repeat in sweep])

        def table2() -> None:
            frames = [read_frame(layout.sweep_history(s, r), "sweep_history") for s, r in sweep]
            table = sweep_summary(pd.concat(frames, ignore_index=True), c.sweep.score_last)
            write_table(table, layout.sweep_summary, "sweep_summary")
            best["size"] = int(table.iloc[0]["size"])

        self.timed(table2)
        size = plan.final_size(c, best["size"])
        print(f"Table 2: best size {best['size']}; final model at size {size}")
        repeats = range(c.sweep.repeats)
        self.stage(
            "final",
            [size_task(size, "final", repeat) for repeat in repeats],
            threads=self.study.final_threads,
        )
        # The report reads the final model's tables at fixed paths: this size's, copied.
        for repeat in repeats:
            fixed = (
                layout.final_model_of(repeat),
                layout.final_history_of(repeat),
                layout.final_metrics_of(repeat),
            )
            for source, target in zip(final_files(layout, size, repeat), fixed, strict=True):
                shutil.copyfile(source, target)
        model = final_files(layout, size, 0)[0]
        self.stage(
            "evaluation",
            [
                None if self.keep(layout.corruption, layout.corruption_examples) else (
                    lambda: evaluations(model, layout, test, c, device, "corruption")
                ),
                None if self.keep(layout.embedding, layout.embedding_metrics) else (
                    lambda: evaluations(model, layout, test, c, device, "embedding")
                ),
            ],
        )  # fmt: skip
        return time.perf_counter() - started


def finish_final(
    files: tuple[Path, Path, Path], model: Any, test: ImageSet, c: StudyConfig,
    lr: float, wd: float, size: int, device: str,
) -> None:  # fmt: skip
    """What the final task stores besides its history: test MSE, metrics and checkpoint."""
    test_mse = evaluate(model, test.images, c.training.eval_batch_size, device)
    metrics = {"test_mse": test_mse, "size": size, "lr": lr, "weight_decay": wd}
    write_table(metrics_frame(metrics), files[2], "metrics")
    save_checkpoint(model, files[0])
    print(f"final model (size {size}): test MSE {test_mse:.6f}")


def evaluations(
    model: Path, layout: Layout, test: ImageSet, c: StudyConfig, device: str, kind: str
) -> None:
    net = load_checkpoint(model)
    if kind == "corruption":
        images = test.images[: c.corruption.n_images] if c.corruption.n_images else test.images
        levels, clip = levels_of(c.corruption), c.corruption.clip
        table = corruption_curves(
            net, images, levels, c.seed, c.training.eval_batch_size, device, clip
        )
        examples = examples_frame(net, images[0], levels, c.seed, clip)
        write_table(examples, layout.corruption_examples, "corruption_examples")
        write_table(table, layout.corruption, "corruption")
    else:
        e = c.embedding
        table, metrics = embed(
            net, test, e.n_images, e.perplexity, e.knn, e.seed_for(c.seed), device
        )
        write_table(metrics_frame(metrics), layout.embedding_metrics, "metrics")
        write_table(table, layout.embedding, "embedding")


def verify(layout: Layout, c: StudyConfig, n: int, options: TrainingOptions) -> None:
    """Same seed and device, same tables: re-train ``n`` grid cells two at a time and compare
    them with the paper run's."""
    train = load_images(layout.train_table, c.data.train_limit)
    folds = read_frame(layout.folds, "folds")
    cells = plan.grid_cells(c)[:n]

    def again(cell: tuple[float, float, int, int]) -> bool:
        lr, wd, fold, repeat = cell
        history = train_fold(
            train, folds, fold, lr=lr, weight_decay=wd, size=c.grid.size, epochs=c.grid.epochs,
            batch_size=c.training.batch_size, seed=c.seed, repeat=repeat,
            output_bias_at_mean=c.training.output_bias_at_mean,
            eval_batch_size=c.training.eval_batch_size, device=c.runtime.device,
            options=options,
        )  # fmt: skip
        stored = read_frame(layout.grid_history(lr, wd, fold, repeat), "grid_history")
        return history.equals(stored.astype(history.dtypes.to_dict()))

    with ThreadPoolExecutor(2) as pool:
        same = list(pool.map(again, cells))
    print(f"verify: {sum(same)} of {len(same)} grid tables identical to the paper run's")


def report_paper(run: PaperRun, wall: float, cpu_rates: list[float] | None) -> None:
    """Stage walls and image-steps; beside them, the CPU's projection for the same steps."""
    device = run.config.runtime.device
    print(f"\n{run.config.profile} profile on {device}, {run.study.workers} tasks at once: "
          f"{wall:.1f} s ({wall / 60:.1f} min) in all")  # fmt: skip
    for name, seconds in run.walls.items():
        steps = run.steps.get(name)
        rate = f", {steps:,} training image-steps, {steps / seconds:.0f}/s" if steps else ""
        print(f"  {name}: {seconds:.1f} s{rate}")
    steps = sum(run.steps.values())
    training = sum(run.walls[s] for s, n in run.steps.items() if n)
    print(f"  training stages: {steps:,} image-steps computed in {training:.1f} s")
    if not cpu_rates or not steps:
        return
    # A projection, not a run: the steady rate leaves out each task's first epoch and start-up,
    # which the measured stages include; so it flatters the CPU, never the device.
    projected = [steps / r / 60 for r in cpu_rates]
    print(f"  the CPU's projection for the same image-steps at its steady fold-task rate: "
          f"{spread(projected, 1)} min (median [min, max] over its rounds)")  # fmt: skip
    result(
        f"{device}-training-stages-{run.config.profile}",
        training / 60,
        "min",
        statistics.median(projected),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the device under test (cpu: a rehearsal on the CPU)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per figure")
    parser.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="epochs per timed task: the first is warm-up, the rest are timed",
    )
    parser.add_argument(
        "--fold-train",
        type=int,
        default=40000,
        help="training images of the timed fold task (validation: half)",
    )
    parser.add_argument("--concurrency", default="1,2,4,8", help="task counts to time at once")
    parser.add_argument(
        "--skip-measure",
        action="store_true",
        help="measure only the CPU baseline (for --paper's projection)",
    )
    parser.add_argument("--paper", type=Path, metavar="WORKDIR", help="run a whole profile")
    parser.add_argument("--profile", default="paper", help="of --paper (smoke: a rehearsal)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the tables of an earlier --paper run in WORKDIR"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="--paper's tasks at once on the device (default: the best measured)",
    )
    parser.add_argument("--archive", type=Path, help="tar.gz of the paper work dir's tables")
    parser.add_argument("--verify", type=int, default=0, help="grid cells to train again")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: epoch 1 is the warm-up, never timed")
    announce(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu.py: torch sees no GPU here (torch.cuda.is_available() is False); "
            "pass --device cpu to rehearse on the CPU"
        )
    prepare_device(args.device)
    config = None
    if args.paper:  # checked before minutes of measuring
        config = load_config(args.profile, overrides=run_overrides(device=args.device))
        check_workdir(Layout(args.paper.resolve()), config, args.resume)
    images = mnist(train=True).images
    if args.fold_train * 3 // 2 > images.shape[0]:
        parser.error(f"--fold-train: at most {images.shape[0] * 2 // 3} (validation is half)")
    print(f"fold task: {args.fold_train} training + {args.fold_train // 2} validation images, "
          f"size {SIZE}, batch {BATCH}, {args.epochs} epochs (epoch 1 warm-up); "
          f"CPU baseline on {cpu_count()} threads")  # fmt: skip
    options, best_n = DEFAULT_OPTIONS, args.workers
    if args.skip_measure:
        rates, _ = throughput(
            images, args.fold_train, args.device, args.rounds, args.epochs, baseline_only=True
        )
        cpu_rates = rates[CPU]
    else:
        rates, options = throughput(images, args.fold_train, args.device, args.rounds, args.epochs)
        cpu_rates = rates[CPU]
        counts = [int(n) for n in args.concurrency.split(",")]
        together = concurrency(
            images, args.fold_train, args.device, counts, args.rounds, args.epochs, options
        )
        if together and best_n is None:
            best_n = max(together, key=lambda n: statistics.median(together[n]))
        device_runs = [k for k in rates if k != CPU]
        if not args.paper and device_runs:  # the paper run's line is the last word otherwise
            result(
                f"{args.device}-fold-task-steady",
                statistics.median(rates[device_runs[0]]),
                "images/s",
                statistics.median(cpu_rates),
            )
    if args.paper and config is not None:
        if args.device == "cuda":
            config = config.with_overrides({"runtime": {"gpu_concurrency": best_n or 8}})
        run = PaperRun(args.paper, config, args.resume, args.archive, options)
        print(
            f"{args.profile} profile on {args.device}, {run.study.workers} tasks at once, "
            f"{run.study.threads} torch threads each, work dir {args.paper}",
            flush=True,
        )
        wall = run.run()
        if args.verify:
            verify(run.layout, run.config, args.verify, options)
        report_paper(run, wall, cpu_rates)
    # The machine the GPU session lends has neither; this script must not need them.
    leaked = sorted(m for m in ("prefect", "mlflow") if m in sys.modules)
    print(f"modules imported from Prefect or MLflow: {', '.join(leaked) or 'none'}")


if __name__ == "__main__":
    main()
