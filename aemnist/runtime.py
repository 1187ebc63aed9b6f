"""Process-level settings of the compute: the device, how many workers, torch threads each."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from aemnist.config import DEVICES, DeviceError, StudyConfig


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` is often empty
    on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_tags(device: str) -> dict[str, str]:
    """The machine a study opened on, for its parent run: a wall time or a loss read later
    means little without the CPU, GPU and library versions it came from."""
    on_gpu = device != "cpu" and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if on_gpu else "none"
    return {
        "machine.cpu": f"{cpu_model()} ({platform.machine()}), {cpu_count()} cores",
        "machine.gpu": gpu,
        "machine.torch": torch.__version__,
        "machine.python": platform.python_version(),
    }


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` where torch sees a GPU, else ``cpu``; ``cuda`` must be usable."""
    if requested not in DEVICES:
        raise DeviceError(f"runtime.device: {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if not available:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        raise DeviceError(
            f"runtime.device is 'cuda' but torch {torch.__version__} ({build}) sees no GPU on "
            "this machine; run with --device cpu (or auto), or on a machine with a GPU"
        )
    return "cuda"


def with_resolved_device(config: StudyConfig) -> StudyConfig:
    """``config`` with runtime.device resolved to cpu or cuda, as the tasks are keyed on it
    and the saved config records it."""
    device = resolve_device(config.runtime.device)
    # with_overrides validates the result again, as model_copy(update=...) would not.
    return config.with_overrides({"runtime": {"device": device}})


def prepare_device(device: str) -> None:
    """Make CUDA kernels deterministic, so that the same config and seed give the same tables
    on the same GPU. cuBLAS needs its workspace setting before its first use."""
    if device != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # float32 matmuls in full precision: TF32 would move the losses by about 1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def parallel_workers(configured: int, device: str = "cpu", gpu_concurrency: int = 8) -> int:
    """Task slots for the fan-out. On the CPU: the configured count, or one per core when 0.
    On a GPU: ``gpu_concurrency`` tasks share it (each on its own CUDA stream)."""
    if device == "cuda":
        return gpu_concurrency
    return configured or cpu_count()


def threads_per_task(workers: int) -> int:
    """Torch threads for each of ``workers`` tasks running side by side: two 1-thread
    processes or threads outrun one 2-thread loop on this small model (design.md)."""
    return max(1, cpu_count() // max(1, workers))


def set_torch_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
