"""The production stack on PostgreSQL, all real and on loopback: `aemnist server --database
postgres` (a PostgreSQL cluster of its own in the work dir, the Prefect server on it through
asyncpg, the MLflow tracking server through psycopg), two process workers running three smoke
deployment runs at once, a worker killed with -9 in the middle of a fourth run and the run
retried on a new worker, the stack stopped and started again, and the bad inputs of
`--database` (a server that does not answer, a wrong password, a busy port, a second server
on the same work dir), none of which shows the generated password."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import (
    SMOKE,
    cli_env,
    expected_task_runs,
    grid_names,
    nested_runs,
    refused_port,
    run_cli,
)
from mlflow import MlflowClient
from test_production_e2e import Background, Stack, aemnist, parents_of

from aemnist.faults import pause_marker
from aemnist.tracking import EXPERIMENT
from deployments.auth import CREDENTIALS_FILE, read_credentials
from deployments.postgres import find_binaries, parse_database
from deployments.stack import StackError

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").exists(), reason="kills a worker's process tree found in /proc"
)

SEEDS = (None, 1, 2)  # the three runs at once: the profile's seed and two others
PAUSED_SIZE = SMOKE.sweep.sizes[-1]  # the fourth run's worker is killed while it trains this
# The epochs each training task logs, by the name of its nested run.
EPOCHS = {"grid": SMOKE.grid.epochs, "sweep": SMOKE.sweep.epochs, "final": SMOKE.final.epochs}


def free_port() -> int:
    """A port nothing listens on now (PostgreSQL cannot bind port 0 and tell us)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PgStack:
    """`aemnist server --database postgres` on one work dir, which a test may stop and start
    again. Each start takes free ports: the Prefect and MLflow servers bind port 0, the
    cluster a port free at the time (the one it listens on is no part of its data)."""

    root: Path
    workdir: Path
    env: dict[str, str]
    server: Background | None = None
    stack: Stack | None = None
    start_seconds: list[float] = field(default_factory=list)

    @property
    def password(self) -> str:
        return (self.workdir / "server" / "postgres.password").read_text().strip()

    def start(self) -> Stack:
        started = time.monotonic()
        self.server = aemnist(
            ["server", "--workdir", str(self.workdir), "--database", "postgres",
             "--database-port", str(free_port()), "--prefect-port", "0", "--mlflow-port", "0",
             "--auth"],
            self.env,
            self.root / f"server-{len(self.start_seconds) + 1}.log",
        )  # fmt: skip
        output = self.server.wait_for("Ctrl-C stops both servers and PostgreSQL", timeout=300)
        self.start_seconds.append(time.monotonic() - started)
        prefect_api = re.search(r"export PREFECT_API_URL=(\S+)", output).group(1)
        mlflow_uri = re.search(r"export MLFLOW_TRACKING_URI=(\S+)", output).group(1)
        credentials = read_credentials(self.workdir / "server" / CREDENTIALS_FILE)
        env = {
            **self.env,
            "PREFECT_API_URL": prefect_api,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            **credentials.client_env(),
        }
        self.stack = Stack(
            self.root, self.workdir, prefect_api, mlflow_uri, env, credentials, output
        )
        return self.stack

    def stop(self) -> int:
        """SIGTERM, as a user's `kill`; returns its exit code."""
        assert self.server is not None
        return self.server.stop()


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Iterator[PgStack]:
    root = tmp_path_factory.mktemp("pgstack")
    # Workers poll for runs every 2 s (Prefect's default: 10 s).
    env = cli_env(
        root / "client-home",
        {"AEMNIST_MNIST_MIRROR": str(mnist_mirror), "PREFECT_WORKER_QUERY_SECONDS": "2"},
    )
    pg = PgStack(root, root / "server-work", env)
    try:
        stack = pg.start()
        result = run_cli(["deploy"], home=root / "client-home", env=stack.env)
        assert result.returncode == 0, result.stdout + result.stderr
        # This process's MLflow client reads the server's runs with the credentials too (they
        # stay the same across restarts).
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", stack.credentials.mlflow_username)
            patch.setenv("MLFLOW_TRACKING_PASSWORD", stack.credentials.mlflow_password)
            yield pg
    finally:
        if pg.server is not None:  # launched, whether it came up or not
            pg.stop()


@pytest.fixture(scope="module")
def stack(pg: PgStack) -> Stack:
    """The running stack as clients see it (after a restart, the new one)."""
    assert pg.stack is not None
    return pg.stack


