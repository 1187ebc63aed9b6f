"""A work dir's cache holds data, never code: a cache record rewritten with a pickle payload
(what a security probe planted) is refused and its task recomputed, the payload never run.
Also: the work dir and its cache are private (0700, records 0600), and temporary files that
killed writers left are removed at the start of a run, never one a live writer holds."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import stat
import time
from pathlib import Path

import pytest
from cli_helpers import nested_runs, run_cli, smoke_parents, smoke_run
from mlflow import MlflowClient
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer

from aemnist.config import load_config
from aemnist.jobs import grid_label
from aemnist.layout import Layout
from aemnist.records import RESULT_TYPE, TaskFailure, check_record
from aemnist.schemas import TableRef, atomic_write_bytes, remove_stale_temps, temp_path
from aemnist.tracking import embedded_tracking_uri
from tasks.results import CacheStore, ForeignRecordError, TableRefSerializer

SMOKE = load_config("smoke")
LR, WD = SMOKE.grid.learning_rates[0], SMOKE.grid.weight_decays[0]
AN_HOUR_AGO = time.time() - 3600 - 60


class Payload:
    """Unpickling it touches ``marker``: what a planted record would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def prefect_record(serializer, result: object, key: str) -> bytes:  # noqa: ANN001
    """A result record in Prefect's own format, as Prefect's default store writes it."""
    metadata = ResultRecordMetadata(storage_key=key, serializer=serializer)
    return ResultRecord(metadata=metadata, result=result).serialize()


def pickle_record(marker: Path, key: str) -> bytes:
    return prefect_record(PickleSerializer(), Payload(marker), key)


def json_record(key: str) -> bytes:
    """A JSON-serializer record: its reader imports whatever ``__class__`` it names."""
    ref = TableRef("x.parquet", "0" * 64, 1)
    return prefect_record(JSONSerializer(), ref, key)


def test_the_planted_payload_runs_code_when_prefect_reads_it(tmp_path: Path) -> None:
    """The payload the e2e test plants is a real one: Prefect's own reader runs it."""
    marker = tmp_path / "ran"
    ResultRecord.deserialize(pickle_record(marker, "key"))
    assert marker.exists()
    result = json.loads(json.loads(json_record("key"))["result"])
    assert result["__class__"] == "aemnist.schemas.TableRef"


@pytest.mark.parametrize("kind", ["pickle", "json", "truncated", "wrong shape"])
def test_cache_store_refuses_a_foreign_record_unread(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = CacheStore(basepath=str(tmp_path / "cache"))
    good = prefect_record(TableRefSerializer(), TableRef("t.parquet", "a" * 64, 3, "r"), "k")
    store.write_path("k", content=good)
    record = tmp_path / "cache" / "k"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert ResultRecord.deserialize(store.read_path("k")).result == TableRef(
        "t.parquet", "a" * 64, 3, "r"
    )
    marker = tmp_path / "ran"
    planted = {
        "pickle": pickle_record(marker, "k"),
        "json": json_record("k"),
        "truncated": good[:-20],
        "wrong shape": good.replace(b'\\"rows\\": 3', b'\\"rows\\": \\"3\\"'),
    }[kind]
    assert planted != good
    record.write_bytes(planted)
    with pytest.raises(ForeignRecordError, match="refused"):
        store.read_path("k")
    assert not marker.exists()
    assert str(record) in caplog.text
    with pytest.raises(ValueError, match="does not exist"):  # a miss stays a quiet miss
        store.read_path("absent")


def test_results_round_trip_as_data_and_nothing_else_is_stored() -> None:
    ref = TableRef("t.parquet", "b" * 64, -1, "run")
    serializer = TableRefSerializer()
    assert serializer.loads(serializer.dumps(ref)) == ref
    assert serializer.loads(serializer.dumps({"train": ref})) == {"train": ref}
    failure = serializer.loads(serializer.dumps(ValueError("no folds")))
    assert isinstance(failure, TaskFailure) and str(failure) == "builtins.ValueError: no folds"
    with pytest.raises(TypeError, match="TableRef"):
        serializer.dumps(Payload(Path("x")))


def test_check_record_refuses_duplicate_keys() -> None:
    good = prefect_record(TableRefSerializer(), TableRef("t", "a" * 64, 1), "k").decode()
    doubled = good.replace(
        f'"serializer":{{"type":"{RESULT_TYPE}"}}',
        f'"serializer":{{"type":"{RESULT_TYPE}"}},"serializer":{{"type":"pickle"}}',
    )
    assert doubled != good
    check_record(good.encode())
    with pytest.raises(ValueError, match="duplicate"):
        check_record(doubled.encode())


@pytest.fixture
def held_temp(tmp_path: Path):  # noqa: ANN201
    """A temporary file as a live writer holds it (locked), an hour old."""
    path = temp_path(tmp_path / "grid" / "held.parquet")
    path.parent.mkdir()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))
    yield path
    os.close(fd)


