"""Dask workers with no shared file system (issue 16, point 3): a scheduler and two workers
started from Dask's own command line as another Unix user (nobody), who cannot read the
flow's work dir, each worker in folders of its own; the study reaches them only through its
servers and an object store (``--storage s3://...``).

The cluster (tests/dask_user.py) is proven by a cheap test that runs a plain Dask job on
it; the study runs on it with its tables in moto's S3 server (tests/s3_server.py) and its
MLflow artifacts there too, through `aemnist server --artifacts`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    REPO_ROOT,
    SMOKE,
    cli_env,
    grid_names,
    nested_runs,
    run_cli,
    smoke_parents,
    smoke_run,
)
from dask_user import NOBODY, WORKERS, OtherUserCluster, other_user_cluster, run_on
from s3_server import S3Server

from deployments.dask_workers import PROBE_PREFIX, check_workers_see_workdir

pytest.importorskip("distributed", reason="the Dask tests need the [dask] extra")


@pytest.fixture(scope="module")
def plain_cluster() -> Iterator[OtherUserCluster]:
    """The other user's cluster with no server or store to reach."""
    with other_user_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def other_machines() -> Iterator[tuple[OtherUserCluster, Path]]:
    """The other user's cluster whose workers each see an empty folder of their own where
    this process has its folder (returned beside it): as on machines of their own, with no
    shared file system."""
    flow_folder = Path(tempfile.mkdtemp(prefix="aemnist-flow-"))
    try:
        with other_user_cluster(own_view_of=(flow_folder,)) as cluster:
            yield cluster, flow_folder
    finally:
        shutil.rmtree(flow_folder)


def worker_facts() -> Callable[[str, str], dict[str, Any]]:
    """A function, sent to a worker by value (cloudpickle pickles a nested function whole;
    this test module is not importable there), that says who runs it, from where, with what
    Python and packages, and what it can read of ``workdir`` and ``mirror``."""

    def facts(workdir: str, mirror: str) -> dict[str, Any]:
        import importlib
        import os
        import sys

        from distributed import get_worker

        worker = get_worker()

        def reads(action: Callable[[], object]) -> str:
            try:
                action()
            except PermissionError:
                return "PermissionError"
            return "read"

        def read_file(path: str) -> bytes:
            with open(path, "rb") as file:
                return file.read(16)

        mirror_file = os.path.join(mirror, "t10k-labels-idx1-ubyte.gz")
        modules = "aemnist tasks flows deployments prefect torch mlflow prefect_dask".split()
        return {
            "ids": (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()),
            "address": worker.address,
            "name": worker.name,
            "local_directory": worker.local_directory,
            "home": os.environ.get("HOME"),
            "version": sys.version,
            "modules": {name: importlib.import_module(name).__file__ for name in modules},
            "list workdir": reads(lambda: os.listdir(workdir)),
            "read workdir file": reads(lambda: read_file(os.path.join(workdir, "secret.txt"))),
            "read mirror": reads(lambda: read_file(mirror_file)),
        }

    return facts


def test_the_other_users_workers_cannot_read_the_work_dir_and_run_the_projects_code(
    tmp_path: Path, mnist_mirror: Path, plain_cluster: OtherUserCluster
) -> None:
    from distributed import Client

    # The flow's work dir, as `aemnist run` makes it: root's, 0700, with a file in it.
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o700)
    (workdir / "secret.txt").write_text("the flow's\n")
    assert os.stat(workdir).st_uid == 0 and (workdir.stat().st_mode & 0o777) == 0o700

    cluster = plain_cluster
    assert set(cluster.workers) == set(WORKERS)
    with Client(cluster.address, timeout=60) as client:
        seen = {
            name: run_on(client, address, worker_facts(), str(workdir), str(mnist_mirror))
            for name, address in cluster.workers.items()
        }
    packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    for name, facts in seen.items():
        assert isinstance(facts, dict)
        assert facts["name"] == name and facts["address"] == cluster.workers[name]
        # The other user, with no group of root's.
        assert facts["ids"] == (NOBODY, NOBODY, NOBODY, NOBODY, []), (name, facts["ids"])
        # In folders of its own, not the other worker's.
        own = cluster.folders[name]
        assert Path(facts["local_directory"]).is_relative_to(own.local), facts
        assert facts["home"] == str(own.home)
        assert own.root.stat().st_uid == NOBODY and (own.root.stat().st_mode & 0o777) == 0o700
        # The flow's work dir is out of its reach...
        assert facts["list workdir"] == "PermissionError", facts
        assert facts["read workdir file"] == "PermissionError", facts
        # ...while it runs the test's Python, the tree under test and the venv's packages.
        assert facts["version"] == sys.version, (facts["version"], cluster.runtime)
        modules = {module: Path(path).resolve() for module, path in facts["modules"].items()}
        for package in ("aemnist", "tasks", "flows", "deployments"):
            assert modules[package] == (cluster.runtime.code / package / "__init__.py").resolve()
        for package in ("prefect", "torch", "mlflow", "prefect_dask"):
            assert modules[package].is_relative_to(packages), (package, modules[package])
    assert seen["worker-0"]["local_directory"] != seen["worker-1"]["local_directory"]


