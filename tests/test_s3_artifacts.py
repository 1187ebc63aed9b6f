"""`aemnist server --artifacts s3://...`, all real and on loopback: moto's S3 server, the
stack's MLflow server storing artifacts in a bucket through the AWS environment it was
started with, and a client with no AWS credentials at all that logs an artifact through the
server (MLflow's mlflow-artifacts:/ proxy) and reads it back. And the bad inputs of
--artifacts, refused in one line before anything starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from cli_helpers import REPO_ROOT, cli_env, run_cli
from s3_server import S3Server, without_aws
from test_production_e2e import aemnist

from aemnist.tracking import EXPERIMENT

PAYLOAD = "aemnist artifact through the server\n"

# A client as a study's process is one: it opens the study's experiment as `aemnist run` does
# on a fresh store behind a tracking server (aemnist.tracking.open_store), logs one artifact
# in a run of it and downloads it again, all through the server. It checks first that it has
# no AWS credentials: what it stores in S3, the server stored.
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
        "experiment_location": client.get_experiment(experiment_id).artifact_location,
        "run_id": run.info.run_id,
        "artifact_uri": client.get_run(run.info.run_id).info.artifact_uri,
        "downloaded": downloaded,
    }))
    """
)


def test_server_stores_artifacts_in_the_bucket_for_clients_without_credentials(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """`aemnist server --artifacts s3://bucket/mlflow` on a fresh work dir: the study's
    experiment, created by a client, leaves its artifact location to the server; an artifact
    a client without AWS credentials logs is an object in the bucket (and not in the work
    dir), and the same client downloads it through the server."""
    bucket = "server-artifacts"
    url = f"{s3_server.make_bucket(bucket)}/mlflow"
    workdir = tmp_path / "served"
    args = ["server", "--workdir", str(workdir), "--prefect-port", "0", "--mlflow-port", "0",
            "--artifacts", url]  # fmt: skip
    server = aemnist(args, cli_env(tmp_path / "home", s3_server.env), tmp_path / "server.log")
    try:
        output = server.wait_for("Ctrl-C stops both servers", timeout=300)
        assert f"store: {workdir}, artifacts at {url})" in output, output
        tracking = re.search(r"export MLFLOW_TRACKING_URI=(\S+)", output).group(1)
        client = subprocess.run(
            [sys.executable, "-c", CLIENT, tracking, str(workdir), PAYLOAD],
            cwd=REPO_ROOT,
            env=without_aws(cli_env(tmp_path / "client-home")),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert client.returncode == 0, client.stderr[-4000:]
        logged = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    assert logged["experiment_name"] == EXPERIMENT  # the study's own experiment
    # Proxied locations: the client sent the artifact to the server, never to S3 itself.
    assert logged["experiment_location"].startswith("mlflow-artifacts:"), logged
    assert logged["artifact_uri"].startswith("mlflow-artifacts:"), logged
    key = f"mlflow/{logged['experiment_id']}/{logged['run_id']}/artifacts/notes/hello.txt"
    assert key in s3_server.keys(bucket, "mlflow/"), s3_server.keys(bucket)
    assert s3_server.read(bucket, key) == PAYLOAD.encode()
    assert logged["downloaded"] == PAYLOAD
    assert not [p for p in workdir.rglob("hello.txt")], "the artifact landed in the work dir"
    # The storage check's probe object is gone: nothing but the run's artifact is left.
    assert s3_server.keys(bucket) == [key]


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
