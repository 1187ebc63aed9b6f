"""Dask workers with no shared file system (issue 16, point 3): a scheduler and two workers
started from Dask's own command line as another Unix user (nobody), who cannot read the
flow's work dir, each worker in folders of its own; the study reaches them only through its
servers and an object store (``--storage s3://...``).

The cluster (tests/dask_user.py) is proven by a cheap test that runs a plain Dask job on
it; the study runs on it with its tables in moto's S3 server (tests/s3_server.py) and its
MLflow artifacts there too, through `aemnist server --artifacts`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    REPO_ROOT,
    SMOKE,
    CliResult,
    cli_env,
    grid_names,
    nested_runs,
    run_cli,
    smoke_parents,
    smoke_run,
)
from dask_user import NOBODY, WORKERS, OtherUserCluster, other_user_cluster, run_on
from s3_server import S3Server, without_aws

from aemnist import plan
from aemnist.tracking import EXPERIMENT
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
BUCKET = "aemnist-dask"
STORE, ARTIFACTS = f"s3://{BUCKET}/study", f"s3://{BUCKET}/mlflow"
FOLD0 = "grid/lr=0.01_wd=1e-05_fold=0.parquet"
PAYLOAD = "aemnist artifact through the server\n"


@dataclass
class OnWorkers:
    """The smoke study run once on the other user's Dask workers with its tables in the
    bucket (``first``); the servers stay up for the module's re-runs, which run in threads
    here on the same work dir and store, as a user re-running on one machine would."""

    workdir: Path
    home: Path
    mirror: Path
    s3: S3Server
    servers: dict[str, str]
    first: CliResult
    workers: set[str]  # the two workers' addresses
    facts: list[dict[str, Any]]  # what each worker could do (worker_facts)
    left_on_workers: list[Path]  # files in the workers' own folders named as stored ones

    def run(self, *args: str) -> CliResult:
        return run_cli(
            smoke_run(self.workdir, self.mirror, "--storage", STORE, *args),
            home=self.home,
            env={**self.servers, **self.s3.env},
        )

    def stored(self) -> dict[str, bytes]:
        """Every object of the study in the bucket, by its name there."""
        keys = self.s3.keys(BUCKET, "study/")
        return {key.removeprefix("study/"): self.s3.read(BUCKET, key) for key in keys}

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.servers["MLFLOW_TRACKING_URI"])

    def ran(self, parent: Any) -> dict[str, Any]:
        return nested_runs(self.client(), parent.info.run_id)

    def parents(self) -> list[Any]:
        return sorted(smoke_parents(self.client()), key=lambda run: run.info.start_time)


@pytest.fixture(scope="module")
def on_workers(
    tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path, s3_server: S3Server
) -> Iterator[OnWorkers]:
    from distributed import Client

    root = tmp_path_factory.mktemp("dask-s3")
    s3_server.make_bucket(BUCKET)
    workdir = root / "work"
    with study_servers(root, s3_server.env, ARTIFACTS) as servers:
        with other_user_cluster({**servers, **s3_server.env}) as cluster:
            # The flow's work dir, made as `aemnist run` makes it (root's, 0700): what can
            # the workers do with it, and with the mirror the download stage reads?
            workdir.mkdir(mode=0o700)
            (workdir / "secret.txt").write_text("the flow's\n")
            with Client(cluster.address, timeout=60) as client:
                facts = [
                    run_on(client, address, worker_facts(), str(workdir), str(mnist_mirror))
                    for address in cluster.workers.values()
                ]
            (workdir / "secret.txt").unlink()
            first = run_cli(
                smoke_run(workdir, mnist_mirror, "--task-runner", "dask", "--dask-address",
                          cluster.address, "--storage", STORE),
                home=root / "home",
                env={**servers, **s3_server.env},
            )  # fmt: skip
            assert first.returncode == 0, (
                first.stdout[-3000:] + first.stderr[-3000:] + cluster.log_tail()
            )
            names = {Path(key).name for key in s3_server.keys(BUCKET, "study/")}
            left = [
                path
                for folders in cluster.folders.values()
                for path in folders.root.rglob("*")
                if path.is_file() and path.name in names
            ]
            workers = set(cluster.workers.values())
        yield OnWorkers(
            workdir, root / "home", mnist_mirror, s3_server, servers, first, workers, facts, left
        )


def test_dask_workers_without_the_work_dir_run_the_smoke_study_from_s3(
    on_workers: OnWorkers, smoke_workdir: tuple[Path, Any]
) -> None:
    # The workers are the other user, cannot read the flow's work dir, read the mirror.
    for facts in on_workers.facts:
        assert facts["ids"][:2] == (NOBODY, NOBODY), facts
        assert facts["list workdir"] == "PermissionError", facts
        assert facts["read mirror"] == "read", facts
    workdir = on_workers.workdir
    assert workdir.stat().st_uid == 0 and (workdir.stat().st_mode & 0o777) == 0o700

    # Every fold (and sweep size) ran on one of the two workers, and both took some.
    (parent,) = on_workers.parents()[:1]
    assert parent.info.status == "FINISHED"
    runs = on_workers.ran(parent)
    ran_on = {name: runs[name].data.tags.get("dask.worker") for name in grid_names()}
    assert set(ran_on.values()) == on_workers.workers, ran_on
    for size in SMOKE.sweep.sizes:
        assert runs[f"sweep size={size}"].data.tags.get("dask.worker") in on_workers.workers

    # Every file the stages hand each other is in the bucket, where a local run of the
    # same study has it in its work dir...
    local_run = smoke_workdir[0]
    expected = {
        str(path.relative_to(local_run))
        for pattern in STAGE_FILES
        for path in local_run.rglob(pattern)
        if "mlartifacts" not in path.parts and "server" not in path.parts
    }
    stored = set(on_workers.stored())
    assert expected <= stored, sorted(expected - stored)
    # ...and none is on the local file system: no file of the flow's work dir or of a
    # worker's own folders has the name of a stored one (a worker's Matplotlib font cache,
    # say, is its own).
    names = {Path(name).name for name in stored}
    assert not [p for p in workdir.rglob("*") if p.is_file() and p.name in names]
    assert not on_workers.left_on_workers, on_workers.left_on_workers
    # The runs' MLflow artifacts went through the server's proxy to its destination in the
    # bucket (`aemnist server --artifacts`): the report the study logged, say.
    logged = on_workers.s3.keys(BUCKET, "mlflow/")
    prefix = f"mlflow/{parent.info.experiment_id}/"
    assert any(key.startswith(prefix) and key.endswith("/artifacts/report.md") for key in logged)
    experiment = on_workers.client().get_experiment(parent.info.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")


def expected_outputs() -> set[str]:
    """The study's stage tables, final model and report, named as in the store."""
    grid = {f"grid/lr={lr:g}_wd={wd:g}_fold={fold}.parquet"
            for lr, wd, fold, _ in plan.grid_cells(SMOKE)}  # fmt: skip
    sweep = {f"sweep/size={size}.parquet" for size in SMOKE.sweep.sizes}
    return grid | sweep | {
        "data/mnist_train.parquet", "data/mnist_test.parquet", "folds.parquet",
        "grid_summary.parquet", "sweep_summary.parquet", "final/history.parquet",
        "final/metrics.parquet", "final/model.pt", "corruption.parquet",
        "corruption_examples.parquet", "embedding.parquet", "embedding_metrics.parquet",
        "report.md",
    }  # fmt: skip


