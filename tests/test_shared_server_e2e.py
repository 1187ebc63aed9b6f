"""One Prefect server for local runs, and training slots across flow runs, all real and on
loopback: `aemnist server` on a work dir, two smoke studies run at once against it (one
finding it through its work dir's discovery file, one through PREFECT_API_URL) with one
training slot between them; a slot asked for while the server's SQLite database is busy (a
write held open on it, as the server's own task-run recorder holds one), one held past its
lease's renewal; then cached re-runs: one while the test holds that slot, one after the
server stopped, on the run's own temporary server."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing, contextmanager, suppress
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import REPO_ROOT, cli_env, nested_runs, run_cli, smoke_parents, smoke_run
from mlflow import MlflowClient
from test_production_e2e import Background, aemnist

from aemnist.machine_slots import MachineSlots, machine_slot
from aemnist.tracking import embedded_tracking_uri
from deployments.servers import prefect_request

# Fewer training tasks than the smoke profile's nine, one slot: 3 folds, 2 sizes, 1 final.
ONE_SLOT = "[runtime]\nworkers = 1\n[grid]\nlearning_rates = [0.01]\n"
TRAINING = ("grid lr=", "sweep size=", "final size=")
SLOTS = f"aemnist-cpu-{socket.gethostname()}"


@dataclass
class Server:
    root: Path
    workdir: Path
    prefect_api: str
    mlflow_uri: str
    process: Background

    def get(self, path: str) -> Any:
        return prefect_request(self.prefect_api, path)

    def post(self, path: str, body: dict) -> Any:
        """A POST as Prefect's client sends it (with a CSRF token)."""
        return prefect_request(self.prefect_api, path, body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("shared")
    workdir = root / "served"
    env = cli_env(root / "home", {"AEMNIST_MNIST_MIRROR": str(mnist_mirror)})
    args = ["server", "--workdir", str(workdir), "--prefect-port", "0", "--mlflow-port", "0"]
    process = aemnist(args, env, root / "server.log")
    try:
        output = process.wait_for("Ctrl-C stops both servers", timeout=300)
        prefect_api = re.search(r"export PREFECT_API_URL=(\S+)", output).group(1)
        mlflow_uri = re.search(r"export MLFLOW_TRACKING_URI=(\S+)", output).group(1)
        yield Server(root, workdir, prefect_api, mlflow_uri, process)
    finally:
        process.stop()


@dataclass
class Study:
    workdir: Path
    tracking: str  # where its MLflow runs are
    stdout: str
    released: int  # when the test let go of the slot it held (ms since the epoch)

    def flow_run_id(self) -> str:
        match = re.search(r"/runs/flow-run/([0-9a-f-]{36})\n", self.stdout)
        assert match, self.stdout[-2000:]
        return match.group(1)


def run_together(
    runs: dict[str, tuple[Path, dict[str, str]]],
    config: Path,
    mirror: Path,
    home: Path,
    holding: AbstractContextManager[object],
) -> tuple[dict[str, str], int]:
    """Start a smoke study per entry of ``runs`` (name: work dir, extra environment) at once
    with ``config``; wait for all; their outputs by name, and when the slot was let go (ms).

    The test holds the machine's one training slot (``holding``) until every study has
    written its folds table, the last table before training: then all of them wait for the
    slot at once. Without that, one study's start (a temporary server's, which waits for
    another's on the same Prefect home) can take as long as the other's whole training,
    and they train one after the other whatever the slots (seen once in CI)."""
    processes: dict[str, subprocess.Popen] = {}
    logs = {name: workdir.parent / f"{workdir.name}.out" for name, (workdir, _) in runs.items()}
    errors = {name: path.with_suffix(".err") for name, path in logs.items()}
    outputs = {}
    try:
        with holding:
            for name, (workdir, extra) in runs.items():
                args = smoke_run(workdir, mirror, "--config", str(config))
                # Files, not pipes: no pipe fills while the test waits.
                with logs[name].open("w") as out, errors[name].open("w") as err:
                    processes[name] = subprocess.Popen(
                        [sys.executable, "-m", "flows.cli", *args],
                        cwd=REPO_ROOT,
                        env=cli_env(home, extra),
                        stdout=out,
                        stderr=err,
                    )
            deadline = time.monotonic() + 600
            while not all((workdir / "folds.parquet").exists() for workdir, _ in runs.values()):
                for name, process in processes.items():
                    assert process.poll() is None, f"{name}:\n{errors[name].read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no folds table within 600 s"
                time.sleep(0.1)
            released = time.time_ns() // 1_000_000
        for name, process in processes.items():
            process.wait(timeout=900)
            output = logs[name].read_text()
            assert process.returncode == 0, (
                f"{name}:\n{output[-3000:]}\n{errors[name].read_text()[-3000:]}"
            )
            outputs[name] = output
    finally:
        for process in processes.values():  # one failed: the other is not left running
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
    return outputs, released


@pytest.fixture(scope="module")
def two_studies(server: Server, mnist_mirror: Path) -> tuple[Study, Study]:
    """Two smoke studies started together with one training slot: one in the server's work
    dir, without PREFECT_API_URL (it finds the server there, and logs to the work dir's MLflow
    store, which the server's MLflow server serves), one in a work dir of its own with
    PREFECT_API_URL set (it logs to its own MLflow store)."""
    config = server.root / "one-slot.toml"
    config.write_text(ONE_SLOT)
    own = server.root / "own"
    home = server.root / "home"
    runs = {
        "served": (server.workdir, {}),
        "own": (own, {"PREFECT_API_URL": server.prefect_api}),
    }
    # The machine's limit, made before the studies would make it, so the test can hold it.
    server.post("/v2/concurrency_limits/", {"name": SLOTS, "limit": 1})
    outputs, released = run_together(runs, config, mnist_mirror, home, holding_every_slot(server))
    return (
        Study(server.workdir, server.mlflow_uri, outputs["served"], released),
        Study(own, embedded_tracking_uri(own), outputs["own"], released),
    )


def assert_never_overlapped(spans: dict[str, list[tuple[int, int, str]]], released: int) -> None:
    """Two studies' training runs (6 each), all waiting for the one slot at once, yet no two
    of them at once: one slot between them."""
    assert all(len(found) == 6 for found in spans.values()), spans
    # Both studies were ready to train when the test let the slot go, and neither trained
    # before: without the limit their first tasks would have run at once ... (Which study
    # then trains when is the slot's polling: one was seen to train all its tasks first.)
    assert all(min(found)[0] >= released for found in spans.values()), (released, spans)
    # ... with one slot on this machine, no two training runs did, across both studies.
    every = sorted(span for found in spans.values() for span in found)
    overlaps = [(a[2], b[2]) for a, b in pairwise(every) if b[0] < a[1]]
    assert not overlaps, every


def training_spans(study: Study) -> list[tuple[int, int, str]]:
    """(start, end, name) in ms of the training runs of ``study``'s first parent run."""
    client = MlflowClient(study.tracking)
    parent = smoke_parents(client)[0]
    runs = nested_runs(client, parent.info.run_id)
    return [
        (run.info.start_time, run.info.end_time, name)
        for name, run in runs.items()
        if name.startswith(TRAINING)
    ]


def test_two_studies_on_one_server_never_train_more_models_at_once_than_its_slots(
    server: Server, two_studies: tuple[Study, Study]
) -> None:
    served, own = two_studies
    # The run in the server's work dir found the server; both ran their flows on it.
    assert f"Running on the Prefect server of `aemnist server` in {served.workdir}" in (
        served.stdout
    )
    assert "Running on the Prefect server" not in own.stdout
    flow_run_ids = {served.flow_run_id(), own.flow_run_id()}
    for flow_run_id in flow_run_ids:
        assert server.get(f"/flow_runs/{flow_run_id}")["state_type"] == "COMPLETED"

    spans = {study.workdir.name: training_spans(study) for study in two_studies}
    assert_never_overlapped(spans, served.released)

    limit = server.get(f"/v2/concurrency_limits/{SLOTS}")
    assert (limit["limit"], limit["active_slots"]) == (1, 0)


def test_two_studies_on_temporary_servers_of_their_own_share_the_machines_slot_files(
    tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server in common (each `aemnist run` starts its own): the training slots are the
    machine's lock files, and one slot still keeps the two studies' training apart."""
    root = tmp_path_factory.mktemp("temporary")
    config = root / "one-slot.toml"
    config.write_text(ONE_SLOT)
    runtime = root / "run"  # the slot files of this test alone
    runtime.mkdir(mode=0o700)
    extra = {"XDG_RUNTIME_DIR": str(runtime)}
    runs = {name: (root / name, extra) for name in ("first", "second")}
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # the test holds the same slot file
    held = machine_slot(MachineSlots("aemnist-cpu", 1))
    outputs, released = run_together(runs, config, mnist_mirror, root / "home", held)

    studies = [Study(root / n, embedded_tracking_uri(root / n), outputs[n], released) for n in runs]
    for study in studies:
        assert "Running on the Prefect server" not in study.stdout  # a temporary one
    assert_never_overlapped(
        {study.workdir.name: training_spans(study) for study in studies}, released
    )
    assert sorted(p.name for p in (runtime / f"aemnist-slots-{os.getuid()}").iterdir()) == [
        "aemnist-cpu-0.lock"
    ]


def test_flow_runs_are_named_after_profile_seed_and_config_and_task_runs_tagged(
    server: Server, two_studies: tuple[Study, Study]
) -> None:
    served, _ = two_studies
    flow_run_id = served.flow_run_id()
    parent = smoke_parents(MlflowClient(served.tracking))[0]
    name = f"smoke seed=0 config={parent.data.tags['config_hash'][:12]}"
    assert server.get(f"/flow_runs/{flow_run_id}")["name"] == name
    # The run's last line names it and links to it in the server's UI.
    ui = server.prefect_api.removesuffix("/api")
    assert served.stdout.rstrip().splitlines()[-1] == (
        f"Prefect flow run {name!r}: {ui}/runs/flow-run/{flow_run_id}"
    )

    def tagged(*tags: str) -> list[str]:
        body = {
            "flow_runs": {"id": {"any_": [flow_run_id]}},
            "task_runs": {"tags": {"all_": list(tags)}},
        }
        return sorted(run["name"] for run in server.post("/task_runs/filter", body))

    assert tagged("stage:grid", "device:cpu") == [
        f"grid lr=0.01 wd=1e-05 fold={k}" for k in range(3)
    ]
    assert tagged("stage:sweep", "device:cpu") == ["sweep size=4", "sweep size=8"]
    assert tagged("stage:grid-summary") == ["grid summary"]
    assert tagged("device:cpu", "stage:download") == []  # the download computes on no device


def test_endpoints_file_is_private_and_names_the_running_servers(server: Server) -> None:
    path = server.workdir / "server" / "endpoints.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    found = json.loads(path.read_text())
    assert found["prefect_api_url"] == server.prefect_api
    assert found["mlflow_tracking_uri"] == server.mlflow_uri
    assert found["pid"] == server.process.process.pid


@contextmanager
def holding_every_slot(server: Server) -> Iterator[None]:
    """The test holds this machine's one training slot (as a study training elsewhere
    would) while the body runs."""
    lease = server.post(
        "/v2/concurrency_limits/increment-with-lease",
        {"names": [SLOTS], "slots": 1, "mode": "concurrency", "lease_duration": 900},
    )
    try:
        assert server.get(f"/v2/concurrency_limits/{SLOTS}")["active_slots"] == 1
        yield
    finally:
        server.post("/v2/concurrency_limits/decrement-with-lease", {"lease_id": lease["lease_id"]})


@contextmanager
def database_write_held(server: Server) -> Iterator[sqlite3.Connection]:
    """A write transaction on the Prefect server's SQLite database, with a change in it, held
    by this process (as the server's own task-run recorder holds one while it writes a
    task's state) until the body commits it or ends."""
    limit = "aemnist-test-scratch"
    with suppress(urllib.error.HTTPError):  # made by an earlier test
        server.post("/v2/concurrency_limits/", {"name": limit, "limit": 1})
    database = server.workdir / "server" / "prefect.db"
    with closing(sqlite3.connect(database, isolation_level=None, timeout=30)) as connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            'UPDATE concurrency_limit_v2 SET "limit" = "limit" + 1 WHERE name = ?', (limit,)
        )
        try:
            yield connection
        finally:
            if connection.in_transaction:
                connection.execute("COMMIT")


def test_a_slot_refused_by_the_servers_busy_database_is_asked_for_again_and_taken(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import tasks.slots
    from tasks.slots import prefect_slot

    limit = "aemnist-test-busy"
    server.post("/v2/concurrency_limits/", {"name": limit, "limit": 1})
    held: list[int] = []
    answers: list[int] = []  # each answer's status to a request for the slot
    request = tasks.slots.prefect_request

    def recording_request(url: str, path: str, body: Any, auth: str | None = None) -> Any:
        try:
            answer = request(url, path, body, auth=auth)  # the real request to the server
        except urllib.error.HTTPError as exc:
            answers.extend([exc.code] if path.endswith("increment-with-lease") else [])
            raise
        answers.extend([200] if path.endswith("increment-with-lease") else [])
        return answer

    def take_slot() -> None:
        with temporary_settings({PREFECT_API_URL: server.prefect_api}), prefect_slot(limit):
            held.append(server.get(f"/v2/concurrency_limits/{limit}")["active_slots"])

    monkeypatch.setattr(tasks.slots, "prefect_request", recording_request)
    caplog.set_level(logging.DEBUG, logger="tasks.slots")
    with database_write_held(server) as connection:
        taker = threading.Thread(target=take_slot)
        taker.start()
        # While another connection writes, the server's read-then-write transaction fails
        # at once and it answers 503 (measured 4 of 4 within 0.03 s); the request is made
        # again 50 and 100 ms later, then every 200 ms (how soon, against Prefect's client's
        # 2 s, is measured in bench/slots.py). The write is held until three were refused:
        # counted, not timed, as a loaded machine answers each in up to 0.3 s.
        deadline = time.monotonic() + 60
        while len(answers) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert answers[:3] == [503, 503, 503] and held == []
        connection.execute("COMMIT")
    taker.join(timeout=60)
    assert not taker.is_alive()
    assert held == [1]  # the lease held the one slot ...
    assert server.get(f"/v2/concurrency_limits/{limit}")["active_slots"] == 0  # ... given back
    # Asked again after each refusal, and taken at the first request after the commit.
    refused = answers.index(200)
    assert refused >= 3 and answers == [503] * refused + [200], answers
    (busy,) = [r.getMessage() for r in caplog.records if "answers 503" in r.getMessage()]
    assert busy == f"increment-with-lease answered after {refused} answers 503 (busy database)"


def test_a_server_whose_database_stays_busy_fails_the_slot_naming_the_server(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import tasks.slots
    from tasks.slots import SlotServerBusy, prefect_slot

    limit = "aemnist-test-busy"
    with suppress(urllib.error.HTTPError):  # made by the test above when it ran
        server.post("/v2/concurrency_limits/", {"name": limit, "limit": 1})
    monkeypatch.setattr(tasks.slots, "BUSY_WAITS_S", (0.01, 0.02))  # 51 s, shortened
    with database_write_held(server), temporary_settings({PREFECT_API_URL: server.prefect_api}):
        with pytest.raises(SlotServerBusy) as refused, prefect_slot(limit):
            pytest.fail("the body ran without a slot")
    assert str(refused.value) == (
        f"the Prefect server at {server.prefect_api} answered 503 (busy) to 3 requests "
        f"(increment-with-lease) over 0 s: see its log (`aemnist server` writes "
        f"WORKDIR/server/prefect-server.log)"
    )
    assert server.get(f"/v2/concurrency_limits/{limit}")["active_slots"] == 0


def test_a_held_slots_lease_is_renewed_while_its_task_trains(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import tasks.slots
    from tasks.slots import prefect_slot

    limit = "aemnist-test-renewed"
    server.post("/v2/concurrency_limits/", {"name": limit, "limit": 1})
    renewed: list[str] = []
    ask = tasks.slots._ask

    def recording_ask(url: str, auth: str | None, path: str, body: dict[str, Any]) -> Any:
        answer = ask(url, auth, path, body)  # the real request to the server
        renewed.extend([path] if path.endswith("/renew") else [])
        return answer

    monkeypatch.setattr(tasks.slots, "_ask", recording_ask)
    monkeypatch.setattr(tasks.slots, "RENEW_S", 0.1)  # 225 s, shortened
    caplog.set_level(logging.WARNING, logger="tasks.slots")
    with temporary_settings({PREFECT_API_URL: server.prefect_api}), prefect_slot(limit):
        # Held until three renewals were answered: on a loaded machine one can take a
        # second (CI saw one in 0.55 s), so the hold ends on the count, not on a time.
        deadline = time.monotonic() + 60
        while len(renewed) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.get(f"/v2/concurrency_limits/{limit}")["active_slots"] == 1
    # Renewed three times or more, each answered (a refused renewal logs a warning) ...
    assert len(renewed) >= 3 and len(set(renewed)) == 1, renewed
    assert caplog.records == []
    # ... and the lease given back once the body ended: the slot is free again.
    assert server.get(f"/v2/concurrency_limits/{limit}")["active_slots"] == 0


def test_a_cached_rerun_takes_no_training_slot_and_after_the_server_stops_its_database_keeps_both(
    server: Server, two_studies: tuple[Study, Study], mnist_mirror: Path
) -> None:
    served, _ = two_studies
    config = server.root / "one-slot.toml"
    args = smoke_run(served.workdir, mnist_mirror, "--config", str(config))
    home = server.root / "home"
    # Every slot taken: a task that waited for one would hang here until the timeout.
    with holding_every_slot(server):
        cached = run_cli(args, home=home, timeout=300)
    assert cached.returncode == 0, cached.stderr[-3000:]
    client = MlflowClient(served.tracking)
    rerun = smoke_parents(client)[-1]
    assert not [n for n in nested_runs(client, rerun.info.run_id) if n.startswith(TRAINING)]

    # Without the server, the run's temporary server keeps the flow run in the database
    # `aemnist server --workdir` opens: the earlier runs and this one side by side.
    assert server.process.stop() == 0
    assert not (served.workdir / "server" / "endpoints.json").exists()
    alone = run_cli(args, home=home, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "Running on the Prefect server" not in alone.stdout
    database = served.workdir / "server" / "prefect.db"
    last = alone.stdout.rstrip().splitlines()[-1]
    in_db, workdir = re.escape(str(database)), re.escape(str(served.workdir))
    match = re.fullmatch(
        rf"Prefect flow run '(smoke seed=0 config=[0-9a-f]{{12}})' \(in {in_db}\): to browse "
        rf"it, `aemnist server --workdir {workdir}`, then open "
        r"http://127\.0\.0\.1:4200/runs/flow-run/([0-9a-f-]{36})",
        last,
    )
    assert match, last
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT id, name, state_type FROM flow_run").fetchall()
    by_id = {row[0]: row[1:] for row in rows}
    for flow_run_id in (served.flow_run_id(), match.group(2)):
        assert by_id[flow_run_id] == (match.group(1), "COMPLETED")
