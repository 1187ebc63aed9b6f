"""Orchestration overhead: a study's wall time against the time its tasks spend computing.

Runs `aemnist run` (smoke profile unless told otherwise) on a fresh work dir, then again on
the same work dir (everything cached), each as a user would from a shell. A task's compute
is its MLflow nested run (from its start to its end); tasks that ran side by side count once
(the union of their intervals). Overhead = wall time - compute: process start and imports,
Prefect's temporary server, task submission, states, result persistence.

    python bench/overhead.py [--profile smoke] [--prefect-home DIR]

The fresh run's temporary Prefect server opens Prefect's database in PREFECT_HOME (creating
and migrating it in a new home, as on a user's very first run); the re-run reuses it.
--prefect-home sets PREFECT_HOME (default: a new temporary one).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, machine, mirror, result, scratch
from mlflow import MlflowClient

from aemnist.tracking import EXPERIMENT, embedded_tracking_uri


def run_study(profile: str, workdir: Path, home: Path) -> float:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    env["PREFECT_HOME"] = str(home)
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--profile", profile, "--workdir",
         str(workdir), "--mnist-mirror", str(mirror())],
        cwd=REPO_ROOT, env=env, check=True, capture_output=True,
    )  # fmt: skip
    return time.monotonic() - started


def compute_seconds(workdir: Path, parent_index: int) -> tuple[float, int, float]:
    """Union of the nested runs' intervals under one parent run, their count, and the
    parent run's own span (the flow's work, from opening the study to closing it)."""
    client = MlflowClient(embedded_tracking_uri(workdir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parents = client.search_runs(
        [experiment.experiment_id], "tags.profile != ''", order_by=["attributes.start_time ASC"]
    )
    parent = parents[parent_index]
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=1000,
    )
    intervals = sorted((r.info.start_time, r.info.end_time) for r in runs if r.info.end_time)
    covered, end = 0, 0
    for start, stop in intervals:
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    span = (parent.info.end_time - parent.info.start_time) / 1000
    return covered / 1000, len(runs), span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--prefect-home", type=Path)
    args = parser.parse_args()
    root = scratch()
    home = args.prefect_home or root / "prefect-home"
    workdir = root / "work"
    print(f"machine: {machine()}; profile {args.profile}")

    fresh = run_study(args.profile, workdir, home)
    compute, tasks, span = compute_seconds(workdir, 0)
    overhead = fresh - compute
    # Start-up and exit (imports, the temporary server, interpreter exit) are paid once a
    # run; what the flow adds around its tasks' compute is paid per task.
    fixed = fresh - span
    per_task = (span - compute) / max(tasks, 1)
    print(f"fresh run: wall {fresh:.1f} s, tasks computing {compute:.1f} s ({tasks} task runs), "
          f"overhead {overhead:.1f} s, {overhead / max(tasks, 1):.2f} s per task run")  # fmt: skip
    print(f"  of which start-up and exit {fixed:.1f} s; inside the flow {span - compute:.1f} s "
          f"around the tasks' compute: {per_task:.2f} s per task run")  # fmt: skip
    cached = run_study(args.profile, workdir, home)
    print(f"cached re-run (same work dir and Prefect home): wall {cached:.1f} s")
    result("overhead", overhead, "s", compute)


if __name__ == "__main__":
    main()
