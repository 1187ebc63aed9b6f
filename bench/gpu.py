"""The GPU path: one training task's images/s on CUDA, several tasks sharing the GPU, and
the whole paper profile's compute, against CPU training on the same machine.

Runs with the library alone (no Prefect or MLflow: a bare GPU machine has neither), calling
the functions the study's tasks wrap with the inputs the flow gives them, so the tables it
writes are the ones `aemnist run --profile paper --device cuda` computes on that GPU.

    python bench/gpu.py [--concurrency 1,2,4,8] [--paper WORKDIR] [--archive FILE.tar.gz]

1. throughput: a grid-fold task (size 6, 40000 training and 20000 validation images,
   batch 256) for 3 epochs on CUDA as shipped (CUDA graph, contiguous layout), with
   channels-last, and without the graph; the steady-state epoch is timed. The same task on the
   CPU (all cores, 1 epoch) is the baseline. Printed beside each: whether a second run gives
   bit-identical losses, how far the losses are from the eager run's, and how far the first
   epoch's loss is from the CPU's (different kernels round differently).
2. concurrency: N such tasks at once in N threads (each on its own CUDA stream): aggregate
   images/s for each N.
3. --paper WORKDIR: the paper profile end to end (folds, 108 grid folds, Table 1, ten sizes,
   Table 2, final model, corruption, embedding) with the best concurrency of step 2; wall
   time per stage. The work dir then renders its report with `aemnist report --workdir`.
   Tasks whose table exists are skipped, so an interrupted run continues.
4. --verify N: train the first N grid cells again, with other tasks beside them than in the
   paper run, and check that their tables are identical to the paper run's.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from common import machine, mirror, mnist, result

from aemnist import plan
from aemnist.config import StudyConfig, load_config, run_overrides, save_config
from aemnist.corruption import corruption_curves, examples_frame, levels_of
from aemnist.data import ImageSet, download_mnist, load_images, make_folds
from aemnist.embedding import embed
from aemnist.layout import Layout
from aemnist.model import build_autoencoder, save_checkpoint
from aemnist.runtime import cpu_count, prepare_device, threads_per_task
from aemnist.schemas import metrics_frame, read_frame, write_table
from aemnist.summaries import grid_summary, sweep_summary
from aemnist.training import DEFAULT_OPTIONS, TrainingOptions, evaluate, fit, train_fold, train_size

FOLD_TRAIN, FOLD_VAL, SIZE, BATCH, LR, WD, SEED = 40000, 20000, 6, 256, 0.01, 5e-6, 0


def fold_task(
    images: torch.Tensor,
    device: str,
    epochs: int,
    seed: int = SEED,
    options: TrainingOptions = DEFAULT_OPTIONS,
) -> tuple[list[float], list[float]]:
    """A grid-fold-sized fit; returns each epoch's training loss and its wall seconds."""
    marks = [time.perf_counter()]
    history = fit(
        build_autoencoder(SIZE, seed),
        images[:FOLD_TRAIN],
        images[FOLD_TRAIN : FOLD_TRAIN + FOLD_VAL],
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


def cuda_variant(graphs: bool, channels_last: bool) -> TrainingOptions:
    """The shipped options with the CUDA graph and CUDA channels-last as given."""
    return dataclasses.replace(
        DEFAULT_OPTIONS, cuda_graphs=graphs, cuda_channels_last=channels_last
    )


def cpu_baseline(images: torch.Tensor) -> tuple[float, float]:
    """The same task's images/s on this machine's CPU (every core), and its epoch-1 loss."""
    torch.set_num_threads(cpu_count())
    losses, seconds = fold_task(images, "cpu", 1)
    rate = FOLD_TRAIN / seconds[0]
    print(f"cpu ({cpu_count()} threads): {rate:.0f} images/s, epoch-1 loss {losses[0]:.6f}")
    return rate, losses[0]


def throughput(images: torch.Tensor, cpu_loss: float) -> tuple[dict[str, Any], TrainingOptions]:
    """Each CUDA variant's images/s and losses, and the options the rest runs with."""
    out: dict[str, Any] = {"cpu_loss": cpu_loss, "variants": {}}
    for name, graphs, cl in (
        ("cuda, graph, contiguous (shipped)", True, False),
        ("cuda, graph, channels-last", True, True),
        ("cuda, eager, contiguous", False, False),
    ):
        options = cuda_variant(graphs, cl)
        try:
            losses, seconds = fold_task(images, "cuda", 3, options=options)
            again, _ = fold_task(images, "cuda", 3, options=options)
        except Exception:  # report and go on: the other variants still measure
            traceback.print_exc()
            print(f"{name}: FAILED")
            continue
        rate = FOLD_TRAIN / min(seconds[1:])
        out["variants"][name] = {"rate": rate, "losses": losses, "repeatable": losses == again}
        print(
            f"{name}: {rate:.0f} images/s steady (epoch 1 incl. start: "
            f"{FOLD_TRAIN / seconds[0]:.0f}), losses {' '.join(f'{x:.6f}' for x in losses)}, "
            f"second run identical: {losses == again}, epoch 1 vs cpu "
            f"{abs(losses[0] - out['cpu_loss']) / out['cpu_loss']:.1e}"
        )
    found = out["variants"]
    # The rest runs as shipped, or without the graph if its capture failed here.
    rest = cuda_variant("cuda, graph, contiguous (shipped)" in found, False)
    if len(found) >= 2 and "cuda, eager, contiguous" in found:
        ref = found["cuda, eager, contiguous"]["losses"]
        for name, v in found.items():
            worst = max(abs(a - b) / b for a, b in zip(v["losses"], ref, strict=True))
            print(f"largest relative loss difference, {name} vs eager: {worst:.1e}")
    return out, rest


def concurrency(
    images: torch.Tensor, counts: list[int], options: TrainingOptions
) -> dict[int, float]:
    rates: dict[int, float] = {}
    for n in counts:
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda i: fold_task(images, "cuda", 2, i, options), range(n)))
        except Exception:
            traceback.print_exc()
            print(f"{n} tasks at once: FAILED")
            continue
        rates[n] = n * 2 * FOLD_TRAIN / (time.perf_counter() - started)
        print(f"{n} tasks at once: {rates[n]:.0f} images/s together", flush=True)
    return rates


