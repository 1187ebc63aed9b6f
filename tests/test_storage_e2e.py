"""A store that cannot hold the study stops `aemnist run --storage URL` in one line before any
work, against a real S3-compatible server on loopback (moto's server mode): a bucket that
does not exist, no credentials, an endpoint that does not answer, credentials in the URL.

The study itself in a bucket (every output, cached re-runs, a damaged object, --refresh) is
run on Dask workers that cannot read the work dir: tests/test_dask_storage_e2e.py."""

from __future__ import annotations

from pathlib import Path

from cli_helpers import refused_port, run_cli, smoke_run
from s3_server import SECRET_KEY, S3Server, without_aws

BUCKET = "aemnist-storage"
URL = f"s3://{BUCKET}/team/smoke"


def test_a_store_that_cannot_be_used_stops_the_run_in_one_line_before_any_work(
    tmp_path: Path, mnist_mirror: Path, s3_server: S3Server
) -> None:
    s3_server.make_bucket(BUCKET)
    with refused_port() as port:
        unreachable = {**s3_server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
        no_credentials = without_aws({}) | {"AWS_ENDPOINT_URL": s3_server.endpoint}
        cases = [
            ("s3://no-such-bucket/x", s3_server.env,
             "the bucket 'no-such-bucket' of the storage s3://no-such-bucket/x does not exist"),
            (URL, no_credentials, f"no credentials for the storage {URL}: set AWS_ACCESS_KEY_ID"),
            (URL, unreachable, f"the storage {URL} is unreachable"),
            ("s3://key:hunter2@bucket/x", s3_server.env,
             "runtime.storage: must not hold credentials"),
        ]  # fmt: skip
        for number, (url, env, message) in enumerate(cases):
            workdir = tmp_path / f"work{number}"
            args = smoke_run(workdir, mnist_mirror, "--storage", url)
            result = run_cli(args, home=tmp_path / "home", env=env)
            assert result.returncode == 2, (url, result.stderr[-2000:])
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0], (url, result.stderr)
            assert "hunter2" not in result.stderr and SECRET_KEY not in result.stderr
            assert not workdir.exists()  # no server started, nothing created