def launch(stack: Stack, workdir: Path, seed: int | None = None) -> str:
    """`prefect deployment run study/smoke` as a user types it; the flow run's id."""
    params = ["--param", f"workdir={workdir}"]
    if seed is not None:
        params += ["--param", f"seed={seed}"]
    proc = stack.prefect("deployment", "run", "study/smoke", *params)
    match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def start_worker(stack: Stack, name: str, *extra: str, env: dict[str, str] | None = None):
    worker = aemnist(
        ["worker", "--name", name, *extra], {**stack.env, **(env or {})},
        stack.root / f"worker-{name}.log",
    )  # fmt: skip
    return worker


def task_runs(stack: Stack, flow_run_id: str) -> list[dict]:
    """The task runs of a flow run, as the Prefect UI reads them from the API."""
    return stack.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


def training_stage(name: str) -> str | None:
    """The stage of a training task's nested run ("grid lr=...", "sweep size=...", "final
    size=..."); None for other tasks."""
    match = re.match(r"(grid|sweep|final) (lr|size)=", name)
    return match.group(1) if match else None


def per_epoch_metrics(name: str) -> tuple[set[str], int]:
    """The metrics a training task logs every epoch, and its number of epochs."""
    stage = training_stage(name)
    assert stage is not None, name
    scored = "val_loss" if stage == "grid" else SCORED[SMOKE.sweep.selection]
    return {"train_loss", "lr", scored}, EPOCHS[stage]


SCORED = {"test": "test_loss", "validation": "val_loss"}


@dataclass
class Concurrent:
    flow_run_ids: list[str]
    seconds: float  # from the three launches to the last one's end
    worker_logs: list[str]


@pytest.fixture(scope="module")
def concurrent(stack: Stack) -> Concurrent:
    """Two process workers, at most two flow runs each; three smoke deployment runs launched
    at once, with three seeds, each in its work dir."""
    workers = [start_worker(stack, name, "--limit", "2") for name in ("one", "two")]
    try:
        for name, worker in zip(("one", "two"), workers, strict=True):
            worker.wait_for(f"Worker '{name}' started", timeout=180)
        started = time.monotonic()
        with ThreadPoolExecutor(len(SEEDS)) as pool:
            ids = list(
                pool.map(
                    lambda i: launch(stack, stack.root / f"run-{i}", SEEDS[i]), range(len(SEEDS))
                )
            )
        states = [stack.wait_for_flow_run(flow_run_id, timeout=1200) for flow_run_id in ids]
        seconds = time.monotonic() - started
        assert states == ["COMPLETED"] * len(SEEDS), [w.output()[-3000:] for w in workers]
    finally:
        for worker in workers:
            worker.stop()
    return Concurrent(ids, seconds, [worker.output() for worker in workers])


def test_three_runs_at_once_on_two_workers_complete_with_prefect_and_mlflow_on_postgres(
    pg: PgStack, stack: Stack, concurrent: Concurrent
) -> None:
    # Each run ran on exactly one of the workers: when both claim one, the server lets one
    # through and aborts the other's submission. Which worker takes which is the server's
    # and the workers' timing: on a loaded machine one worker was seen to run all three
    # (two at once, its limit, then the third), so no share is asserted.
    ran = [
        [i for i in concurrent.flow_run_ids if f"/runs/flow-run/{i}" in log]
        for log in concurrent.worker_logs
    ]
    assert sorted(ran[0] + ran[1]) == sorted(concurrent.flow_run_ids), ran
    # Nothing went to SQLite: the rows are in the cluster's two databases.
    assert not (pg.workdir / "server" / "prefect.db").exists()
    assert not (pg.workdir / "mlflow.db").exists()
    counts = asyncio.run(
        count_rows(
            pg,
            {"prefect": "SELECT count(*) FROM flow_run", "mlflow": "SELECT count(*) FROM runs"},
        )
    )
    runs_per_study = len(expected_task_runs()) + 2  # the nested runs, the final's, the parent
    assert counts["prefect"] >= len(SEEDS)
    assert counts["mlflow"] == len(SEEDS) * runs_per_study, counts
    print(
        f"\n[postgres] three smoke runs at once on two workers: {concurrent.seconds:.0f} s; "
        f"stack start {pg.start_seconds[0]:.0f} s"
    )