class PaperRun:
    """The paper profile's stages in the order the flow runs them, each task skipped when its
    table exists (an interrupted run continues), the work dir archived after each stage."""

    def __init__(
        self,
        workdir: Path,
        workers: int,
        archive: Path | None,
        config: StudyConfig,
        options: TrainingOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.layout = Layout(workdir.resolve())
        self.options = options
        self.workers = workers
        self.archive = archive
        self.config = config
        self.walls: dict[str, float] = {}
        self.threads = threads_per_task(workers)
        self.lock = threading.Lock()

    def stage(self, name: str, tasks: list[Callable[[], object]]) -> None:
        started = time.perf_counter()
        done = [0]

        def run(task: Callable[[], object]) -> None:
            task()
            with self.lock:
                done[0] += 1
                print(f"  {name} {done[0]}/{len(tasks)} at {time.perf_counter() - started:.0f} s")

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(run, tasks))
        self.walls[name] = time.perf_counter() - started
        print(f"{name}: {len(tasks)} tasks in {self.walls[name]:.1f} s", flush=True)
        self.save()

    def save(self) -> None:
        if self.archive is None:
            return
        with tarfile.open(self.archive, "w:gz") as tar:
            for path in sorted(self.layout.root.rglob("*")):
                if path.is_file() and "data" not in path.relative_to(self.layout.root).parts:
                    tar.add(path, path.relative_to(self.layout.root))

    def run(self) -> float:
        c, layout, device = self.config, self.layout, self.config.runtime.device
        started = time.perf_counter()
        layout.root.mkdir(parents=True, exist_ok=True)
        save_config(c, layout.config)
        tables, _ = download_mnist(layout.data_dir, mirror(), force=False)
        train = load_images(tables["train"].path, c.data.train_limit)
        test = load_images(tables["test"].path, c.data.test_limit)
        if not layout.folds.exists():
            write_table(
                make_folds(train.idx, train.labels, c.grid.folds, c.seed), layout.folds, "folds"
            )
        folds = read_frame(layout.folds, "folds")

        def grid_task(lr: float, wd: float, fold: int) -> Callable[[], object]:
            path = layout.grid_history(lr, wd, fold)
            if path.exists():
                return lambda: None
            return lambda: write_table(
                train_fold(
                    train, folds, fold, lr=lr, weight_decay=wd, size=c.grid.size,
                    epochs=c.grid.epochs, batch_size=c.training.batch_size, seed=c.seed,
                    eval_batch_size=c.training.eval_batch_size, device=device,
                    options=self.options,
                ),
                path,
                "grid_history",
            )  # fmt: skip

        cells = [(lr, wd, f) for lr in c.grid.learning_rates for wd in c.grid.weight_decays
                 for f in range(c.grid.folds)]  # fmt: skip
        self.stage("grid", [grid_task(*cell) for cell in cells])
        frames = [read_frame(layout.grid_history(*cell), "grid_history") for cell in cells]
        table1 = grid_summary(pd.concat(frames, ignore_index=True))
        write_table(table1, layout.grid_summary, "grid_summary")
        lr, wd = float(table1.iloc[0].lr), float(table1.iloc[0].weight_decay)
        print(
            f"Table 1: best lr {lr:g}, weight decay {wd:g}, val {table1.iloc[0].val_loss_mean:.6f}"
        )

        def size_task(size: int, stage: str, repeat: int) -> Callable[[], object]:
            final = stage == "final"
            path = layout.final_history_of(repeat) if final else layout.sweep_history(size, repeat)
            if path.exists():
                return lambda: None

            def task() -> None:
                model, history = train_size(
                    train, test, size=size, lr=lr, weight_decay=wd,
                    epochs=c.final.epochs if final else c.sweep.epochs,
                    plateau_patience=c.sweep.plateau_patience,
                    selection=c.sweep.selection, validation_images=c.sweep.validation_images,
                    batch_size=c.training.batch_size, seed=c.seed, stage=stage, repeat=repeat,
                    eval_batch_size=c.training.eval_batch_size, device=device,
                    options=self.options,
                )  # fmt: skip
                if final:
                    finish_final(layout, model, test, c, lr, wd, size, device, repeat)
                write_table(history, path, "sweep_history")

            return task

        repeats = range(c.sweep.repeats)  # one sweep task per size and seed, as the flow
        sweep = [(size, repeat) for size in c.sweep.sizes for repeat in repeats]
        self.stage("sweep", [size_task(size, "sweep", repeat) for size, repeat in sweep])
        frames = [read_frame(layout.sweep_history(s, r), "sweep_history") for s, r in sweep]
        table2 = sweep_summary(pd.concat(frames, ignore_index=True), c.sweep.score_last)
        write_table(table2, layout.sweep_summary, "sweep_summary")
        best = int(table2.iloc[0]["size"])
        print(f"Table 2: best size {best}")
        size = plan.final_size(c, best)
        # As the flow: a lone final task gets every core (the CPU's sums depend on it).
        torch.set_num_threads(cpu_count() if c.sweep.repeats == 1 else self.threads)
        self.stage("final", [size_task(size, "final", repeat) for repeat in repeats])
        torch.set_num_threads(self.threads)
        self.stage(
            "evaluation",
            [lambda: evaluations(layout, test, c, device, "corruption"),
             lambda: evaluations(layout, test, c, device, "embedding")],
        )  # fmt: skip
        return time.perf_counter() - started


