"""Dask workers with no shared file system (issue 16, point 3): a scheduler and two workers
started from Dask's own command line as another Unix user (nobody), who cannot read the
flow's work dir, each worker in folders of its own; the study reaches them only through its
servers and an object store (``--storage s3://...``).

The cluster (tests/dask_user.py) is proven by a cheap test that runs a plain Dask job on
it; the study's test waits for ``--storage``."""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dask_user import NOBODY, WORKERS, OtherUserCluster, other_user_cluster, run_on

pytest.importorskip("distributed", reason="the Dask tests need the [dask] extra")


@pytest.fixture(scope="module")
def plain_cluster() -> Iterator[OtherUserCluster]:
    """The other user's cluster with no server or store to reach."""
    with other_user_cluster() as cluster:
        yield cluster


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


@pytest.mark.skip(reason="needs --storage (issue 16 point 1), being built in main")
def test_dask_workers_without_the_work_dir_run_the_smoke_study_from_s3() -> None:
    raise NotImplementedError