async def count_rows(pg: PgStack, queries: dict[str, str]) -> dict[str, int]:
    """One count per database of the stack's cluster, read straight from PostgreSQL."""
    import asyncpg

    port = int(re.search(r"PostgreSQL on 127\.0\.0\.1:(\d+)", pg.server.output()).group(1))
    counts = {}
    for database, query in queries.items():
        connection = await asyncpg.connect(
            host="127.0.0.1", port=port, user="aemnist", password=pg.password, database=database
        )
        try:
            counts[database] = await connection.fetchval(query)
        finally:
            await connection.close()
    return counts


def test_every_tasks_per_epoch_metrics_reach_mlflow_once_under_concurrent_runs(
    stack: Stack, concurrent: Concurrent
) -> None:
    client = MlflowClient(stack.mlflow_uri)
    entries = 0
    first_grid_losses = []
    for flow_run_id, seed in zip(concurrent.flow_run_ids, SEEDS, strict=True):
        (parent,) = parents_of(client, flow_run_id)
        assert parent.info.status == "FINISHED"
        assert parent.data.params["seed"] == str(seed if seed is not None else SMOKE.seed)
        runs = nested_runs(client, parent.info.run_id)
        final = {name for name in runs if name.startswith("final size=")}
        assert len(final) == 1 and set(runs) - final == expected_task_runs(), sorted(runs)
        for name, run in runs.items():
            assert run.info.status == "FINISHED", name
            assert run.data.tags["prefect.flow_run_id"] == flow_run_id, name
            if training_stage(name) is None:
                continue
            keys, epochs = per_epoch_metrics(name)
            for key in keys:
                history = client.get_metric_history(run.info.run_id, key)
                # Each epoch once: nothing lost, nothing logged twice.
                assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (name, key)
                entries += len(history)
        first_grid_losses.append(
            client.get_metric_history(runs[sorted(grid_names())[0]].info.run_id, "val_loss")[
                0
            ].value
        )
    # Three seeds, three studies: no run's metrics landed in another's.
    assert len(set(first_grid_losses)) == len(SEEDS), first_grid_losses
    expected = len(SEEDS) * sum(
        len(per_epoch_metrics(name)[0]) * per_epoch_metrics(name)[1]
        for name in [*grid_names(), *(f"sweep size={s}" for s in SMOKE.sweep.sizes), "final size="]
    )
    assert entries == expected
    print(f"\n[postgres] per-epoch metric entries in MLflow: {entries} (expected {expected})")


def test_prefect_api_shows_every_task_run_of_each_concurrent_flow_run(
    stack: Stack, concurrent: Concurrent
) -> None:
    client = MlflowClient(stack.mlflow_uri)
    for flow_run_id in concurrent.flow_run_ids:
        runs = task_runs(stack, flow_run_id)
        assert all(run["state"]["type"] == "COMPLETED" for run in runs), [
            (run["name"], run["state"]["type"]) for run in runs
        ]
        # A task without a label of its own is named by Prefect: its name and 3 hex digits.
        by_id = {run["id"]: re.sub(r"-[0-9a-f]{3}$", "", run["name"]) for run in runs}
        assert len(by_id) == len(runs)
        (parent,) = parents_of(client, flow_run_id)
        nested = nested_runs(client, parent.info.run_id)
        # Every task with an MLflow run is a completed task run of that flow run, by id and
        # by name; the others are the study's bookkeeping (open, publish, close).
        for name, run in nested.items():
            assert by_id.get(run.data.tags["prefect.task_run_id"]) == name, name
        others = sorted(set(by_id.values()) - set(nested))
        assert others == ["close-study", "open-study", "publish"], others
        assert len(runs) == len(nested) + len(others)


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    tree = [pid]
    for parent in tree:
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                tree += [int(child) for child in children.read_text().split()]
            except (OSError, ValueError):
                continue
    return tree


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Killed:
    flow_run_id: str
    before_kill: dict[str, object]  # the first attempt's nested runs when its worker died
    killed_pids: list[int]
    seconds_to_kill: float  # from the launch to the kill
    retried_seconds: float  # from the retry to its end


