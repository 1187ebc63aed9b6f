"""Orchestration overhead: a study's wall time through Prefect and MLflow against the same
work done by the library calls alone.

Two programs, each started from the shell as a fresh interpreter (the same process setup),
on a fresh work dir, the same profile and device, taking turns ``--rounds`` times (the order
reversed every other round):

- the flow: `aemnist run --profile P --device D`, then again on the same work dir
  (everything cached);
- the library: this script's ``--library-run`` mode, which makes the calls the study's
  tasks make (bench/gpu.py's driver: download, folds, grid, Table 1, sweep, Table 2, final
  model, corruption, embedding, with the workers and torch threads the flow resolves) and
  then the report, with no Prefect and no MLflow imported; it times each library call.

"Compute" is the time some library call is running in the library program (the union of
their intervals; calls side by side count once), measured without MLflow logging or Prefect.
Printed, each as the median with its [min, max] over the rounds: the flow's wall, the library
program's wall, compute, the overhead (flow wall - compute) and what Prefect and MLflow add
to the same program (flow wall - library program's wall); and, for reference, the span the
flow's MLflow task runs cover (compute plus each task's logging).

    python bench/overhead.py [--profile smoke] [--device cpu] [--rounds 3] [--prefect-home DIR]

The flow's temporary Prefect server opens Prefect's database in PREFECT_HOME. A new home
(the default: a temporary one) is migrated before the first round, so that every round
finds it ready; --prefect-home reuses one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, announce, mirror, result, scratch, spread


def clean_env(home: Path) -> dict[str, str]:
    """This environment without a server of the user's: each run starts its own."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    env["PREFECT_HOME"] = str(home)
    return env


def timed_run(command: list[str], env: dict[str, str], what: str) -> float:
    """Wall seconds of ``command`` from the shell; its last lines of errors if it fails."""
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench/overhead.py: {what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def flow_run(profile: str, device: str, workdir: Path, home: Path) -> float:
    command = [
        sys.executable, "-m", "flows.cli", "run", "--profile", profile, "--device", device,
        "--workdir", str(workdir), "--mnist-mirror", str(mirror()),
    ]  # fmt: skip
    return timed_run(command, clean_env(home), "aemnist run")


def library_run(profile: str, device: str, workdir: Path, home: Path) -> tuple[float, dict]:
    """The library program's wall from the shell, and what it measured inside."""
    out = workdir.with_suffix(".json")
    command = [
        sys.executable, str(Path(__file__).resolve()), "--library-run", str(workdir),
        "--profile", profile, "--device", device, "--out", str(out),
    ]  # fmt: skip
    wall = timed_run(command, clean_env(home), "the library run")
    return wall, json.loads(out.read_text())


def union(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one interval: tasks side by side count once."""
    covered, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            covered += stop - max(start, end)
            end = stop
    return covered


def mlflow_span(workdir: Path) -> tuple[float, int]:
    """The union of the study's MLflow task runs (compute and each task's logging) and their
    count: what this bench called compute before it timed the library calls alone."""
    from mlflow import MlflowClient

    from aemnist.tracking import EXPERIMENT, embedded_tracking_uri

    client = MlflowClient(embedded_tracking_uri(workdir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([experiment.experiment_id], "tags.profile != ''")[0]
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        max_results=1000,
    )
    spans = [(r.info.start_time / 1000, r.info.end_time / 1000) for r in runs if r.info.end_time]
    return union(spans), len(runs)


def library_only(workdir: Path, profile: str, device: str, out: Path) -> None:
    """The study through its library calls alone, timed per call (no Prefect, no MLflow)."""
    import time as clock

    from gpu import PaperRun

    from aemnist.config import load_config, run_overrides
    from aemnist.report import StudyRun, build_report

    config = load_config(profile, overrides=run_overrides(device=device))
    run = PaperRun(workdir, config)
    run.run()
    began = clock.perf_counter()
    # The flow's report task renders the same file and figures; its run id is a placeholder.
    build_report(run.layout, run.config, run=StudyRun("0" * 32, "0"))
    run.calls.append((began, clock.perf_counter()))
    leaked = sorted(m for m in ("prefect", "mlflow") if m in sys.modules)
    if leaked:
        sys.exit(f"bench/overhead.py: the library run imported {', '.join(leaked)}")
    out.write_text(json.dumps({"compute": union(run.calls), "calls": len(run.calls)}))


def migrate(home: Path) -> None:
    """Create and migrate Prefect's database in a new PREFECT_HOME once, before the rounds."""
    command = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    seconds = timed_run(command, clean_env(home), "migrating Prefect's database")
    print(f"Prefect's database in the new PREFECT_HOME migrated in {seconds:.1f} s (not counted)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--prefect-home", type=Path, help="PREFECT_HOME (default: a new one)")
    parser.add_argument("--library-run", type=Path, metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library_run:
        library_only(args.library_run, args.profile, args.device, args.out)
        return
    announce(args.device)
    root = scratch()
    home = args.prefect_home or root / "prefect-home"
    if args.prefect_home is None:
        migrate(home)
    figures: dict[str, list[float]] = {
        k: []
        for k in ("flow", "cached", "library", "compute", "overhead", "added", "mlflow", "tasks")
    }
    for round_ in range(args.rounds):
        order = ("flow", "library") if round_ % 2 == 0 else ("library", "flow")
        for which in order:
            workdir = root / f"{which}-{round_}"
            if which == "flow":
                figures["flow"].append(flow_run(args.profile, args.device, workdir, home))
                span, tasks = mlflow_span(workdir)
                figures["mlflow"].append(span)
                figures["tasks"].append(tasks)
                figures["cached"].append(flow_run(args.profile, args.device, workdir, home))
            else:
                wall, inside = library_run(args.profile, args.device, workdir, home)
                figures["library"].append(wall)
                figures["compute"].append(inside["compute"])
        figures["overhead"].append(figures["flow"][-1] - figures["compute"][-1])
        figures["added"].append(figures["flow"][-1] - figures["library"][-1])
        print(
            f"round {round_ + 1}: flow {figures['flow'][-1]:.1f} s (cached re-run "
            f"{figures['cached'][-1]:.1f} s), library program {figures['library'][-1]:.1f} s, "
            f"compute {figures['compute'][-1]:.1f} s",
            flush=True,
        )
    tasks = int(statistics.median(figures["tasks"]))
    per_task = [o / tasks for o in figures["overhead"]]
    print(f"\n{args.profile} profile on {args.device}, seconds, median [min, max] over "
          f"{args.rounds} rounds:")  # fmt: skip
    lines = (
        ("flow, fresh work dir (aemnist run)", "flow"),
        ("flow, cached re-run", "cached"),
        ("library calls alone, whole program", "library"),
        ("compute (library calls running)", "compute"),
        ("overhead: flow - compute", "overhead"),
        ("Prefect and MLflow: flow - library program", "added"),
        (f"flow's MLflow task runs ({tasks}) cover", "mlflow"),
    )
    for label, key in lines:
        print(f"  {label:44s} {spread(figures[key], 1)}")
    print(f"  {f'overhead per task run ({tasks})':44s} {spread(per_task, 2)}")
    result(
        "overhead",
        statistics.median(figures["overhead"]),
        "s",
        statistics.median(figures["compute"]),
    )


if __name__ == "__main__":
    main()