def test_stale_temps_are_removed_but_not_fresh_held_or_foreign_ones(
    tmp_path: Path, held_temp: Path
) -> None:
    stale = temp_path(tmp_path / "grid" / "a.parquet")
    fresh = temp_path(tmp_path / "grid" / "b.parquet")
    stale_record = temp_path(tmp_path / ".a.parquet.sha256")
    not_ours = tmp_path / "grid" / "notes.tmp"
    artifact = temp_path(tmp_path / "mlartifacts" / "c.parquet")
    artifact.parent.mkdir()
    for path in (stale, fresh, stale_record, not_ours, artifact):
        path.write_bytes(b"x")
    for path in (stale, stale_record, not_ours, artifact):
        os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))

    removed = remove_stale_temps(tmp_path)

    assert sorted(removed) == sorted([stale, stale_record])
    assert all(p.exists() for p in (fresh, held_temp, not_ours, artifact))


def test_atomic_writes_are_private_and_leave_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "t.bin"
    atomic_write_bytes(path, lambda tmp: tmp.write_bytes(b"data"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == [".t.bin.sha256", "t.bin"]


# --- end to end: two smoke runs through the CLI --------------------------------------------


class Study:
    def __init__(self, root: Path, mirror: Path) -> None:
        self.root = root
        self.workdir = root / "study"
        self.home = root / "prefect-home"
        self.mirror = mirror

    def run(self):  # noqa: ANN201
        return run_cli(smoke_run(self.workdir, self.mirror), home=self.home)

    def client(self) -> MlflowClient:
        return MlflowClient(embedded_tracking_uri(self.workdir))

    def parents(self) -> list:
        return smoke_parents(self.client())

    def ran(self, parent) -> set[str]:  # noqa: ANN001
        """The tasks that ran (opened a nested run) in the study of ``parent``."""
        return set(nested_runs(self.client(), parent.info.run_id))

    def records(self) -> dict[str, Path]:
        """Each cached task's record file, by the path of the table its result names."""
        found = {}
        for record in (self.workdir / "cache").iterdir():
            result = json.loads(json.loads(record.read_bytes())["result"])
            if "table" in result:
                found[result["table"]["path"]] = record
        return found


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Study:
    s = Study(tmp_path_factory.mktemp("cache-safety"), mnist_mirror)
    first = s.run()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "refused" not in first.stderr + first.stdout
    return s


@pytest.mark.e2e
def test_work_dir_and_cache_are_private_and_hold_json_records(study: Study) -> None:
    layout = Layout(study.workdir)
    assert stat.S_IMODE(layout.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(layout.cache_dir.stat().st_mode) == 0o700
    records = list(layout.cache_dir.iterdir())
    assert len(records) == 15  # every cached task (all but the download)
    for record in records:
        assert stat.S_IMODE(record.stat().st_mode) == 0o600, record
        check_record(record.read_bytes())


@pytest.mark.e2e
def test_planted_pickle_record_is_refused_and_its_task_recomputed(study: Study) -> None:
    layout = Layout(study.workdir)
    records = study.records()
    pickled = records[str(layout.grid_history(LR, WD, 0))]
    jsoned = records[str(layout.grid_history(LR, WD, 1))]
    marker = study.root / "payload-ran"
    pickled.write_bytes(pickle_record(marker, pickled.name))
    jsoned.write_bytes(json_record(jsoned.name))
    # What a kill -9 mid-write leaves (an hour old), and what a live run is writing now.
    stale = temp_path(layout.grid_history(LR, WD, 0))
    live = temp_path(layout.final_model)
    for path in (stale, live):
        path.write_bytes(b"partial")
    os.utime(stale, (AN_HOUR_AGO, AN_HOUR_AGO))
    # The work dir opened to others, as an earlier version created it.
    os.chmod(layout.root, 0o755)

    again = study.run()

    output = again.stderr + again.stdout
    assert again.returncode == 0, again.stderr[-3000:]
    assert not marker.exists(), "the planted pickle ran"
    assert f"cache record {pickled} refused" in output
    assert "names serializer 'pickle'" in output
    assert f"cache record {jsoned} refused" in output
    assert "names serializer 'json'" in output
    # Only those two grid tasks ran again (and the download, which always runs); their
    # tables are byte-identical, so everything downstream was reused.
    assert study.ran(study.parents()[-1]) == {
        "download",
        grid_label(LR, WD, 0),
        grid_label(LR, WD, 1),
    }
    assert "[grid] 4/6 results reused from earlier runs" in output
    # Their records are ours again; the stale temporary file is gone, the live one kept.
    for record in (pickled, jsoned):
        check_record(record.read_bytes())
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert not stale.exists()
    assert live.exists()
    assert stat.S_IMODE(layout.root.stat().st_mode) == 0o700