@pytest.fixture(scope="module")
def killed(stack: Stack, concurrent: Concurrent) -> Killed:
    """A fourth smoke run on a worker that is killed with -9 while the run's last sweep task
    trains (paused after its first epoch, its checkpoint saved) and the grid is done; a new
    worker takes its place and the flow run, which the dead worker left Running, is marked
    Crashed (as the UI's "Change state" does) and retried from the Prefect CLI."""
    client = MlflowClient(stack.mlflow_uri)
    fault = {"AEMNIST_FAULT": f"pause:sweep:size={PAUSED_SIZE},epoch=1"}
    doomed = start_worker(stack, "doomed", env=fault)
    try:
        doomed.wait_for("Worker 'doomed' started", timeout=180)
        started = time.monotonic()
        flow_run_id = launch(stack, stack.root / "run-killed")
        doomed.wait_for(pause_marker("sweep", size=PAUSED_SIZE, epoch=1), timeout=900)
        # The other sweep task runs beside the paused one: let it finish, so that the kill
        # lands with some tasks done (the grid, that size) and one in flight. Done means its
        # task run Completed on the server too: its MLflow run ends inside the task, and its
        # cache record is written after, before Prefect's Completed (a kill between the two
        # was seen once, on a loaded machine, and the retry rightly trained it again).
        other = f"sweep size={SMOKE.sweep.sizes[0]}"
        body = {
            "flow_runs": {"id": {"any_": [flow_run_id]}},
            "task_runs": {"name": {"any_": [other]}},
        }
        deadline = time.monotonic() + 300
        while True:
            (parent,) = parents_of(client, flow_run_id)
            runs = nested_runs(client, parent.info.run_id)
            task_runs = stack.api("/task_runs/filter", body)
            completed = [run for run in task_runs if run["state"]["type"] == "COMPLETED"]
            if other in runs and runs[other].info.status == "FINISHED" and completed:
                break
            assert time.monotonic() < deadline, f"{other} did not finish: {sorted(runs)}"
            time.sleep(1)
        assert runs[f"sweep size={PAUSED_SIZE}"].info.status == "RUNNING"
        seconds_to_kill = time.monotonic() - started
        tree = process_tree(doomed.process.pid)
        assert len(tree) >= 3, tree  # aemnist worker, Prefect's worker, the flow run
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        doomed.process.wait(30)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in tree)
    finally:
        doomed.stop()
    # Nobody told the server: the run is still Running there.
    assert stack.flow_run(flow_run_id)["state"]["type"] == "RUNNING"
    crashed = {"state": {"type": "CRASHED", "message": "its worker was killed"}, "force": True}
    assert stack.api(f"/flow_runs/{flow_run_id}/set_state", crashed)["status"] == "ACCEPT"
    with stack.worker("replacement") as worker:
        started = time.monotonic()
        stack.prefect("flow-run", "retry", flow_run_id)
        state = stack.wait_for_flow_run(flow_run_id, timeout=900)
        retried_seconds = time.monotonic() - started
        assert state == "COMPLETED", worker.output()[-5000:]
    return Killed(flow_run_id, runs, tree, seconds_to_kill, retried_seconds)


