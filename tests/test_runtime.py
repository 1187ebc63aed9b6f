"""aemnist.runtime and the device option: where the study computes, and what that keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from aemnist import plan
from aemnist.caching import stage_key
from aemnist.config import DeviceError, load_config, run_overrides
from aemnist.jobs import FoldJob
from aemnist.layout import Layout
from aemnist.runtime import parallel_workers, resolve_device, with_resolved_device
from aemnist.schemas import TableRef
from aemnist.training import DEFAULT_OPTIONS

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def test_cpu_is_always_usable() -> None:
    assert resolve_device("cpu") == "cpu"


@no_gpu
def test_auto_falls_back_to_the_cpu_where_torch_sees_no_gpu() -> None:
    config = with_resolved_device(load_config("smoke", overrides=run_overrides(device="auto")))

    assert config.runtime.device == "cpu"


@no_gpu
def test_cuda_without_a_gpu_is_one_error_naming_the_field_and_the_fix() -> None:
    with pytest.raises(DeviceError, match=r"^runtime\.device is 'cuda' .*--device cpu"):
        resolve_device("cuda")


@no_gpu
def test_run_with_cuda_on_a_machine_without_a_gpu_stops_before_any_work(tmp_path: Path) -> None:
    workdir = tmp_path / "runs"

    result = run_cli(
        ["run", "--profile", "smoke", "--device", "cuda", "--workdir", str(workdir)],
        home=tmp_path / "home",
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "aemnist: error: runtime.device is 'cuda'" in result.stderr
    assert "--device cpu" in result.stderr
    assert not workdir.exists()


def test_gpu_tasks_share_the_gpu_by_the_configured_concurrency() -> None:
    assert parallel_workers(0, "cuda", gpu_concurrency=6) == 6
    assert parallel_workers(3, "cpu", gpu_concurrency=6) == 3


def _grid_key(device: str) -> tuple[FoldJob, str]:
    # The study as resolve_study would give it on a machine with that device.
    config = load_config("smoke", overrides=run_overrides(device=device))
    study = plan.Study(config, Layout(Path("/w")), 2, 1, 2, DEFAULT_OPTIONS)
    ref = TableRef(path="/w/data/mnist_train.parquet", sha256="ab" * 32, rows=3000)
    folds = TableRef(path="/w/folds.parquet", sha256="cd" * 32, rows=3000)
    upstream = {"download": [{"train": ref, "test": ref}], "folds": [folds]}
    job = plan.STAGES["grid"].jobs(study, upstream)[0]
    return job, stage_key("grid", job)


def test_a_gpu_result_is_keyed_apart_from_the_cpu_one() -> None:
    cpu_job, cpu_key = _grid_key("cpu")
    cuda_job, cuda_key = _grid_key("cuda")

    assert cpu_job.compute.device == "cpu" and cuda_job.compute.device == "cuda"
    assert cuda_key != cpu_key
