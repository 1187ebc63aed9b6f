"""A study's stage data in an object store, end to end: the smoke study with `--storage
s3://...` against a real S3-compatible server on loopback (moto's server mode; the project's
code path is s3fs and pyarrow, as with any S3 service). Every table, hash record, cache
record, checkpoint, figure and the report lies in the bucket, the work dir keeps only its
lock and MLflow store; a cached re-run trains nothing; a damaged object is recomputed;
`--refresh` recomputes only what follows; a store that cannot be used stops the run in one
line before any work."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import CliResult, nested_runs, refused_port, run_cli, smoke_parents, smoke_run
from mlflow import MlflowClient
from s3_server import SECRET_KEY, S3Server, without_aws

from aemnist import plan
from aemnist.config import load_config
from aemnist.tracking import embedded_tracking_uri

SMOKE = load_config("smoke")
BUCKET = "aemnist-storage"
PREFIX = "team/smoke"
URL = f"s3://{BUCKET}/{PREFIX}"
FOLD0 = "grid/lr=0.01_wd=1e-05_fold=0.parquet"


@dataclass
class StoredStudy:
    workdir: Path
    home: Path
    mirror: Path
    s3: S3Server
    first: CliResult

    def run(self, *args: str) -> CliResult:
        return run_cli(
            smoke_run(self.workdir, self.mirror, "--storage", URL, *args),
            home=self.home,
            env=self.s3.env,
        )

    def objects(self) -> dict[str, bytes]:
        """Every object under the study's prefix, by its name there."""
        keys = self.s3.keys(BUCKET, f"{PREFIX}/")
        return {key.removeprefix(f"{PREFIX}/"): self.s3.read(BUCKET, key) for key in keys}

    def ran_last(self) -> dict:
        client = MlflowClient(embedded_tracking_uri(self.workdir))
        parents = smoke_parents(client)
        latest = max(parents, key=lambda run: run.info.start_time)
        return nested_runs(client, latest.info.run_id)


@pytest.fixture(scope="module")
def stored(
    tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path, s3_server: S3Server
) -> StoredStudy:
    root = tmp_path_factory.mktemp("storage")
    s3_server.make_bucket(BUCKET)
    study = StoredStudy(root / "work", root / "home", mnist_mirror, s3_server, None)  # type: ignore[arg-type]
    study.first = study.run()
    assert study.first.returncode == 0, study.first.stdout[-3000:] + study.first.stderr[-3000:]
    return study


def expected_tables() -> set[str]:
    """The study's stage tables, named as in the store (as in a work dir)."""
    grid = {f"grid/lr={lr:g}_wd={wd:g}_fold={fold}.parquet"
            for lr, wd, fold, _ in plan.grid_cells(SMOKE)}  # fmt: skip
    sweep = {f"sweep/size={size}.parquet" for size in SMOKE.sweep.sizes}
    return grid | sweep | {
        "data/mnist_train.parquet", "data/mnist_test.parquet", "folds.parquet",
        "grid_summary.parquet", "sweep_summary.parquet", "final/history.parquet",
        "final/metrics.parquet", "corruption.parquet", "corruption_examples.parquet",
        "embedding.parquet", "embedding_metrics.parquet",
    }  # fmt: skip


def test_every_stage_output_lies_in_the_bucket_with_its_hash_record(stored: StoredStudy) -> None:
    objects = stored.objects()
    outputs = expected_tables() | {"final/model.pt", "report.md"}
    assert outputs <= set(objects), sorted(outputs - set(objects))
    for name in outputs:  # each with the SHA-256 record that later runs trust it by
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
    assert f"Report: {URL}/report.md" in stored.first.stdout


def test_the_work_dir_keeps_no_stage_data(stored: StoredStudy) -> None:
    """Its lock, MLflow store and MLflow's copies of logged artifacts; nothing a stage hands
    another."""
    local = [
        path.relative_to(stored.workdir)
        for path in stored.workdir.rglob("*")
        if path.is_file() and "mlartifacts" not in path.relative_to(stored.workdir).parts
    ]
    assert not [p for p in local if p.suffix in (".parquet", ".pt", ".png", ".md")], local
    assert not (stored.workdir / "cache").exists()


def test_a_cached_rerun_from_the_bucket_trains_nothing(stored: StoredStudy) -> None:
    before = stored.objects()
    again = stored.run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert list(stored.ran_last()) == ["download"]
    after = stored.objects()
    assert {k: v for k, v in after.items() if not k.startswith("cache/")} == {
        k: v for k, v in before.items() if not k.startswith("cache/")
    }


def test_a_damaged_object_is_recomputed_and_refresh_recomputes_only_what_follows(
    stored: StoredStudy,
) -> None:
    good = stored.s3.read(BUCKET, f"{PREFIX}/{FOLD0}")
    stored.s3.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{FOLD0}", Body=good[: len(good) // 2])
    result = stored.run("--refresh", "corruption")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{URL}/{FOLD0}: damaged" in result.stdout + result.stderr
    # The damaged fold trains again (to the same bytes: everything after it is reused);
    # corruption and the report follow from --refresh.
    assert set(stored.ran_last()) == {
        "download", "grid lr=0.01 wd=1e-05 fold=0", "corruption", "report"
    }  # fmt: skip
    assert stored.s3.read(BUCKET, f"{PREFIX}/{FOLD0}") == good


def test_a_store_that_cannot_be_used_stops_the_run_in_one_line_before_any_work(
    tmp_path: Path, mnist_mirror: Path, s3_server: S3Server
) -> None:
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
