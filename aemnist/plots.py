"""The study's figures (seed-report.txt, figures 1-4), written as PNG files.

Each function takes data frames in the stage-table schemas (aemnist.schemas) and an output
path, writes the figure atomically and returns the path. Figures are built on
``matplotlib.figure.Figure`` rather than pyplot, so no global figure state is shared between
tasks running in threads; the Agg backend is selected so nothing ever needs a display.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from aemnist.datasets import dataset_spec, has_reference  # noqa: E402
from aemnist.reference import SEED_FINAL_SIZE, SEED_FINAL_TEST_MSE, SEED_TABLE2  # noqa: E402
from aemnist.schemas import atomic_write_bytes  # noqa: E402
from aemnist.storage import as_path  # noqa: E402
from aemnist.summaries import score_column  # noqa: E402

DPI = 120
IMAGE_SHAPE = (28, 28)
# One colour per digit, the same in every figure: tab10's colour i for digit i.
DIGIT_COLOURS: tuple[tuple[float, float, float], ...] = tuple(matplotlib.colormaps["tab10"].colors)
OURS_COLOUR = "tab:blue"
SEED_COLOUR = "tab:gray"
TRAIN_COLOUR = "tab:blue"
TEST_COLOUR = "tab:orange"
CORRUPTION_LABELS = {
    "noise": "noise level α (x + α·N(0, 1))",
    "occlusion": "occluded fraction",
    "patch": "occluded fraction",
}
# Each kind's name in a legend, and its colour (the baseline is the same colour, dashed).
CORRUPTION_NAMES = {
    "noise": "Gaussian noise",
    "occlusion": "random pixels",
    "patch": "square patch",
}
CORRUPTION_COLOURS = {"noise": "tab:blue", "occlusion": "tab:blue", "patch": "tab:red"}


def digit_colour(digit: int) -> tuple[float, float, float]:
    return DIGIT_COLOURS[int(digit) % len(DIGIT_COLOURS)]


def class_name(dataset: str, label: int) -> str:
    """Label ``label``'s name in ``dataset`` (MNIST's digits are their own names)."""
    classes = dataset_spec(dataset).classes
    return classes[label] if 0 <= label < len(classes) else str(label)


def spans_decades(values: Iterable[float], ratio: float = 10.0) -> bool:
    """Whether the positive finite values span at least ``ratio`` (a decade by default)."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return arr.size > 1 and float(arr.max() / arr.min()) >= ratio


def _loss_scale(ax: Axes, values: Iterable[float]) -> bool:
    """Put ``ax`` on a log y scale when the losses span decades; return whether it did."""
    log = spans_decades(values)
    if log:
        ax.set_yscale("log")
    return log


def _positive(values: pd.Series, log: bool) -> np.ndarray:
    """The values as floats, with non-positive ones hidden (NaN) on a log axis."""
    arr = values.to_numpy(dtype=float)
    return np.where(arr > 0, arr, np.nan) if log else arr


def _save(fig: Figure, out: Path) -> Path:
    out = as_path(out)
    atomic_write_bytes(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return out


def _titled(title: str, dataset: str) -> str:
    """A figure's title naming its dataset."""
    return f"{dataset_spec(dataset).title}: {title}"


def plot_size_sweep(sweep_summary_df: pd.DataFrame, out: Path, dataset: str = "mnist") -> Path:
    """Figure 1a: test loss (Table 2 score) against encoding size, ours and (MNIST) the
    seed's."""
    ours = sweep_summary_df.sort_values("size")
    score = score_column(ours)
    reference = has_reference(dataset)
    seed_sizes = sorted(SEED_TABLE2) if reference else []
    seed_loss = [SEED_TABLE2[s] for s in seed_sizes]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    _loss_scale(ax, list(ours[score]) + seed_loss)
    ours_line = ax.errorbar(
        ours["size"],
        ours[score],
        yerr=ours[f"{score}_std"],
        color=OURS_COLOUR,
        marker="o",
        capsize=3,
        label="ours (test set)" if score == "test_loss" else "ours (held-out validation)",
    )
    handles = [ours_line]
    if reference:
        (seed_line,) = ax.plot(
            seed_sizes,
            seed_loss,
            color=SEED_COLOUR,
            marker="s",
            linestyle="--",
            label="seed (Table 2)",
        )
        handles.append(seed_line)
    ax.set_xticks(sorted(set(seed_sizes) | set(ours["size"].astype(int))))
    ax.set_xlabel("encoding size")
    ax.set_ylabel("loss (MSE, mean of the last epochs)")
    ax.set_title(_titled("loss against encoding size", dataset))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles)
    return _save(fig, out)


