"""The seed's published figures, as data, for side-by-side comparison in the report.

Source: /work/shared/docs/seed-report.txt (Agostini, "Neural Network and Deep Learning,
Homework 4"), Table 1 (section 2, best Adam learning rate and weight decay: 3-fold
cross-validation, 20 epochs), Table 2 (section 2, test loss against encoding size: mean of the
last 5 of 50 epochs) and section 3 (final model, size 20, test MSE 0.0086); the same numbers
are repeated in /work/shared/docs/design.md, "Reference figures from the seed".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pandas as pd


@dataclass(frozen=True)
class SeedGridRow:
    """One row of the seed's Table 1."""

    lr: float
    weight_decay: float
    train_loss: float
    val_loss: float


# Table 1, top 5 rows, in the seed's order (best validation loss first).
SEED_TABLE1: tuple[SeedGridRow, ...] = (
    SeedGridRow(lr=0.0100, weight_decay=0.000005, train_loss=0.021793, val_loss=0.022443),
    SeedGridRow(lr=0.0100, weight_decay=0.000010, train_loss=0.022037, val_loss=0.022501),
    SeedGridRow(lr=0.0050, weight_decay=0.000005, train_loss=0.022173, val_loss=0.022681),
    SeedGridRow(lr=0.0050, weight_decay=0.000010, train_loss=0.022197, val_loss=0.022696),
    SeedGridRow(lr=0.0050, weight_decay=0.000050, train_loss=0.023330, val_loss=0.023907),
)

# Table 2: encoding size -> test loss, for all ten sizes of the seed's sweep.
SEED_TABLE2: dict[int, float] = {
    2: 0.044586,
    4: 0.027136,
    6: 0.020458,
    8: 0.017079,
    10: 0.018720,
    12: 0.012720,
    15: 0.010073,
    20: 0.009258,
    25: 0.010108,
    30: 0.011145,
}

# Section 3: the final model and its MSE on the MNIST test set.
SEED_FINAL_SIZE: int = 20
SEED_FINAL_TEST_MSE: float = 0.0086

# The seed's best configuration (first row of Table 1, best row of Table 2).
SEED_BEST_LR: float = SEED_TABLE1[0].lr
SEED_BEST_WEIGHT_DECAY: float = SEED_TABLE1[0].weight_decay
SEED_BEST_SIZE: int = min(SEED_TABLE2, key=SEED_TABLE2.__getitem__)


def same_value(a: float, b: float) -> bool:
    """Whether two hyperparameter values are the same number (float-noise tolerant)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def seed_grid_row(lr: float, weight_decay: float) -> SeedGridRow | None:
    """The seed's Table 1 row for (lr, weight decay), or None when the seed does not list it."""
    for row in SEED_TABLE1:
        if same_value(row.lr, lr) and same_value(row.weight_decay, weight_decay):
            return row
    return None


def seed_table1_frame() -> pd.DataFrame:
    """Table 1's top 5 rows: columns seed_rank, lr, weight_decay, train_loss, val_loss."""
    frame = pd.DataFrame([asdict(row) for row in SEED_TABLE1])
    frame.insert(0, "seed_rank", range(1, len(frame) + 1))
    return frame


def seed_table2_frame() -> pd.DataFrame:
    """Table 2: columns size, test_loss, sorted by size."""
    sizes = sorted(SEED_TABLE2)
    return pd.DataFrame({"size": sizes, "test_loss": [SEED_TABLE2[s] for s in sizes]})


@dataclass(frozen=True)
class Spread:
    """One of our figures over the seeds it was trained with: its value for each seed."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, value: float | Sequence[float]) -> Spread:
        if isinstance(value, Spread):
            return value
        if isinstance(value, (int, float)):
            return cls((float(value),))
        return cls(tuple(float(v) for v in value))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(pd.Series(self.values).mean())

    @property
    def std(self) -> float:
        """The sample standard deviation over the seeds (0 for one seed)."""
        return float(pd.Series(self.values).std()) if self.n > 1 else 0.0

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def holds(self, seed: float) -> bool:
        """Whether the seed's number lies within our mean ± 2 standard deviations."""
        return abs(seed - self.mean) <= 2.0 * self.std

    def below(self, other: Spread) -> bool:
        """Whether this interval (mean ± std) lies wholly below ``other``'s."""
        return self.mean + self.std < other.mean - other.std


@dataclass(frozen=True)
class Target:
    """One of the paper profile's fidelity targets, checked against our tables.

    ``met`` follows the target's rule on our means; ``tie`` (only with several seeds, for
    the size rankings) says our sizes' intervals overlap, so the ranking is neither met nor
    missed. A target with a number gives the seed's (``seed``) and ours over the seeds
    (``spread``)."""

    name: str
    ours: str
    met: bool
    seed: float | None = None
    spread: Spread | None = None
    tie: bool = False

    @property
    def verdict(self) -> str:
        return "tie" if self.tie else "met" if self.met else "missed"