def test_a_run_whose_worker_is_killed_completes_on_retry_training_only_what_was_unfinished(
    stack: Stack, killed: Killed
) -> None:
    client = MlflowClient(stack.mlflow_uri)
    first, retried = parents_of(client, killed.flow_run_id)
    assert retried.info.status == "FINISHED"
    # The killed attempt's runs are marked KILLED by the retry (their process is gone).
    assert client.get_run(first.info.run_id).info.status == "KILLED"
    paused = f"sweep size={PAUSED_SIZE}"
    done = {name for name, run in killed.before_kill.items() if run.info.status == "FINISHED"}
    assert grid_names() | {f"sweep size={SMOKE.sweep.sizes[0]}"} <= done
    again = nested_runs(client, retried.info.run_id)
    # Nothing the killed worker had finished was done again: the retry opened no run for it
    # and links the run that produced it instead. (The download task runs on every attempt,
    # and finds its verified tables: it fetches nothing.)
    assert done & set(again) == {"download"}, sorted(done & set(again))
    links = {k: v for k, v in retried.data.tags.items() if k.startswith("reused.")}
    for name in done - {"download"}:
        assert killed.before_kill[name].info.run_id in links.values(), name
    # The task in flight resumed from its checkpoint: epoch 1 restored, epoch 2 trained, and
    # its metrics logged once per epoch.
    assert client.get_run(killed.before_kill[paused].info.run_id).info.status == "KILLED"
    assert again[paused].info.status == "FINISHED"
    keys, epochs = per_epoch_metrics(paused)
    for key in keys:
        history = client.get_metric_history(again[paused].info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
    assert {name for name in again if training_stage(name) in ("grid", "sweep")} == {paused}
    print(
        f"\n[postgres] fourth run: worker killed {killed.seconds_to_kill:.0f} s after launch "
        f"({len(killed.killed_pids)} processes); retry completed in "
        f"{killed.retried_seconds:.0f} s, training only {sorted(again)}"
    )


def database_port(pg: PgStack) -> int:
    """The port the running stack's cluster listens on, as `aemnist server` printed it."""
    assert pg.server is not None
    match = re.findall(r"PostgreSQL on 127\.0\.0\.1:(\d+)", pg.server.output())
    assert match, pg.server.output()
    return int(match[-1])


def flow_run_states(stack: Stack) -> dict[str, str]:
    return {run["id"]: run["state"]["type"] for run in stack.api("/flow_runs/filter", {})}


def test_bad_database_inputs_stop_with_one_line_and_leave_the_stack_and_its_runs_alone(
    pg: PgStack, stack: Stack, killed: Killed, tmp_path: Path
) -> None:
    before = flow_run_states(stack)
    home = tmp_path / "home"
    fresh = ["--prefect-port", "0", "--mlflow-port", "0"]
    results = {}
    # A second server on the stack's work dir.
    results["second server"] = run_cli(
        ["server", "--workdir", str(pg.workdir), "--database", "postgres",
         "--database-port", str(free_port()), *fresh],
        home=home,
    )  # fmt: skip
    # The stack's own cluster, with a wrong password; then a port where nothing answers.
    port = database_port(pg)
    wrong = f"postgresql://aemnist:wrong-Pa55word@127.0.0.1:{port}"
    results["wrong password"] = run_cli(
        ["server", "--workdir", str(tmp_path / "w1"), "--database", wrong, *fresh], home=home
    )
    with refused_port() as closed:
        nothing = f"postgresql://aemnist:other-Pa55word@127.0.0.1:{closed}"
        results["no server"] = run_cli(
            ["server", "--workdir", str(tmp_path / "w2"), "--database", nothing, *fresh],
            home=home,
        )
    # The cluster's own port, taken.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        results["busy port"] = run_cli(
            ["server", "--workdir", str(tmp_path / "w3"), "--database", "postgres",
             "--database-port", str(taken), *fresh],
            home=home,
        )  # fmt: skip
    expected = {
        "second server": f"aemnist: error: work dir {pg.workdir} is already served by process "
        f"{pg.server.process.pid} (another `aemnist server`",
        "wrong password": f"aemnist: error: the PostgreSQL server at postgresql://***@127.0.0.1:"
        f"{port} refused the user or password",
        "no server": f"aemnist: error: no PostgreSQL server answers at postgresql://***@"
        f"127.0.0.1:{closed}",
        "busy port": f"aemnist: error: cannot start the PostgreSQL server on 127.0.0.1:{taken}: "
        f"the port is in use",
    }
    for case, result in results.items():
        assert result.returncode == 2, (case, result.stderr)
        assert result.stderr.startswith(expected[case]), (case, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)
        for secret in ("Pa55word", pg.password):  # no password shown, ours or given
            assert secret not in result.stdout + result.stderr, case
        print(f"\n[postgres] {case}: {result.seconds:.1f} s: {result.stderr.strip()}")
    # The stack serves on, every earlier run where it was; none of the bad commands started
    # a cluster.
    assert flow_run_states(stack) == before
    assert not any((tmp_path / w / "server" / "postgres").exists() for w in ("w1", "w2", "w3"))


def test_stopping_the_stack_stops_postgres_cleanly_and_a_restart_finds_every_earlier_run(
    pg: PgStack, stack: Stack, concurrent: Concurrent, killed: Killed
) -> None:
    client = MlflowClient(stack.mlflow_uri)
    flow_runs = flow_run_states(stack)
    studies = {
        run.info.run_id: run.info.status
        for flow_run_id in [*concurrent.flow_run_ids, killed.flow_run_id]
        for run in parents_of(client, flow_run_id)
    }
    assert len(studies) == len(SEEDS) + 2  # the killed attempt and its retry
    data = pg.workdir / "server" / "postgres" / "data"
    postmaster = int((data / "postmaster.pid").read_text().split()[0])

    assert pg.stop() == 0, pg.server.output()[-3000:]
    # PostgreSQL stopped after both servers, and cleanly: a shutdown checkpoint, its lock
    # file removed, its process gone.
    log = (pg.workdir / "server" / "postgres.log").read_text()
    assert log.rstrip().endswith("database system is shut down"), log[-2000:]
    assert "shutdown checkpoint" not in log or "checkpoint complete" in log
    assert not (data / "postmaster.pid").exists()
    assert not alive(postmaster)

    started = time.monotonic()
    again = pg.start()
    print(f"\n[postgres] restart: {time.monotonic() - started:.0f} s")
    assert "the cluster in" in pg.server.output()  # not a new one
    assert flow_run_states(again) == flow_runs
    client = MlflowClient(again.mlflow_uri)
    found = {
        run.info.run_id: run.info.status
        for flow_run_id in [*concurrent.flow_run_ids, killed.flow_run_id]
        for run in parents_of(client, flow_run_id)
    }
    assert found == studies


