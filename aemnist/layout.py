"""Where every table, checkpoint, figure and the report live inside a study's work dir."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

# A work dir holds what the next run trusts (tables, cache records, checkpoints): its owner's
# alone, as are the folders the project creates in it (aemnist.schemas writes files 0600).
PRIVATE_MODE = 0o700


def private_dir(path: Path, narrow: bool = True) -> int:
    """Create the folder ``path`` (with any missing parents) with mode 0700; an existing one
    of this user's that others may enter is narrowed to that when ``narrow``. Returns its
    mode afterwards (still open to others when another user owns it)."""
    path.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if narrow and mode & 0o077 and info.st_uid == os.getuid():
        mode &= PRIVATE_MODE
        os.chmod(path, mode)
    return mode


def _num(value: float) -> str:
    return f"{value:g}"


def _repeat(repeat: int) -> str:
    """Repeat 0 keeps the single-seed names, so a study without repeats is laid out as
    before."""
    return f"_repeat={repeat}" if repeat else ""


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def train_table(self) -> Path:
        return self.data_dir / "mnist_train.parquet"

    @property
    def test_table(self) -> Path:
        return self.data_dir / "mnist_test.parquet"

    @property
    def config(self) -> Path:
        return self.root / "study_config.json"

    @property
    def folds(self) -> Path:
        return self.root / "folds.parquet"

    def grid_history(self, lr: float, weight_decay: float, fold: int, repeat: int = 0) -> Path:
        name = f"lr={_num(lr)}_wd={_num(weight_decay)}_fold={fold}{_repeat(repeat)}"
        return self.root / "grid" / f"{name}.parquet"

    @property
    def grid_summary(self) -> Path:
        return self.root / "grid_summary.parquet"

    def sweep_history(self, size: int, repeat: int = 0) -> Path:
        return self.root / "sweep" / f"size={size}{_repeat(repeat)}.parquet"

    @property
    def sweep_summary(self) -> Path:
        return self.root / "sweep_summary.parquet"

    @property
    def final_model(self) -> Path:
        """The final model of repeat 0: the one the evaluation stages use."""
        return self.final_model_of(0)

    @property
    def final_history(self) -> Path:
        return self.final_history_of(0)

    @property
    def final_metrics(self) -> Path:
        return self.final_metrics_of(0)

    def final_model_of(self, repeat: int) -> Path:
        return self.root / "final" / f"model{_repeat(repeat)}.pt"

    def final_history_of(self, repeat: int) -> Path:
        return self.root / "final" / f"history{_repeat(repeat)}.parquet"

    def final_metrics_of(self, repeat: int) -> Path:
        return self.root / "final" / f"metrics{_repeat(repeat)}.parquet"

    @property
    def corruption(self) -> Path:
        return self.root / "corruption.parquet"

    @property
    def corruption_examples(self) -> Path:
        return self.root / "corruption_examples.parquet"

    @property
    def embedding(self) -> Path:
        return self.root / "embedding.parquet"

    @property
    def embedding_metrics(self) -> Path:
        return self.root / "embedding_metrics.parquet"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def report_run(self) -> Path:
        """The MLflow run of the study that wrote the report (which the report names)."""
        return self.root / "report_run.json"

    @property
    def cache_dir(self) -> Path:
        """Prefect's persisted task results, keyed by aemnist.caching.stage_key."""
        return self.root / "cache"

    def make_private(self) -> dict[Path, int]:
        """The work dir and its cache folder, created (or narrowed to) mode 0700; returns
        each one's mode afterwards. An existing folder that holds no study yet (`--workdir .`,
        say) keeps its mode: narrowing a user's own folder is not ours to decide."""
        ours = not self.root.exists() or self.config.exists() or self.cache_dir.exists()
        return {
            self.root: private_dir(self.root, narrow=ours),
            self.cache_dir: private_dir(self.cache_dir),
        }

    def checkpoint(self, label: str) -> Path:
        """The per-epoch training state of one task (``label`` as in its task run name)."""
        slug = "".join(c if c.isalnum() or c in ".=-" else "_" for c in label)
        return self.root / "checkpoints" / f"{slug}.pt"
