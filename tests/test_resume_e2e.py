"""Re-running only what is unfinished, end to end through the CLI and Prefect: cached
re-runs, narrow invalidation, failure isolation, damaged tables, refresh, kill -9 and
resume, and the errors that must come before any training."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_helpers import REPO_ROOT, nested_runs, refused_port, run_cli, smoke_parents, smoke_run
from mlflow import MlflowClient

from aemnist import plan
from aemnist.config import load_config
from aemnist.faults import pause_marker
from aemnist.layout import Layout
from aemnist.schemas import read_frame
from aemnist.tracking import EXPERIMENT, embedded_tracking_uri

SMOKE = load_config("smoke")
GRID = plan.STAGES["grid"].labels(SMOKE)
TRAINING_STAGES = ("grid", "sweep", "final")


class Study:
    """A smoke study at one fixed path (cache keys include the work dir), restorable to the
    state right after its first complete run."""

    def __init__(self, root: Path, mirror: Path) -> None:
        self.workdir = root / "study"
        self.pristine = root / "pristine"
        self.home = root / "prefect-home"
        self.mirror = mirror

    def run(self, *args: str, env: dict[str, str] | None = None):  # noqa: ANN201
        return run_cli(smoke_run(self.workdir, self.mirror, *args), home=self.home, env=env)

    def restore(self) -> None:
        # mlflow.db is overwritten in place: this process's MLflow client keeps its SQLite
        # connection open, and a replaced file would leave it reading the old one.
        for item in self.workdir.iterdir():
            if item.name != "mlflow.db":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        for item in self.pristine.iterdir():
            if item.is_dir():
                shutil.copytree(item, self.workdir / item.name)
            else:
                shutil.copyfile(item, self.workdir / item.name)

    def client(self) -> MlflowClient:
        return MlflowClient(embedded_tracking_uri(self.workdir))

    def parents(self) -> list:
        return smoke_parents(self.client())

    def ran(self, parent) -> dict:  # noqa: ANN001
        """The tasks that ran (opened a nested run) in the study of ``parent``."""
        return nested_runs(self.client(), parent.info.run_id)


def stage_tables(workdir: Path) -> dict[Path, bytes]:
    """Every stage table (not the copies logged to MLflow's artifact store)."""
    return {
        p: p.read_bytes()
        for p in workdir.rglob("*.parquet")
        if "mlartifacts" not in p.relative_to(workdir).parts
    }


def trained(runs: dict) -> list[str]:
    return sorted(
        name for name, run in runs.items() if run.data.tags.get("stage") in TRAINING_STAGES
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Study:
    s = Study(tmp_path_factory.mktemp("resume"), mnist_mirror)
    first = s.run()
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(s.workdir, s.pristine)
    return s


def test_second_run_trains_nothing_and_gives_the_same_report(study: Study) -> None:
    study.restore()
    report = (study.workdir / "report.md").read_bytes()
    tables = stage_tables(study.workdir)
    again = study.run()
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = study.parents()
    # Only the download (which checks its verified tables) opens a run; every other task is
    # reused and linked, by tag, to the run that produced it.
    assert list(study.ran(second)) == ["download"]
    assert study.ran(second)["download"].data.tags["fetched"] == "False"
    links = {k: v for k, v in second.data.tags.items() if k.startswith("reused.")}
    produced = {run.info.run_id for run in study.ran(first).values()}
    assert len(links) == 15 and set(links.values()) <= produced
    assert "[grid] 6/6 results reused from earlier runs" in again.stderr + again.stdout
    assert (study.workdir / "report.md").read_bytes() == report
    assert stage_tables(study.workdir) == tables
    print(f"fully cached smoke re-run: {again.seconds:.1f} s")


def task_states(status_output: str) -> dict[str, str]:
    """``aemnist status`` lines (stage, label, state, detail) as label -> state."""
    rows = [
        re.split(r"\s{2,}", line.strip())
        for line in status_output.splitlines()
        if line.startswith("  ")
    ]
    return {row[1]: row[2] for row in rows}


def test_status_lists_every_task_of_the_config(study: Study) -> None:
    study.restore()
    result = run_cli(
        ["status", "--profile", "smoke", "--workdir", str(study.workdir)], home=study.home
    )
    assert result.returncode == 0, result.stderr
    assert "16 tasks: 15 cached, 1 done; a re-run computes 0." in result.stdout
    states = task_states(result.stdout)
    assert states["download"] == "done"
    assert all(states[label] == "cached" for label in GRID + ["sweep size=8", "report"])
    # Another config: the grid is still reusable, the sweep and what follows are not.
    config = study.workdir.parent / "longer-sweep.toml"
    config.write_text("[sweep]\nepochs = 3\n")
    result = run_cli(
        ["status", "--config", str(config), "--profile", "smoke", "--workdir", str(study.workdir)],
        home=study.home,
    )
    states = task_states(result.stdout)
    assert all(states[label] == "cached" for label in GRID + ["grid summary"])
    assert states["sweep size=4"] == states["sweep size=8"] == "pending"
    assert states["report"] == "pending"


def test_changing_the_sweep_reruns_only_the_sweep_and_what_follows(study: Study) -> None:
    study.restore()
    config = study.workdir.parent / "sweep3.toml"
    config.write_text("[sweep]\nepochs = 3\n")
    result = study.run("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = study.ran(study.parents()[-1])
    assert not any(name.startswith("grid") or name == "folds" for name in runs)
    assert {"sweep size=4", "sweep size=8", "sweep summary"} <= set(runs)


def test_failed_fold_fails_the_flow_and_the_rerun_trains_only_it(
    tmp_path: Path, mnist_tables
) -> None:
    workdir = tmp_path / "work"
    # Verified MNIST tables already there: the download must fetch nothing (no mirror given).
    shutil.copytree(Path(mnist_tables["train"].path).parent, workdir / "data")
    failing = "grid lr=0.005 wd=1e-05 fold=1"
    args = ["run", "--profile", "smoke", "--workdir", str(workdir)]
    env = {"AEMNIST_MNIST_MIRROR": str(tmp_path / "no-such-mirror")}
    result = run_cli(
        args,
        tmp_path / "home",
        env={**env, "AEMNIST_FAULT": "grid:lr=0.005,weight_decay=1e-05,fold=1"},
    )
    assert result.returncode == 1
    assert f"grid: 1 of 6 tasks failed: {failing}" in result.stderr
    # The line names the cause too (on a Dask worker it is otherwise in that worker's log).
    (last,) = [line for line in result.stderr.splitlines() if line.startswith("aemnist: error:")]
    assert f"({failing}: " in last and "AEMNIST_FAULT" in last, last

    client = MlflowClient(embedded_tracking_uri(workdir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([experiment.experiment_id], "tags.profile = 'smoke'")[0]
    assert parent.info.status == "FAILED"
    runs = nested_runs(client, parent.info.run_id)
    assert runs["download"].data.tags["fetched"] == "False"
    assert runs[failing].info.status == "FAILED"
    assert "AEMNIST_FAULT" in runs[failing].data.tags["error"]
    assert all(runs[name].info.status == "FINISHED" for name in GRID if name != failing)
    assert "grid summary" not in runs and not (workdir / "report.md").exists()

    status = run_cli(["status", "--profile", "smoke", "--workdir", str(workdir)], tmp_path / "home")
    states = task_states(status.stdout)
    assert states[failing] == "failed"
    assert [states[name] for name in GRID].count("cached") == 5
    assert states["grid summary"] == "pending"

    rerun = run_cli(args, tmp_path / "home", env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    latest = client.search_runs(
        [experiment.experiment_id], "tags.profile = 'smoke'", order_by=["attribute.start_time DESC"]
    )[0]
    ran = nested_runs(client, latest.info.run_id)
    grid_trained = [name for name in trained(ran) if name.startswith("grid")]
    assert grid_trained == [failing]
    assert "folds" not in ran
    assert (workdir / "report.md").exists()


def test_damaged_table_is_detected_and_only_its_task_recomputed(study: Study) -> None:
    study.restore()
    damaged = study.workdir / "grid" / "lr=0.01_wd=1e-05_fold=0.parquet"
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])
    result = study.run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{damaged}: damaged" in result.stderr + result.stdout
    runs = study.ran(study.parents()[-1])
    # Training is deterministic: the recomputed table is byte-identical, so every task
    # downstream of it is still reused.
    assert trained(runs) == ["grid lr=0.01 wd=1e-05 fold=0"]
    assert damaged.read_bytes() == good


def test_refresh_recomputes_a_stage_and_what_follows(study: Study) -> None:
    study.restore()
    result = study.run("--refresh", "corruption")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(study.ran(study.parents()[-1])) == {"download", "corruption", "report"}


def test_kill_9_mid_sweep_resumes_from_the_last_finished_epoch(study: Study) -> None:
    study.restore()
    config = study.workdir.parent / "sweep6.toml"
    config.write_text("[sweep]\nepochs = 6\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "AEMNIST_FAULT")}
    env["PREFECT_HOME"] = str(study.home)
    # Sweep size 8 pauses for good once epoch 3 is trained, checkpointed and logged, and says
    # so: killed then, its last checkpoint is epoch 3's for certain, however fast the
    # remaining epochs would have been.
    env["AEMNIST_FAULT"] = "pause:sweep:size=8,epoch=3"
    paused = pause_marker("sweep", epoch=3, size=8)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--profile",
            "smoke",
            "--config",
            str(config),
            "--workdir",
            str(study.workdir),
            "--mnist-mirror",
            str(study.mirror),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
            os.killpg(proc.pid, signal.SIGKILL)

    seen: list[str] = []
    # A safety net, not the synchronisation: should the marker never come, the run is killed
    # after 5 minutes, which ends its output and the loop below; the test then fails.
    safety_net = threading.Timer(300, kill)
    safety_net.start()
    try:
        for line in proc.stdout:
            seen.append(line)
            if paused in line:
                break
    finally:
        safety_net.cancel()
        kill()
        proc.wait()
    output = "".join(seen)
    assert paused in output, output[-4000:]
    assert "sweep size=8 epoch 3/6 trained" in output
    assert "sweep size=8 epoch 4/6" not in output
    checkpoint = study.workdir / "checkpoints" / "sweep_size=8.pt"
    assert checkpoint.exists()
    from aemnist.training import load_training_state

    state = load_training_state(checkpoint)
    assert state is not None and [int(row[0]) for row in state["history"]] == [1, 2, 3]

    result = study.run("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "sweep size=8 epoch 3/6 restored from checkpoint" in output
    assert "sweep size=8 epoch 4/6 trained" in output
    assert "sweep size=8 epoch 1/6 trained" not in output
    assert "marked KILLED" in output
    killed, resumed = study.parents()[-2:]
    assert study.client().get_run(killed.info.run_id).info.status == "KILLED"
    assert resumed.info.status == "FINISHED"
    assert not (study.workdir / "checkpoints" / "sweep_size=8.pt").exists()


def test_unreachable_tracking_server_stops_the_run_before_training(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    with refused_port() as port:
        server = f"http://127.0.0.1:{port}"
        result = run_cli(
            ["run", "--profile", "smoke", "--workdir", str(workdir)],
            tmp_path / "home",
            env={"MLFLOW_TRACKING_URI": server},
        )
    assert result.returncode == 2
    assert f"MLflow tracking server {server} is unreachable" in result.stderr
    assert "MLFLOW_TRACKING_URI" in result.stderr and "Traceback" not in result.stderr
    assert not (workdir / "grid").exists() and not (workdir / "data").exists()


def test_read_only_workdir_gives_one_clear_error_and_keeps_its_files(
    study: Study, tmp_path: Path
) -> None:
    readonly = tmp_path / "readonly"
    shutil.copytree(study.pristine, readonly)
    before = {p: p.read_bytes() for p in readonly.rglob("*") if p.is_file()}
    subprocess.run(["mount", "--bind", str(readonly), str(readonly)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(readonly)], check=True)
        result = run_cli(
            ["run", "--profile", "smoke", "--workdir", str(readonly)], tmp_path / "home"
        )
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert result.returncode == 2
    assert f"work dir {readonly} is not writable (Read-only file system)" in result.stderr
    assert {p: p.read_bytes() for p in readonly.rglob("*") if p.is_file()} == before


def test_fresh_recomputes_every_task_to_the_same_tables(study: Study) -> None:
    study.restore()
    tables = stage_tables(study.workdir)
    result = study.run("--fresh")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = study.ran(study.parents()[-1])
    best = read_frame(Layout(study.workdir).sweep_summary, "sweep_summary")["size"].iloc[0]
    assert len(runs) == 16 and trained(runs) == sorted(
        GRID + ["sweep size=4", "sweep size=8", f"final size={best}"]
    )
    assert runs["download"].data.tags["fetched"] == "True"
    assert stage_tables(study.workdir) == tables
