"""Shared fixtures for the test suite.

Library fixtures: ``mnist_mirror`` (the local MNIST files) and ``mnist_tables`` (the parquet
tables built from them once per session). End-to-end fixtures go below them, and
``s3_server`` (an S3-compatible server on loopback, tests/s3_server.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from s3_server import S3Server

# Prefect must not try to phone home from these offline machines; this has to be set before
# any test module imports prefect.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from aemnist.data import MIRROR_ENV, PINS, download_mnist  # noqa: E402
from aemnist.schemas import TableRef  # noqa: E402

REPO_ROOT = Path(__file__).parents[1]
DEFAULT_MIRROR = REPO_ROOT / ".." / "shared" / "data" / "mnist"


# --- library fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    """The folder holding the four MNIST files: $AEMNIST_MNIST_MIRROR, else ../shared/data/mnist."""
    configured = os.environ.get(MIRROR_ENV)
    folder = Path(configured) if configured else DEFAULT_MIRROR
    folder = folder.resolve()
    if not folder.is_dir():
        pytest.fail(
            f"MNIST mirror {folder} does not exist; set {MIRROR_ENV} to a folder holding the "
            f"four MNIST files (train-images-idx3-ubyte.gz, ...), e.g. ../shared/data/mnist",
            pytrace=False,
        )
    missing = [
        name
        for name in PINS
        if not (folder / f"{name}.gz").exists() and not (folder / name).exists()
    ]
    if missing:
        pytest.fail(
            f"MNIST mirror {folder} lacks {', '.join(missing)}; set {MIRROR_ENV} to a folder "
            f"holding the four MNIST files",
            pytrace=False,
        )
    return folder


@pytest.fixture(scope="session")
def mnist_tables(
    tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path
) -> dict[str, TableRef]:
    """``{"train": ref, "test": ref}``: the MNIST parquet tables, downloaded once per session.

    Treat them as read-only; copy them to a test's own folder before changing anything."""
    data_dir = tmp_path_factory.mktemp("mnist") / "data"
    refs, fetched = download_mnist(data_dir, mnist_mirror)
    assert fetched, "a fresh data dir must be fetched into"
    return refs


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Run a module's torch work on one thread (``pytestmark = usefixtures(...)``): the small
    batches of unit tests gain nothing from two, and on a shared two-core machine two OpenMP
    threads per process can slow training down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- end-to-end fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path):  # noqa: ANN201
    """One smoke study run with the command line, shared by the modules that only read its
    work dir (test_export, test_study_e2e): ``(workdir, result)``; its Prefect home beside
    the work dir (``prefect-home``). Modules that change a work dir run their own."""
    from cli_helpers import run_cli, smoke_run

    root = tmp_path_factory.mktemp("smoke")
    workdir = root / "work"
    result = run_cli(smoke_run(workdir, mnist_mirror), home=root / "prefect-home")
    assert result.returncode == 0, (
        f"smoke study failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return workdir, result


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3-compatible server on loopback (moto) for the whole session, started on first
    use; each test makes a bucket of its own (``s3_server.make_bucket``) and runs its
    processes with ``s3_server.env``."""
    from s3_server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


# --- markers ------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the mark added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of a ``*_e2e.py`` module ``e2e``; other modules mark their own."""
    for item in items:
        if item.path.stem.endswith("_e2e"):
            item.add_marker(pytest.mark.e2e)