def finish_final(
    layout: Layout, model: Any, test: ImageSet, c: StudyConfig,
    lr: float, wd: float, size: int, device: str, repeat: int,
) -> None:  # fmt: skip
    """What the final task stores besides its history: test MSE, metrics and checkpoint."""
    test_mse = evaluate(model, test.images, c.training.eval_batch_size, device)
    metrics = {"test_mse": test_mse, "size": size, "lr": lr, "weight_decay": wd}
    write_table(metrics_frame(metrics), layout.final_metrics_of(repeat), "metrics")
    save_checkpoint(model, layout.final_model_of(repeat))
    print(f"final model: test MSE {test_mse:.6f}")


def evaluations(layout: Layout, test: ImageSet, c: StudyConfig, device: str, kind: str) -> None:
    from aemnist.model import load_checkpoint

    net = load_checkpoint(layout.final_model)
    if kind == "corruption" and not layout.corruption.exists():
        images = test.images[: c.corruption.n_images] if c.corruption.n_images else test.images
        levels, clip = levels_of(c.corruption), c.corruption.clip
        table = corruption_curves(
            net, images, levels, c.seed, c.training.eval_batch_size, device, clip
        )
        examples = examples_frame(net, images[0], levels, c.seed, clip)
        write_table(examples, layout.corruption_examples, "corruption_examples")
        write_table(table, layout.corruption, "corruption")
    if kind == "embedding" and not layout.embedding.exists():
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
    cells = [(lr, wd, f) for lr in c.grid.learning_rates for wd in c.grid.weight_decays
             for f in range(c.grid.folds)][:n]  # fmt: skip

    def again(cell: tuple[float, float, int]) -> bool:
        lr, wd, fold = cell
        history = train_fold(
            train, folds, fold, lr=lr, weight_decay=wd, size=c.grid.size, epochs=c.grid.epochs,
            batch_size=c.training.batch_size, seed=c.seed,
            eval_batch_size=c.training.eval_batch_size, device=c.runtime.device,
            options=options,
        )  # fmt: skip
        stored = read_frame(layout.grid_history(lr, wd, fold), "grid_history")
        return history.equals(stored.astype(history.dtypes.to_dict()))

    with ThreadPoolExecutor(2) as pool:
        same = list(pool.map(again, cells))
    print(f"verify: {sum(same)} of {len(same)} grid tables identical to the paper run's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,2,4,8", help="task counts to time at once")
    parser.add_argument("--paper", type=Path, metavar="WORKDIR", help="run the paper profile")
    parser.add_argument("--archive", type=Path, help="tar.gz of the paper work dir's tables")
    parser.add_argument("--skip-measure", action="store_true", help="only the paper run")
    parser.add_argument("--workers", type=int, help="paper run's concurrency (default: best)")
    parser.add_argument("--verify", type=int, default=0, help="grid cells to train again")
    parser.add_argument(
        "--profile", default="paper", help="the profile of --paper (smoke to check the driver)"
    )
    parser.add_argument(
        "--device", default="cuda", help="of --paper; cpu checks the driver (with --skip-measure)"
    )
    args = parser.parse_args()
    if args.device == "cpu" and args.skip_measure and args.paper:
        torch.set_num_threads(1)  # as the flow's thread runner gives each of 2 tasks
        config = load_config(args.profile, overrides=run_overrides(device="cpu"))
        wall = PaperRun(args.paper, cpu_count(), args.archive, config).run()
        print(f"{args.profile} profile on the CPU: {wall:.1f} s")
        return
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu.py: torch sees no GPU here (torch.cuda.is_available() is False)"
        )
    prepare_device("cuda")
    print(f"machine: {machine()}", flush=True)
    images = mnist(train=True).images
    best_n, best_rate = args.workers or 4, 0.0
    cpu_rate, cpu_loss = cpu_baseline(images)
    options = DEFAULT_OPTIONS
    if not args.skip_measure:
        _, options = throughput(images, cpu_loss)
        rates = concurrency(images, [int(n) for n in args.concurrency.split(",")], options)
        if rates:
            best_n, best_rate = max(rates.items(), key=lambda item: item[1])
            best_n = args.workers or best_n
            if not args.paper:  # the paper run's line is the last word otherwise
                result("gpu-throughput", best_rate, "images/s", cpu_rate)
    if args.paper:
        config = load_config(args.profile, overrides=run_overrides(device="cuda"))
        config = config.with_overrides({"runtime": {"gpu_concurrency": best_n}})
        print(f"paper profile on cuda, {best_n} tasks at once, work dir {args.paper}", flush=True)
        run = PaperRun(args.paper, best_n, args.archive, config, options)
        wall = run.run()
        print("stage walls: " + ", ".join(f"{k} {v:.1f} s" for k, v in run.walls.items()))
        print(f"paper profile: {wall:.1f} s ({wall / 60:.1f} min)")
        # The CPU's minutes for the same 119.4 M training image-steps at its measured rate.
        cpu_minutes = 119.4e6 / cpu_rate / 60
        if args.verify:
            verify(run.layout, config, args.verify, options)
        result("gpu-paper-profile", wall / 60, "min", cpu_minutes)


if __name__ == "__main__":
    main()
