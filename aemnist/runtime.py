"""Process-level settings of the compute: how many workers, how many torch threads each."""

from __future__ import annotations

import os

import torch


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallel_workers(configured: int) -> int:
    """Task slots for the fan-out: the configured count, or one per core when 0."""
    return configured or cpu_count()


def threads_per_task(workers: int) -> int:
    """Torch threads for each of ``workers`` tasks running side by side: two 1-thread
    processes or threads outrun one 2-thread loop on this small model (design.md)."""
    return max(1, cpu_count() // max(1, workers))


def set_torch_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
