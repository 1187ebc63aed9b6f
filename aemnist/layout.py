"""Where every table, checkpoint, figure and the report live inside a study's work dir."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from aemnist.storage import as_path, is_remote

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
    """The files of one dataset's study in the work dir ``root``.

    MNIST's lie in the work dir itself, as they always have (earlier work dirs and caches
    stay valid); another dataset's in a folder of its own, ``root/<dataset>`` (``study_dir``),
    tables, cache, checkpoints, figures and report alike, so that switching datasets in one
    work dir never reads, reuses or overwrites the other's results. The work dir's lock,
    MLflow store and servers stay in ``root``, shared (runs carry a ``dataset`` tag).

    With ``storage`` (a URL, ``runtime.storage``), the study's files lie there instead, laid
    out the same way (aemnist.storage): everything the stages hand each other, the cache
    records, checkpoints, figures and report. The work dir keeps its lock, MLflow store and
    servers."""

    root: Path
    dataset: str = "mnist"
    storage: str = ""

    @property
    def base(self) -> Path:
        """The work dir, or the storage location when one is given."""
        return as_path(self.storage.rstrip("/")) if self.storage else self.root

    @property
    def remote(self) -> bool:
        """Whether the study's files lie in an object store (not on this machine's disk)."""
        return is_remote(self.base)

    @property
    def study_dir(self) -> Path:
        """Where this dataset's files lie: the work dir (or storage) for MNIST, else a
        folder in it."""
        return self.base if self.dataset == "mnist" else self.base / self.dataset

    @property
    def data_dir(self) -> Path:
        return self.study_dir / "data"

    @property
    def train_table(self) -> Path:
        return self.data_dir / f"{self.dataset}_train.parquet"

    @property
    def test_table(self) -> Path:
        return self.data_dir / f"{self.dataset}_test.parquet"

    @property
    def config(self) -> Path:
        return self.study_dir / "study_config.json"

    @property
    def folds(self) -> Path:
        return self.study_dir / "folds.parquet"

    def grid_history(self, lr: float, weight_decay: float, fold: int, repeat: int = 0) -> Path:
        name = f"lr={_num(lr)}_wd={_num(weight_decay)}_fold={fold}{_repeat(repeat)}"
        return self.study_dir / "grid" / f"{name}.parquet"

    @property
    def grid_summary(self) -> Path:
        return self.study_dir / "grid_summary.parquet"

    def sweep_history(self, size: int, repeat: int = 0) -> Path:
        return self.study_dir / "sweep" / f"size={size}{_repeat(repeat)}.parquet"

    @property
    def sweep_summary(self) -> Path:
        return self.study_dir / "sweep_summary.parquet"

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
        return self.study_dir / "final" / f"model{_repeat(repeat)}.pt"

    def final_history_of(self, repeat: int) -> Path:
        return self.study_dir / "final" / f"history{_repeat(repeat)}.parquet"

    def final_metrics_of(self, repeat: int) -> Path:
        return self.study_dir / "final" / f"metrics{_repeat(repeat)}.parquet"

    @property
    def corruption(self) -> Path:
        return self.study_dir / "corruption.parquet"

    @property
    def corruption_examples(self) -> Path:
        return self.study_dir / "corruption_examples.parquet"

    @property
    def embedding(self) -> Path:
        return self.study_dir / "embedding.parquet"

    @property
    def embedding_metrics(self) -> Path:
        return self.study_dir / "embedding_metrics.parquet"

    @property
    def figures_dir(self) -> Path:
        return self.study_dir / "figures"

    @property
    def report(self) -> Path:
        return self.study_dir / "report.md"

    @property
    def report_run(self) -> Path:
        """The MLflow run of the study that wrote the report (which the report names)."""
        return self.study_dir / "report_run.json"

    @property
    def cache_dir(self) -> Path:
        """Prefect's persisted task results, keyed by aemnist.caching.stage_key."""
        return self.study_dir / "cache"

    def make_private(self) -> dict[Path, int]:
        """The work dir and its cache folder, created (or narrowed to) mode 0700; returns
        each one's mode afterwards. An existing folder that holds no study yet (`--workdir .`,
        say) keeps its mode: narrowing a user's own folder is not ours to decide."""
        mnist = Layout(self.root)  # the work dir's own study files, whichever dataset runs
        here = [] if self.remote else [self.config, self.cache_dir]
        ours = not self.root.exists() or any(
            p.exists() for p in (mnist.config, mnist.cache_dir, *here)
        )
        modes = {self.root: private_dir(self.root, narrow=ours)}
        if self.remote:  # the store's access is its own (bucket policies), not file modes
            return modes
        if self.study_dir != self.root:
            modes[self.study_dir] = private_dir(self.study_dir)
        modes[self.cache_dir] = private_dir(self.cache_dir)
        return modes

    def checkpoint(self, label: str) -> Path:
        """The per-epoch training state of one task (``label`` as in its task run name)."""
        slug = "".join(c if c.isalnum() or c in ".=-" else "_" for c in label)
        return self.study_dir / "checkpoints" / f"{slug}.pt"
