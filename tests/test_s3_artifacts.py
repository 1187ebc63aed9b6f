"""The bad inputs of `aemnist server --artifacts URL`, refused in one line before anything
starts, against moto's S3 server on loopback. The server with its artifacts in a bucket, and a
client without credentials logging through it, are tested with the study on Dask workers
(tests/test_dask_storage_e2e.py), which starts that server anyway."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import run_cli
from s3_server import S3Server


def test_a_missing_bucket_stops_the_server_before_it_starts(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """--artifacts naming a bucket that does not exist: exit 2, one line naming the bucket
    and how to create it, and no work dir, server or state created."""
    workdir = tmp_path / "served"
    result = run_cli(
        ["server", "--workdir", str(workdir), "--prefect-port", "0", "--mlflow-port", "0",
         "--artifacts", "s3://no-such-bucket/mlflow"],
        home=tmp_path / "home",
        env=s3_server.env,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'no-such-bucket'" in lines[0] and "does not exist" in lines[0], lines[0]
    assert "aws s3 mb s3://no-such-bucket" in lines[0], lines[0]
    assert "Starting" not in result.stdout, result.stdout
    assert not workdir.exists(), "a refused --artifacts created the work dir"


def test_artifacts_must_be_a_url(tmp_path: Path) -> None:
    """--artifacts given a plain path (which MLflow would read relative to wherever its
    server started): exit 2, one line saying to name a URL, nothing created."""
    workdir = tmp_path / "served"
    result = run_cli(
        ["server", "--workdir", str(workdir), "--artifacts", "artifacts-here"],
        home=tmp_path / "home",
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "aemnist: error: --artifacts artifacts-here is not a URL: name the store as one "
        "(s3://bucket/prefix), or leave --artifacts out to keep the artifacts in "
        "WORKDIR/mlartifacts"
    ]
    assert not workdir.exists()