def _within(ours: float | None, seed: float, tolerance: float) -> bool:
    return ours is not None and abs(ours / seed - 1.0) <= tolerance


def _fmt_size(size: int, spread: Spread) -> str:
    if spread.n == 1:
        return f"size {size} ({spread.mean:.6f})"
    return f"size {size} ({spread.mean:.6f} ± {spread.std:.6f})"


def rank_ahead(
    first: Sequence[int], then: Sequence[int], losses: dict[int, Spread]
) -> tuple[bool, bool, str]:
    """Whether the sizes ``first`` all rank ahead of (score lower than) the sizes ``then``:
    (met, tie, what decided it).

    With one seed, on the scores: the worst of ``first`` below the best of ``then``. With
    several, each size is its interval, mean ± standard deviation over the seeds: met when
    every interval of ``first`` lies wholly below every one of ``then`` (so the means are in
    order, and by more than the spread); missed when some interval of ``first`` lies wholly
    above one of ``then``; otherwise a tie (the means are in order, or out of it, only
    within the spread)."""
    if not all(s in losses for s in (*first, *then)):
        return False, False, "sizes missing from the sweep"
    worst_first = max(first, key=lambda s: losses[s].mean)
    best_then = min(then, key=lambda s: losses[s].mean)
    text = (
        f"worst of {list(first)}: {_fmt_size(worst_first, losses[worst_first])}; "
        f"best of {list(then)}: {_fmt_size(best_then, losses[best_then])}"
    )
    if max(losses[s].n for s in (*first, *then)) == 1:
        return losses[worst_first].mean < losses[best_then].mean, False, text
    pairs = [(a, b) for a in first for b in then]
    met = all(losses[a].below(losses[b]) for a, b in pairs)
    missed = any(losses[b].below(losses[a]) for a, b in pairs)
    if met or missed:
        return met, False, text
    overlapping = [
        f"{a} with {b}"
        for a, b in pairs
        if not losses[a].below(losses[b]) and not losses[b].below(losses[a])
    ]
    return False, True, f"{text}; intervals overlap: {', '.join(overlapping)}"


def _loss_target(name: str, ours: Spread | None, seed: float, tolerance: float) -> Target:
    """A target on one of our numbers: within ``tolerance`` of the seed's, on our mean."""
    if ours is None:
        return Target(name, "—", False, seed)
    text = f"{ours.mean:.6f} ({ours.mean / seed:.3f} x seed)"
    return Target(name, text, _within(ours.mean, seed, tolerance), seed, ours)


def paper_targets(
    best_lr: float,
    best_weight_decay: float,
    best_val_loss: float | Sequence[float],
    size_losses: dict[int, float] | dict[int, Sequence[float]],
    final_test_mse: float | Sequence[float],
) -> list[Target]:
    """The targets a paper-profile run must meet to reproduce the seed's answers (issue 6):
    the optimiser settings, the validation loss, the order of the sizes, two sizes' test
    losses and the final test MSE.

    Each loss is one number, or one per seed: a target is then judged on the mean over the
    seeds, and the size rankings tie where the sizes' intervals overlap (rank_ahead)."""
    top3 = [(row.lr, row.weight_decay) for row in SEED_TABLE1[:3]]
    in_top3 = any(same_value(best_lr, lr) and same_value(best_weight_decay, wd) for lr, wd in top3)
    sizes = {int(size): Spread.of(value) for size, value in size_losses.items()}
    best_val, final = Spread.of(best_val_loss), Spread.of(final_test_mse)

    upper_met, upper_tie, upper_text = rank_ahead((20, 15, 25, 30), (12,), sizes)
    twelve_met, twelve_tie, twelve_text = rank_ahead((12,), (8, 10, 6, 4, 2), sizes)
    return [
        Target(
            "best (lr, weight decay) among the seed's top 3 of Table 1",
            f"lr {best_lr:g}, weight decay {best_weight_decay:g}",
            in_top3,
        ),
        _loss_target(
            f"best validation MSE within 10 % of the seed's {SEED_TABLE1[0].val_loss}",
            best_val,
            SEED_TABLE1[0].val_loss,
            0.10,
        ),
        Target("sizes 20, 15, 25 and 30 rank ahead of 12", upper_text, upper_met, tie=upper_tie),
        Target("size 12 ranks ahead of 8, 10, 6, 4 and 2", twelve_text, twelve_met, tie=twelve_tie),
        _loss_target(
            f"test loss at size 2 within 15 % of the seed's {SEED_TABLE2[2]}",
            sizes.get(2),
            SEED_TABLE2[2],
            0.15,
        ),
        _loss_target(
            f"test loss at size 20 within 15 % of the seed's {SEED_TABLE2[20]}",
            sizes.get(20),
            SEED_TABLE2[20],
            0.15,
        ),
        Target(
            "final test MSE at most 0.0095 (seed: 0.0086)",
            f"{final.mean:.6f}",
            final.mean <= 0.0095,
            SEED_FINAL_TEST_MSE,
            final,
        ),
    ]