def assert_refused_before_any_work(
    tmp_path: Path, mnist_mirror: Path, cluster: OtherUserCluster, workdir: Path, why: str
) -> None:
    """`aemnist run` on ``cluster`` with ``workdir`` stops in one line that names every
    worker and ``why`` it cannot use the work dir, before any task or MLflow run."""
    address = cluster.address
    result = run_cli(
        smoke_run(workdir, mnist_mirror, "--task-runner", "dask", "--dask-address", address),
        home=tmp_path / "home",
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"aemnist: error: 2 of 2 workers of the Dask cluster at {address} do not share the "
        f"work dir {workdir} ("
    ), lines[0]
    assert all(f"{worker}: {why}" in lines[0] for worker in cluster.workers.values()), lines[0]
    assert "--storage URL" in lines[0]
    # Nothing was tracked or computed, and the probe is gone.
    assert not (workdir / "mlflow.db").exists() and not (workdir / "data").exists()
    assert not list(workdir.glob(f"{PROBE_PREFIX}*"))


def test_a_run_on_workers_that_cannot_read_the_work_dir_stops_before_any_work(
    tmp_path: Path, mnist_mirror: Path, plain_cluster: OtherUserCluster
) -> None:
    # Without the check, the download task fails on a worker with a PermissionError, after
    # the servers started and the flow run began.
    workdir = tmp_path / "work"
    assert_refused_before_any_work(tmp_path, mnist_mirror, plain_cluster, workdir,
                                   "PermissionError")  # fmt: skip


def test_a_run_on_workers_with_a_folder_of_their_own_at_the_work_dir_stops_before_any_work(
    tmp_path: Path, mnist_mirror: Path, other_machines: tuple[OtherUserCluster, Path]
) -> None:
    # Without the check, the download "succeeds" on one worker, into its own folder, and the
    # folds task on the other finds no table.
    cluster, flow_folder = other_machines
    workdir = flow_folder / "work"
    assert_refused_before_any_work(tmp_path, mnist_mirror, cluster, workdir,
                                   "FileNotFoundError")  # fmt: skip


def test_workers_that_share_the_work_dir_pass_the_check_and_leave_no_probe(
    plain_cluster: OtherUserCluster,
) -> None:
    # A folder the other user reads and writes: on a real cluster, a shared file system
    # mounted by the same user everywhere.
    shared = Path(tempfile.mkdtemp(prefix="aemnist-shared-"))
    try:
        os.chown(shared, NOBODY, NOBODY)
        assert check_workers_see_workdir(plain_cluster.address, None, shared) == len(WORKERS)
        assert not list(shared.glob(f"{PROBE_PREFIX}*"))
    finally:
        shutil.rmtree(shared)


@contextmanager
def study_servers(root: Path, aws: dict[str, str], artifacts: str) -> Iterator[dict[str, str]]:
    """`aemnist server` (Prefect and MLflow, loopback, free ports) in ``root``, its MLflow
    artifacts at ``artifacts`` (an object store, ``aws`` its environment): the variables that
    point a run and the Dask workers at it. The workers reach both over HTTP (MLflow's
    artifacts through its proxy), never the servers' work dir."""
    env = cli_env(root / "server-home", aws)
    log = root / "server.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "server", "--workdir", str(root / "server-work"),
             "--prefect-port", "0", "--mlflow-port", "0", "--artifacts", artifacts],
            cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops both servers" not in (output := log.read_text(errors="replace")):
            assert server.poll() is None and time.monotonic() < deadline, output[-4000:]
            time.sleep(0.5)
        yield {
            "PREFECT_API_URL": re.search(r"export PREFECT_API_URL=(\S+)", output).group(1),
            "MLFLOW_TRACKING_URI": re.search(r"export MLFLOW_TRACKING_URI=(\S+)", output).group(1),
        }
    finally:
        server.send_signal(signal.SIGTERM)  # stops both servers (test_production_e2e)
        server.wait(60)


