"""Running the ``aemnist`` command line as a user would, and reading what it tracked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from aemnist.config import load_config
from aemnist.tracking import EXPERIMENT

REPO_ROOT = Path(__file__).parents[1]
SMOKE = load_config("smoke")


def grid_names() -> set[str]:
    """The smoke study's grid task (and nested run) names."""
    return {
        f"grid lr={lr:g} wd={wd:g} fold={fold}"
        for lr in SMOKE.grid.learning_rates
        for wd in SMOKE.grid.weight_decays
        for fold in range(SMOKE.grid.folds)
    }


def expected_task_runs() -> set[str]:
    """Every nested run of a smoke study but the final model's (named by its size)."""
    return (
        {"download", "folds", "grid summary", "sweep summary", "corruption", "embedding", "report"}
        | grid_names()
        | {f"sweep size={s}" for s in SMOKE.sweep.sizes}
    )


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def smoke_run(workdir: Path, mirror: Path, *extra: str) -> list[str]:
    """`aemnist run` of the smoke profile on ``workdir``, MNIST from ``mirror``."""
    return ["run", "--profile", "smoke", "--workdir", str(workdir), "--mnist-mirror", str(mirror),
            *extra]  # fmt: skip


def cli_env(home: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment less what points at servers or injects faults, with
    its own Prefect home and ``env`` on top."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AEMNIST_FAULT")
    }
    full_env.update({"PREFECT_HOME": str(home), **(env or {})})
    return full_env


def run_cli(
    args: list[str], home: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> CliResult:
    full_env = cli_env(home, env)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def nested_runs(client: MlflowClient, parent_id: str) -> dict[str, object]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no {EXPERIMENT!r} experiment in {client.tracking_uri}"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=1000,
    )
    return {run.info.run_name: run for run in runs}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