def test_the_generated_password_is_in_no_output_log_command_line_or_tracked_record(
    pg: PgStack, stack: Stack, concurrent: Concurrent, killed: Killed
) -> None:
    password = pg.password
    assert len(password) >= 24
    mode = (pg.workdir / "server" / "postgres.password").stat().st_mode & 0o777
    assert mode == 0o600
    # Every log and output: the servers', PostgreSQL's, the workers' (runs' output included).
    logs = [*pg.root.glob("*.log"), *(pg.workdir / "server").glob("*.log")]
    assert len(logs) >= 6
    for path in logs:
        assert password not in path.read_text(errors="replace"), path
    # What `ps` shows of every process on the machine (the stack's among them).
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert password.encode() not in cmdline.read_bytes(), cmdline
        except OSError:
            continue
    # Every MLflow run's parameters and tags, and every flow run's parameters.
    client = MlflowClient(pg.stack.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    assert len(runs) > len(SEEDS) * len(expected_task_runs())
    for run in runs:
        recorded = json.dumps([run.data.params, run.data.tags])
        assert password not in recorded, run.info.run_name
    assert password not in json.dumps(pg.stack.api("/flow_runs/filter", {}))


def test_missing_postgresql_binaries_are_named_with_the_package_to_install(
    tmp_path: Path,
) -> None:
    with pytest.raises(StackError) as error:
        find_binaries(path=str(tmp_path), search=str(tmp_path / "postgresql" / "*" / "bin"))
    message = str(error.value)
    assert "needs PostgreSQL's server binaries (initdb, postgres, pg_ctl)" in message
    assert "apt-get install postgresql" in message
    # Debian's layout is searched when PATH has none, the newest version first.
    for version in ("13", "15"):
        folder = tmp_path / "postgresql" / version / "bin"
        folder.mkdir(parents=True)
        for name in ("initdb", "postgres", "pg_ctl"):
            (folder / name).write_text("#!/bin/sh\n")
            (folder / name).chmod(0o755)
    found = find_binaries(path=str(tmp_path), search=str(tmp_path / "postgresql" / "*" / "bin"))
    assert found["initdb"] == tmp_path / "postgresql" / "15" / "bin" / "initdb"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("mysql://u:hunter2@db:3306", "is not a PostgreSQL URL"),
        ("postgresql://u:hunter2@db:5432/prefect", "names a database or options"),
        ("postgresql://u:hunter2@db:5432?sslmode=require", "names a database or options"),
        ("postgresql://db:5432", "names no host or no user"),
        ("postgresql://u:hunter2@db:99999", "is not a valid URL"),
        ("mariadb", "is neither a database kind nor a URL"),
    ],
)
def test_a_database_option_that_is_not_a_postgresql_server_url_is_refused_without_its_password(
    spec: str, problem: str
) -> None:
    with pytest.raises(StackError) as error:
        parse_database(spec)
    assert problem in str(error.value)
    assert "hunter2" not in str(error.value)


def test_a_database_url_keeps_its_quoted_credentials_for_the_servers_and_shows_none() -> None:
    server = parse_database("postgresql://team%40lab:p%2Fss%3Aw0rd@db.example.org:6543")
    assert (server.host, server.port, server.user, server.password) == (
        "db.example.org", 6543, "team@lab", "p/ss:w0rd"
    )  # fmt: skip
    # Quoted again for SQLAlchemy, one database each for Prefect (asyncpg) and MLflow (psycopg).
    assert server.url("asyncpg", "prefect") == (
        "postgresql+asyncpg://team%40lab:p%2Fss%3Aw0rd@db.example.org:6543/prefect"
    )
    assert server.url("psycopg", "mlflow").startswith("postgresql+psycopg://team%40lab:")
    assert server.shown == "postgresql://***@db.example.org:6543"
    assert server.scrub("failed for p/ss:w0rd and p%2Fss%3Aw0rd") == "failed for *** and ***"
    assert parse_database("postgres://u@[::1]").url("asyncpg", "prefect") == (
        "postgresql+asyncpg://u@[::1]:5432/prefect"
    )