# The files of a study that the stages hand each other (what --storage moves to the store).
STAGE_FILES = ("*.parquet", "*.sha256", "*.pt", "*.png", "*.md", "*.json")


def test_dask_workers_without_the_work_dir_run_the_smoke_study_from_s3(
    tmp_path: Path, mnist_mirror: Path, s3_server: S3Server, smoke_workdir: tuple[Path, Any]
) -> None:
    from distributed import Client
    from mlflow import MlflowClient

    bucket = s3_server.make_bucket("aemnist-dask")
    store, artifacts = f"{bucket}/study", f"{bucket}/mlflow"
    workdir = tmp_path / "work"
    with (
        study_servers(tmp_path, s3_server.env, artifacts) as servers,
        other_user_cluster({**servers, **s3_server.env}) as cluster,
    ):
        # The workers are the other user and cannot read the flow's work dir (made now as
        # `aemnist run` makes it: root's, 0700), yet read the mirror the download stage reads.
        workdir.mkdir(mode=0o700)
        (workdir / "secret.txt").write_text("the flow's\n")
        with Client(cluster.address, timeout=60) as client:
            for address in cluster.workers.values():
                facts = run_on(client, address, worker_facts(), str(workdir), str(mnist_mirror))
                assert facts["ids"][:2] == (NOBODY, NOBODY), facts  # type: ignore[index]
                assert facts["list workdir"] == "PermissionError", facts  # type: ignore[index]
                assert facts["read mirror"] == "read", facts  # type: ignore[index]
        (workdir / "secret.txt").unlink()
        result = run_cli(
            smoke_run(workdir, mnist_mirror, "--task-runner", "dask", "--dask-address",
                      cluster.address, "--storage", store),
            home=tmp_path / "home",
            env={**servers, **s3_server.env},
        )  # fmt: skip
        assert result.returncode == 0, (
            result.stdout[-3000:] + result.stderr[-3000:] + cluster.log_tail()
        )
        assert workdir.stat().st_uid == 0 and (workdir.stat().st_mode & 0o777) == 0o700

        # Every fold (and sweep size) ran on one of the two workers, and both took some.
        client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
        parent = smoke_parents(client)[-1]
        assert parent.info.status == "FINISHED"
        runs = nested_runs(client, parent.info.run_id)
        workers = set(cluster.workers.values())
        ran_on = {name: runs[name].data.tags.get("dask.worker") for name in grid_names()}
        assert set(ran_on.values()) == workers, ran_on
        for size in SMOKE.sweep.sizes:
            assert runs[f"sweep size={size}"].data.tags.get("dask.worker") in workers

        # Every file the stages hand each other is in the bucket, where a local run of the
        # same study has it in its work dir...
        local_run = smoke_workdir[0]
        expected = {
            str(path.relative_to(local_run))
            for pattern in STAGE_FILES
            for path in local_run.rglob(pattern)
            if "mlartifacts" not in path.parts and "server" not in path.parts
        }
        stored = {key.removeprefix("study/") for key in s3_server.keys("aemnist-dask", "study/")}
        assert expected <= stored, sorted(expected - stored)
        # ...and none is on the local file system: no file of the flow's work dir or of a
        # worker's own folders has the name of a stored one (a worker's Matplotlib font
        # cache, say, is its own).
        names = {Path(name).name for name in stored}
        for folder in (workdir, *(f.root for f in cluster.folders.values())):
            left = [p for p in folder.rglob("*") if p.is_file() and p.name in names]
            assert not left, left
        # The runs' MLflow artifacts went through the server's proxy to its destination in
        # the bucket (`aemnist server --artifacts`): the report the study logged, say.
        logged = s3_server.keys("aemnist-dask", "mlflow/")
        prefix = f"mlflow/{parent.info.experiment_id}/"
        assert any(
            key.startswith(prefix) and key.endswith("/artifacts/report.md") for key in logged
        ), logged[:20]
        assert client.get_experiment(parent.info.experiment_id).artifact_location.startswith(
            "mlflow-artifacts:"
        )