def test_every_stored_output_has_its_hash_record_and_every_task_its_cache_record(
    on_workers: OnWorkers,
) -> None:
    objects = on_workers.stored()
    assert expected_outputs() <= set(objects), sorted(expected_outputs() - set(objects))
    for name in expected_outputs():  # each with the SHA-256 record later runs trust it by
        folder, _, file = name.rpartition("/")
        record = objects[f"{folder}/.{file}.sha256" if folder else f".{file}.sha256"]
        assert record.split()[0].decode() == hashlib.sha256(objects[name]).hexdigest(), name
    assert any(name.startswith("figures/") and name.endswith(".png") for name in objects)
    # Prefect's persisted results, which the cache reuses: one per cached task.
    records = [name for name in objects if name.startswith("cache/")]
    cached = [label for stage in plan.STAGES.values() if stage.cached
              for label in stage.labels(SMOKE)]  # fmt: skip
    assert len(records) == len(cached), sorted(records)
    # The report is read from the bucket, and the run names it there.
    assert objects["report.md"].startswith(b"# ")
    assert f"Report: {STORE}/report.md" in on_workers.first.stdout


# A client as a study's process is one: it opens the study's experiment as `aemnist run`
# does behind a tracking server (aemnist.tracking.open_store), logs one artifact in a run of
# it and downloads it again, all through the server. It checks first that it has no AWS
# credentials: what it stores in S3, the server stored.
CLIENT = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path

    import botocore.session
    from mlflow import MlflowClient

    from aemnist.tracking import open_store

    assert botocore.session.get_session().get_credentials() is None, "client has credentials"
    uri, workdir, payload = sys.argv[1:]
    experiment_id = open_store(uri, Path(workdir))
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name="artifact check")
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "hello.txt"
        source.write_text(payload)
        client.log_artifact(run.info.run_id, str(source), "notes")
        back = Path(client.download_artifacts(run.info.run_id, "notes/hello.txt", folder + "/d"))
        downloaded = back.read_text()
    client.set_terminated(run.info.run_id)
    print(json.dumps({
        "experiment_id": experiment_id,
        "experiment_name": client.get_experiment(experiment_id).name,
        "run_id": run.info.run_id,
        "artifact_uri": client.get_run(run.info.run_id).info.artifact_uri,
        "downloaded": downloaded,
    }))
    """
)


def test_a_client_without_credentials_logs_artifacts_to_the_bucket_through_the_server(
    on_workers: OnWorkers, tmp_path: Path
) -> None:
    """`aemnist server --artifacts s3://...`: an artifact that a client with no AWS
    credentials logs is an object in the bucket (not in the client's work dir), and the
    same client downloads it through the server."""
    client = subprocess.run(
        [sys.executable, "-c", CLIENT, on_workers.servers["MLFLOW_TRACKING_URI"],
         str(tmp_path / "client-work"), PAYLOAD],
        cwd=REPO_ROOT,
        env=without_aws(cli_env(tmp_path / "client-home")),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert client.returncode == 0, client.stderr[-4000:]
    logged = json.loads(client.stdout.strip().splitlines()[-1])
    assert logged["experiment_name"] == EXPERIMENT  # the study's own experiment
    # A proxied location: the client sent the artifact to the server, never to S3 itself.
    assert logged["artifact_uri"].startswith("mlflow-artifacts:"), logged
    key = f"mlflow/{logged['experiment_id']}/{logged['run_id']}/artifacts/notes/hello.txt"
    assert on_workers.s3.read(BUCKET, key) == PAYLOAD.encode()
    assert logged["downloaded"] == PAYLOAD
    assert not list(tmp_path.rglob("hello.txt")), "the artifact landed on the client's disk"


def test_a_cached_rerun_from_the_bucket_trains_nothing(on_workers: OnWorkers) -> None:
    before = on_workers.stored()
    again = on_workers.run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert list(on_workers.ran(on_workers.parents()[-1])) == ["download"]
    after = on_workers.stored()
    assert {k: v for k, v in after.items() if not k.startswith("cache/")} == {
        k: v for k, v in before.items() if not k.startswith("cache/")
    }


def test_a_damaged_object_is_recomputed_and_refresh_recomputes_only_what_follows(
    on_workers: OnWorkers,
) -> None:
    s3, key = on_workers.s3, f"study/{FOLD0}"
    good = s3.read(BUCKET, key)
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=good[: len(good) // 2])
    result = on_workers.run("--refresh", "corruption")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{STORE}/{FOLD0}: damaged" in result.stdout + result.stderr
    # The damaged fold trains again (to the same bytes: everything after it is reused);
    # corruption and the report follow from --refresh.
    assert set(on_workers.ran(on_workers.parents()[-1])) == {
        "download", "grid lr=0.01 wd=1e-05 fold=0", "corruption", "report"
    }  # fmt: skip
    assert s3.read(BUCKET, key) == good


def test_the_report_command_rebuilds_the_stored_report_from_the_bucket(
    on_workers: OnWorkers,
) -> None:
    report = on_workers.s3.read(BUCKET, "study/report.md")
    on_workers.s3.client.delete_object(Bucket=BUCKET, Key="study/report.md")
    result = run_cli(
        ["report", "--workdir", str(on_workers.workdir), "--storage", STORE],
        home=on_workers.home,
        env=on_workers.s3.env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"Report: {STORE}/report.md"
    # The same tables, the recorded run and date: the same report, byte for byte.
    assert on_workers.s3.read(BUCKET, "study/report.md") == report
