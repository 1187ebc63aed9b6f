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

from aemnist.reference import SEED_FINAL_SIZE, SEED_FINAL_TEST_MSE, SEED_TABLE2  # noqa: E402
from aemnist.schemas import atomic_write_bytes  # noqa: E402

DPI = 120
IMAGE_SHAPE = (28, 28)
# One colour per digit, the same in every figure: tab10's colour i for digit i.
DIGIT_COLOURS: tuple[tuple[float, float, float], ...] = tuple(matplotlib.colormaps["tab10"].colors)
OURS_COLOUR = "tab:blue"
SEED_COLOUR = "tab:gray"
TRAIN_COLOUR = "tab:blue"
TEST_COLOUR = "tab:orange"
CORRUPTION_LABELS = {"noise": "noise level α (x + α·N(0, 1))", "occlusion": "occluded fraction"}


def digit_colour(digit: int) -> tuple[float, float, float]:
    return DIGIT_COLOURS[int(digit) % len(DIGIT_COLOURS)]


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
    out = Path(out)
    atomic_write_bytes(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return out


def plot_size_sweep(sweep_summary_df: pd.DataFrame, out: Path) -> Path:
    """Figure 1a: test loss (Table 2 score) against encoding size, ours and the seed's."""
    ours = sweep_summary_df.sort_values("size")
    seed_sizes = sorted(SEED_TABLE2)
    seed_loss = [SEED_TABLE2[s] for s in seed_sizes]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    _loss_scale(ax, list(ours["test_loss"]) + seed_loss)
    ours_line = ax.errorbar(
        ours["size"],
        ours["test_loss"],
        yerr=ours["test_loss_std"],
        color=OURS_COLOUR,
        marker="o",
        capsize=3,
        label="ours",
    )
    (seed_line,) = ax.plot(
        seed_sizes,
        seed_loss,
        color=SEED_COLOUR,
        marker="s",
        linestyle="--",
        label="seed (Table 2)",
    )
    ax.set_xticks(sorted(set(seed_sizes) | set(ours["size"].astype(int))))
    ax.set_xlabel("encoding size")
    ax.set_ylabel("test loss (MSE, mean of last epochs)")
    ax.set_title("Test loss against encoding size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=[ours_line, seed_line])
    return _save(fig, out)


def _lr_drops(history: pd.DataFrame) -> list[int]:
    """Epochs at which the learning rate fell below the previous epoch's."""
    ordered = history.sort_values("epoch")
    lr = ordered["lr"].to_numpy(dtype=float)
    epochs = ordered["epoch"].to_numpy()
    return [int(e) for e, prev, cur in zip(epochs[1:], lr[:-1], lr[1:], strict=True) if cur < prev]


def plot_training_curves(final_history_df: pd.DataFrame, out: Path) -> Path:
    """Figure 1b: train and test loss against epoch for the final model."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    _loss_scale(ax, list(final_history_df["train_loss"]) + list(final_history_df["test_loss"]))
    groups = list(final_history_df.groupby("size"))
    for size, h in groups:
        h = h.sort_values("epoch")
        suffix = f" (size {int(size)})" if len(groups) > 1 else ""
        ax.plot(h["epoch"], h["train_loss"], color=TRAIN_COLOUR, marker=".", label="train" + suffix)
        ax.plot(h["epoch"], h["test_loss"], color=TEST_COLOUR, marker=".", label="test" + suffix)
        for i, epoch in enumerate(_lr_drops(h)):
            ax.axvline(
                epoch,
                color="tab:green",
                alpha=0.4,
                linestyle=":",
                label="learning rate reduced" if i == 0 else None,
            )
    ax.axhline(
        SEED_FINAL_TEST_MSE,
        color=SEED_COLOUR,
        linestyle="--",
        label=f"seed: final test MSE {SEED_FINAL_TEST_MSE:g} (size {SEED_FINAL_SIZE})",
    )
    sizes = ", ".join(str(int(s)) for s, _ in groups)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (MSE)")
    ax.set_title(f"Final model (encoding size {sizes}): training curves")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out)


def _corruption_curve(ax: Axes, curve: pd.DataFrame, kind: str) -> None:
    curve = curve.sort_values("level")
    log = _loss_scale(ax, list(curve["mse"]) + list(curve["baseline_mse"]))
    ax.plot(
        curve["level"],
        _positive(curve["mse"], log),
        marker="o",
        color=OURS_COLOUR,
        label="reconstruction MSE (vs clean)",
    )
    ax.plot(
        curve["level"],
        _positive(curve["baseline_mse"], log),
        marker="s",
        linestyle="--",
        color=SEED_COLOUR,
        label="baseline: corrupted input MSE",
    )
    ax.set_xlabel(CORRUPTION_LABELS.get(kind, f"{kind} level"))
    ax.set_ylabel("MSE against the clean image")
    ax.set_title(f"Reconstruction under {kind}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


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


def _example_grid(ax: Axes, examples: pd.DataFrame) -> None:
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
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_corruption(
    corruption_df: pd.DataFrame, examples_df: pd.DataFrame, kind: str, out: Path
) -> Path:
    """Figures 2 (noise) and 3 (occlusion): MSE and baseline against level (top), and one
    example image corrupted at each level (row 1) with its reconstruction (row 2)."""
    curve = corruption_df[corruption_df["kind"] == kind]
    if curve.empty:
        raise ValueError(f"the corruption table has no rows of kind {kind!r}")
    examples = examples_df[examples_df["kind"] == kind]
    n = len(examples)
    width = max(6.4, 0.95 * n + 1.4)
    cell = min(1.2, (width - 1.4) / max(n, 1))  # inches per example image
    heights = [4.0, 2 * cell + 0.35] if n else [4.0]
    fig = Figure(figsize=(width, sum(heights)), layout="constrained")
    spec = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    _corruption_curve(fig.add_subplot(spec[0]), curve, kind)
    if n:
        _example_grid(fig.add_subplot(spec[1]), examples)
    return _save(fig, out)


def plot_tsne(embedding_df: pd.DataFrame, out: Path) -> Path:
    """Figure 4: the t-SNE map of the encoding space, one colour per digit."""
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
            label=str(digit),
        )
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(f"Encoding space, t-SNE ({len(embedding_df)} test images)")
    ax.legend(title="digit", loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3)
    return _save(fig, out)