def _lr_drops(history: pd.DataFrame) -> list[int]:
    """Epochs at which the learning rate fell below the previous epoch's."""
    ordered = history.sort_values("epoch")
    lr = ordered["lr"].to_numpy(dtype=float)
    epochs = ordered["epoch"].to_numpy()
    return [int(e) for e, prev, cur in zip(epochs[1:], lr[:-1], lr[1:], strict=True) if cur < prev]


def plot_training_curves(final_history_df: pd.DataFrame, out: Path, dataset: str = "mnist") -> Path:
    """Figure 1b: train and test loss against epoch for the final model."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    score = score_column(final_history_df)
    scored = "test" if score == "test_loss" else "validation (held out)"
    _loss_scale(ax, list(final_history_df["train_loss"]) + list(final_history_df[score]))
    groups = list(final_history_df.groupby("size"))
    for size, h in groups:
        h = h.sort_values("epoch")
        suffix = f" (size {int(size)})" if len(groups) > 1 else ""
        ax.plot(h["epoch"], h["train_loss"], color=TRAIN_COLOUR, marker=".", label="train" + suffix)
        ax.plot(h["epoch"], h[score], color=TEST_COLOUR, marker=".", label=scored + suffix)
        for i, epoch in enumerate(_lr_drops(h)):
            ax.axvline(
                epoch,
                color="tab:green",
                alpha=0.4,
                linestyle=":",
                label="learning rate reduced" if i == 0 else None,
            )
    if has_reference(dataset):
        ax.axhline(
            SEED_FINAL_TEST_MSE,
            color=SEED_COLOUR,
            linestyle="--",
            label=f"seed: final test MSE {SEED_FINAL_TEST_MSE:g} (size {SEED_FINAL_SIZE})",
        )
    sizes = ", ".join(str(int(s)) for s, _ in groups)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (MSE)")
    ax.set_title(_titled(f"final model (encoding size {sizes}), training curves", dataset))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out)


def _corruption_curves(
    ax: Axes, curves: pd.DataFrame, kinds: Sequence[str], dataset: str = "mnist"
) -> None:
    """Reconstruction and baseline MSE against level for each kind, 95 % intervals shaded."""
    log = _loss_scale(ax, list(curves["mse"]) + list(curves["baseline_mse"]))
    several = len(kinds) > 1
    for kind in kinds:
        curve = curves[curves["kind"] == kind].sort_values("level")
        colour = CORRUPTION_COLOURS.get(kind, OURS_COLOUR)
        name = f", {CORRUPTION_NAMES.get(kind, kind)}" if several else ""
        for column, marker, style, label, base_colour in (
            ("mse", "o", "-", "reconstruction MSE (vs clean)", colour),
            ("baseline_mse", "s", "--", "baseline: corrupted input MSE", SEED_COLOUR),
        ):
            line_colour = colour if several else base_colour
            mean = _positive(curve[column], log)
            ax.plot(
                curve["level"],
                mean,
                marker=marker,
                linestyle=style,
                color=line_colour,
                label=label + name,
            )
            half = curve[f"{column}_ci95"].to_numpy(dtype=float)
            ax.fill_between(
                curve["level"], mean - half, mean + half, color=line_colour, alpha=0.2, lw=0
            )
    ax.set_xlabel(CORRUPTION_LABELS.get(kinds[0], f"{kinds[0]} level"))
    ax.set_ylabel("MSE against the clean image (95 % interval shaded)")
    title = " and ".join(CORRUPTION_NAMES.get(k, k) for k in kinds)
    ax.set_title(_titled(f"reconstruction under {title.lower()}", dataset))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _image(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(IMAGE_SHAPE)


def example_montage(examples: pd.DataFrame, gap: int = 3) -> np.ndarray:
    """One array of the example images: corrupted in row 1, restored in row 2, one column
    per level (in the frame's order), separated by ``gap`` pixels of NaN."""
    h, w = IMAGE_SHAPE
    n = len(examples)
    montage = np.full((2 * h + gap, n * w + (n - 1) * gap), np.nan, dtype=np.float32)
    for col, (_, row) in enumerate(examples.iterrows()):
        x = col * (w + gap)
        montage[:h, x : x + w] = _image(row["corrupted"])
        montage[h + gap :, x : x + w] = _image(row["restored"])
    return montage


def _example_grid(ax: Axes, examples: pd.DataFrame, title: str | None = None) -> None:
    examples = examples.sort_values("level")
    h, w = IMAGE_SHAPE
    gap = 3
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    ax.imshow(example_montage(examples, gap), cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_xticks([i * (w + gap) + w / 2 - 0.5 for i in range(len(examples))])
    ax.set_xticklabels([f"{level:g}" for level in examples["level"]], fontsize=9)
    ax.xaxis.set_ticks_position("top")
    ax.set_yticks([h / 2 - 0.5, h + gap + h / 2 - 0.5])
    ax.set_yticklabels(["corrupted", "reconstructed"], fontsize=9)
    ax.tick_params(length=0)
    if title:
        ax.set_ylabel(title, fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_corruption(
    corruption_df: pd.DataFrame,
    examples_df: pd.DataFrame,
    kinds: str | Sequence[str],
    out: Path,
    dataset: str = "mnist",
) -> Path:
    """Figures 2 (noise) and 3 (occlusion: random pixels and a square patch): MSE and
    baseline against level with 95 % intervals (top), and one example image corrupted at
    each level with its reconstruction, for each kind (below)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    curves = corruption_df[corruption_df["kind"].isin(kinds)]
    for kind in kinds:
        if (curves["kind"] == kind).sum() == 0:
            raise ValueError(f"the corruption table has no rows of kind {kind!r}")
    grids = [examples_df[examples_df["kind"] == k] for k in kinds]
    grids = [(k, g) for k, g in zip(kinds, grids, strict=True) if len(g)]
    n = max((len(g) for _, g in grids), default=0)
    width = max(6.4, 0.95 * n + 1.4)
    cell = min(1.2, (width - 1.4) / max(n, 1))  # inches per example image
    heights = [4.0] + [2 * cell + 0.35] * len(grids)
    fig = Figure(figsize=(width, sum(heights)), layout="constrained")
    spec = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    _corruption_curves(fig.add_subplot(spec[0]), curves, kinds, dataset)
    for row, (kind, grid) in enumerate(grids, start=1):
        title = CORRUPTION_NAMES.get(kind, kind) if len(grids) > 1 else None
        _example_grid(fig.add_subplot(spec[row]), grid, title)
    return _save(fig, out)


def plot_tsne(embedding_df: pd.DataFrame, out: Path, dataset: str = "mnist") -> Path:
    """Figure 4: the t-SNE map of the encoding space, one colour per class (a digit of
    MNIST's; Fashion-MNIST's and KMNIST's named in the legend as torchvision names them)."""
    return _save(tsne_figure(embedding_df, dataset), out)


def tsne_figure(embedding_df: pd.DataFrame, dataset: str = "mnist") -> Figure:
    """Figure 4 before it is saved (its legend is what tests read)."""
    spec = dataset_spec(dataset)
    fig = Figure(figsize=(6.8, 5.6), layout="constrained")
    ax = fig.add_subplot()
    for digit in sorted(int(d) for d in embedding_df["label"].unique()):
        points = embedding_df[embedding_df["label"] == digit]
        ax.scatter(
            points["tsne_x"],
            points["tsne_y"],
            s=6,
            alpha=0.8,
            color=digit_colour(digit),
            label=class_name(spec.name, digit),
        )
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(_titled(f"encoding space, t-SNE ({len(embedding_df)} test images)", dataset))
    legend = "digit" if spec.name == "mnist" else "class"
    ax.legend(title=legend, loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3)
    return fig
