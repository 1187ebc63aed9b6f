"""The download task through Prefect against a real HTTP mirror on loopback: it retries a
network error, and does not retry a wrong file (a retry would fetch the same wrong bytes)."""

from __future__ import annotations

import gzip
import http.server
import os
import threading
from collections import Counter
from pathlib import Path

import pytest

from aemnist.data import DataError
from aemnist.jobs import DownloadJob
from aemnist.layout import Layout
from aemnist.tracking import embedded_tracking_uri, start_study

pytestmark = pytest.mark.e2e


class Mirror(http.server.ThreadingHTTPServer):
    """Serves a folder; the first ``failures`` requests get 503, ``corrupt`` files come back
    with one byte of their payload changed."""

    def __init__(self, folder: Path, failures: int = 0, corrupt: str | None = None) -> None:
        self.folder, self.failures, self.corrupt = folder, failures, corrupt
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Mirror

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = self.path.strip("/")
        with self.server.lock:
            self.server.requests[name] += 1
            fail = self.server.failures > 0
            self.server.failures -= int(fail)
        path = self.server.folder / name
        if fail or not path.exists():
            self.send_response(503 if fail else 404)
            self.end_headers()
            return
        body = path.read_bytes()
        if name == self.server.corrupt:
            payload = bytearray(gzip.decompress(body))
            payload[-1] ^= 0xFF
            body = gzip.compress(bytes(payload))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real temporary Prefect server for this module, stopped when it ends."""
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield home
    finally:
        os.environ.pop("PREFECT_HOME", None)


def fetch(workdir: Path, url: str) -> dict:
    from prefect import flow

    from tasks.data import download

    ctx = start_study(embedded_tracking_uri(workdir), workdir, "download", {}, {"t": "x"})

    @flow(name="fetch-mnist")
    def fetch_flow() -> dict:
        return download(ctx, DownloadJob(Layout(workdir), url, force=False))

    return fetch_flow()


def test_download_retries_after_a_network_error(prefect_home, mnist_mirror, tmp_path) -> None:
    mirror = Mirror(mnist_mirror, failures=1)
    try:
        refs = fetch(tmp_path, mirror.url)
    finally:
        mirror.shutdown()
    assert refs["train"].rows == 60000 and refs["test"].rows == 10000
    # First attempt: 503, then the raw file is not there either (404); the retry succeeds.
    assert mirror.requests["train-images-idx3-ubyte.gz"] == 2
    assert mirror.requests["t10k-labels-idx1-ubyte.gz"] == 1


def test_download_does_not_retry_a_wrong_file(prefect_home, mnist_mirror, tmp_path) -> None:
    mirror = Mirror(mnist_mirror, corrupt="t10k-labels-idx1-ubyte.gz")
    try:
        with pytest.raises(DataError, match="wrong SHA-256 for the decompressed t10k-labels"):
            fetch(tmp_path, mirror.url)
    finally:
        mirror.shutdown()
    assert mirror.requests["t10k-labels-idx1-ubyte.gz"] == 1
    assert not (tmp_path / "data" / "mnist_train.parquet").exists()


def test_training_tasks_never_retry() -> None:
    """A training error is deterministic: the same inputs fail the same way again."""
    from tasks.training import final_model, grid_fold, sweep_size

    assert [t.retries for t in (grid_fold, sweep_size, final_model)] == [0, 0, 0]
