"""Production, all real and on loopback: `aemnist server` (a Prefect server and an MLflow
tracking server on free ports), `aemnist deploy` (the process work pool and the study's
deployments), `aemnist worker` (a Prefect process worker), a deployment run read back through
MLflow's client, a failed deployment run retried from the Prefect CLI, the MLflow UI in
headless Chromium, and the fan-out on a Dask cluster of two worker processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    FOREIGN_ORIGIN,
    REPO_ROOT,
    SMOKE,
    SMOKE_FINAL_MSE_BOUND,
    assert_registered_model_is_the_final_model,
    basic_auth,
    cli_env,
    expected_task_runs,
    grid_names,
    http_status,
    nested_runs,
    preflight,
    refused_port,
    run_cli,
    smoke_run,
)
from mlflow import MlflowClient

from aemnist.tracking import EXPERIMENT, REGISTERED_MODEL, embedded_tracking_uri
from aemnist.workdir import WorkdirLocked, lock_workdir
from deployments.auth import CREDENTIALS_FILE, Credentials, read_credentials
from deployments.servers import prefect_request

# Screenshots of the MLflow UI test are kept here (git-ignored) for people to look at.
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
FAULTY_FOLD = "grid lr=0.01 wd=1e-05 fold=1"


class Background:
    """A command of ours running in the background, its output in a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.output()
            if text in output:
                return output
            assert self.process.poll() is None, (
                f"{self.log.name}: exited with {self.process.returncode} before "
                f"{text!r}:\n{output[-4000:]}"
            )
            time.sleep(0.5)
        raise AssertionError(f"{self.log.name}: no {text!r} in {timeout:g} s:\n{output[-4000:]}")

    def stop(self) -> int:
        """SIGTERM, as a user's `kill` or a service manager would; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def aemnist(args: list[str], env: dict[str, str], log: Path) -> Background:
    return Background([sys.executable, "-m", "flows.cli", *args], env, log)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Stack:
    root: Path
    workdir: Path  # the servers' work dir: MLflow store and Prefect database
    prefect_api: str
    mlflow_uri: str
    env: dict[str, str]  # a user's shell after the exports and credentials `server` printed
    credentials: Credentials
    output: str  # what `aemnist server` printed

    def api(self, path: str, body: object | None = None) -> Any:
        """The Prefect API as Prefect's client calls it: with the credentials, and a CSRF
        token on writes and filters."""
        return prefect_request(
            self.prefect_api, path, body, auth=self.credentials.prefect_auth_string
        )

    def flow_run(self, flow_run_id: str) -> dict:
        return self.api(f"/flow_runs/{flow_run_id}")

    def mlflow_page(self, browser: Any, height: int = 900) -> Any:
        """A browser page that answers the MLflow server's basic-auth challenge, as a user
        who typed the credentials in would."""
        return browser.new_page(
            viewport={"width": 1400, "height": height},
            http_credentials={
                "username": self.credentials.mlflow_username,
                "password": self.credentials.mlflow_password,
            },
        )

    def wait_for_flow_run(self, flow_run_id: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.flow_run(flow_run_id)["state"]["type"]
            if state in TERMINAL:
                return state
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} not finished in {timeout:g} s")

    def wait_for_log(self, flow_run_id: str, text: str, timeout: float = 60) -> list[str]:
        """The flow run's log messages once one contains `text`. The run's process ships its
        logs in batches, so its last lines can reach the server after its final state."""
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
        deadline = time.monotonic() + timeout
        while True:
            messages = [log["message"] for log in self.api("/logs/filter", body)]
            if any(text in message for message in messages):
                return messages
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {text!r} in {timeout:g} s: {messages[-5:]}")
            time.sleep(1)

    def all_artifacts(self, flow_run_id: str) -> list[dict]:
        """Every Prefect artifact of a flow run (of each of its attempts)."""
        body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        return self.api("/artifacts/filter", body)

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        """The Prefect artifacts of a flow run, by key (the latest of each)."""
        return {a["key"]: a for a in self.all_artifacts(flow_run_id) if a["key"]}

    def prefect(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "prefect", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def run_deployment(self, name: str, workdir: Path) -> str:
        """`prefect deployment run` as a user types it; returns the flow run's id."""
        proc = self.prefect("deployment", "run", name, "--param", f"workdir={workdir}")
        match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
        assert match, proc.stdout
        return match.group(1)

    @contextmanager
    def worker(
        self, name: str, extra_env: dict[str, str] | None = None, drop: tuple[str, ...] = ()
    ) -> Iterator[Background]:
        env = {k: v for k, v in self.env.items() if k not in drop}
        worker = aemnist(
            ["worker", "--name", name],
            {**env, **(extra_env or {})},
            self.root / f"worker-{name}.log",
        )
        try:
            worker.wait_for(f"Worker '{name}' started", timeout=180)
            yield worker
        finally:
            worker.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> Iterator[Stack]:
    """The stack as a team runs it: both servers asking every client for credentials."""
    root = tmp_path_factory.mktemp("stack")
    workdir = root / "server-work"
    env = cli_env(root / "client-home", {"AEMNIST_MNIST_MIRROR": str(mnist_mirror)})
    server = aemnist(
        ["server", "--workdir", str(workdir), "--prefect-port", "0", "--mlflow-port", "0",
         "--auth"],
        env,
        root / "server.log",
    )  # fmt: skip
    ports: list[int] = []
    try:
        output = server.wait_for("Ctrl-C stops both servers", timeout=300)
        prefect_api = re.search(r"export PREFECT_API_URL=(\S+)", output).group(1)
        mlflow_uri = re.search(r"export MLFLOW_TRACKING_URI=(\S+)", output).group(1)
        # Port 0: each server bound a free port, and the URLs name it.
        prefect_port = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/api", prefect_api)
        mlflow_port = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", mlflow_uri)
        assert prefect_port and mlflow_port, output
        ports += [int(prefect_port.group(1)), int(mlflow_port.group(1))]
        assert all(port_open(port) for port in ports)
        # The shell line it printed loads the credentials, as a user's shell would.
        credentials_file = workdir / "server" / CREDENTIALS_FILE
        assert f"set -a; . {credentials_file}; set +a" in output
        credentials = read_credentials(credentials_file)
        env = {
            **env,
            "PREFECT_API_URL": prefect_api,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            **credentials.client_env(),
        }
        # This process's MLflow client reads the server's runs with them too.
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", credentials.mlflow_username)
            patch.setenv("MLFLOW_TRACKING_PASSWORD", credentials.mlflow_password)
            yield Stack(root, workdir, prefect_api, mlflow_uri, env, credentials, output)
    finally:
        code = server.stop()
    # Stopped at the end: a plain SIGTERM stops both servers and frees both ports.
    assert code == 0, server.output()[-3000:]
    assert not any(port_open(port) for port in ports)


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> list[str]:
    result = run_cli(["deploy"], home=stack.root / "client-home", env=stack.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Work pool 'aemnist' (process) created" in result.stdout
    match = re.search(r"Deployments: (.+)", result.stdout)
    assert match, result.stdout
    return match.group(1).split(", ")


@dataclass
class DeployedRun:
    flow_run_id: str
    workdir: Path
    failed_seconds: float  # the first attempt, on the faulty worker
    retried_seconds: float  # the retry, on a healthy worker


@pytest.fixture(scope="module")
def deployed_smoke(stack: Stack, deployed: list[str]) -> DeployedRun:
    """The smoke deployment as production sees it: a worker whose environment breaks one
    fold (a bad node, say) runs it and it fails; a healthy worker takes that worker's place
    and the same flow run is retried from the Prefect CLI, to Completed."""
    workdir = stack.root / "deployed-smoke"
    fault = "grid:lr=0.01,weight_decay=1e-05,fold=1"
    with stack.worker("faulty", {"AEMNIST_FAULT": fault}):
        started = time.monotonic()
        flow_run_id = stack.run_deployment("study/smoke", workdir)
        assert stack.wait_for_flow_run(flow_run_id) == "FAILED"
        failed_seconds = time.monotonic() - started
    # A worker started without the tracking server and the mirror in its environment: the
    # deployment's job variables give them to the run.
    with stack.worker("healthy", drop=("MLFLOW_TRACKING_URI", "AEMNIST_MNIST_MIRROR")) as worker:
        started = time.monotonic()
        stack.prefect("flow-run", "retry", flow_run_id)
        state = stack.wait_for_flow_run(flow_run_id)
        retried_seconds = time.monotonic() - started
        assert state == "COMPLETED", worker.output()[-5000:]
    return DeployedRun(flow_run_id, workdir, failed_seconds, retried_seconds)


def parents_of(client: MlflowClient, flow_run_id: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    return [run for run in runs if "mlflow.parentRunId" not in run.data.tags]


def test_servers_with_auth_refuse_requests_without_credentials_and_from_other_sites(
    stack: Stack,
) -> None:
    credentials = stack.credentials
    prefect_user, _, prefect_password = credentials.prefect_auth_string.partition(":")
    prefect_ok = basic_auth(prefect_user, prefect_password)
    mlflow_ok = basic_auth(credentials.mlflow_username, credentials.mlflow_password)
    version = f"{stack.prefect_api}/admin/version"
    assert http_status(version) == 401
    assert http_status(version, headers=basic_auth(prefect_user, "guess")) == 401
    assert http_status(version, headers=prefect_ok) == 200
    assert http_status(f"{stack.prefect_api}/health") == 200  # for monitors, as Prefect has it
    experiments = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=5"
    assert http_status(experiments) == 401
    assert http_status(experiments, headers=basic_auth("admin", "guess")) == 401
    assert http_status(experiments, headers=mlflow_ok) == 200
    assert http_status(f"{stack.mlflow_uri}/health") == 200

    # Another site's page, even in a browser that holds the credentials, is refused: its
    # CORS preflight fails, and a write without the CSRF token only a permitted page can
    # read is forbidden; MLflow blocks other sites' writes outright.
    assert preflight(f"{stack.prefect_api}/deployments/") == 400
    foreign = {"Origin": FOREIGN_ORIGIN}
    pools = f"{stack.prefect_api}/work_pools/"
    assert http_status(pools, "POST", prefect_ok | foreign, b'{"name": "theirs"}') == 403
    create = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/create"
    body = json.dumps({"name": "from-elsewhere"}).encode()
    assert http_status(create, "POST", mlflow_ok | foreign, body) == 403

    # The credentials are the owner's alone, and the server never showed them.
    credentials_file = stack.workdir / "server" / CREDENTIALS_FILE
    assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
    assert prefect_password not in stack.output
    assert credentials.mlflow_password not in stack.output


def test_clients_without_the_credentials_are_told_where_to_find_them(stack: Stack) -> None:
    home = stack.root / "client-home"
    no_prefect = {**stack.env, "PREFECT_API_AUTH_STRING": ""}
    worker = run_cli(["worker"], home=home, env=no_prefect)
    assert worker.returncode == 2
    assert "asks for credentials and PREFECT_API_AUTH_STRING is not set" in worker.stderr
    assert "credentials.env" in worker.stderr and "Traceback" not in worker.stderr

    wrong_mlflow = {**stack.env, "MLFLOW_TRACKING_PASSWORD": "guess"}
    deploy = run_cli(["deploy"], home=home, env=wrong_mlflow)
    assert deploy.returncode == 2
    assert "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD were refused" in deploy.stderr, (
        deploy.stderr
    )
    assert "guess" not in deploy.stderr


def test_deploy_creates_the_pool_and_a_deployment_per_profile(deployed: list[str]) -> None:
    assert deployed == ["study/paper", "study/quick", "study/smoke"]


def test_deployments_record_their_pull_step_run_environment_and_one_run_at_a_time(
    stack: Stack, deployed: list[str], mnist_mirror: Path
) -> None:
    for name in deployed:
        deployment = stack.api(f"/deployments/name/{name}")
        # An explicit pull step to the checkout `aemnist deploy` ran from, the mirror and the
        # tracking server of the deploying shell, one flow run at a time, the next queued.
        assert deployment["pull_steps"] == [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": str(REPO_ROOT.resolve())
                }
            }
        ], name
        assert deployment["job_variables"] == {
            "env": {
                "AEMNIST_MNIST_MIRROR": str(mnist_mirror),
                "MLFLOW_TRACKING_URI": stack.mlflow_uri,
            }
        }, name
        assert deployment["global_concurrency_limit"]["limit"] == 1, name
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE", name


def test_deploy_refuses_a_mirror_with_credentials_and_names_where_it_goes_instead(
    stack: Stack, deployed: list[str]
) -> None:
    secret = "https://reader:s3cret@mirror.example/mnist"
    result = run_cli(
        ["deploy"],
        home=stack.root / "client-home",
        env={**stack.env, "AEMNIST_MNIST_MIRROR": secret},
    )
    assert result.returncode == 2
    assert result.stderr == (
        "aemnist: error: AEMNIST_MNIST_MIRROR=https://***@mirror.example/mnist carries "
        "credentials or a query string, which the deployments would store in Prefect as a job "
        "variable: unset it in this shell and set it in the environment of `aemnist worker` "
        "instead\n"
    )


def test_deployment_run_logs_runs_metrics_artifacts_and_model_to_the_tracking_server(
    stack: Stack, deployed_smoke: DeployedRun
) -> None:
    flow_run_id, workdir = deployed_smoke.flow_run_id, deployed_smoke.workdir
    # The deployment recorded the repo root as its working directory and the run kept the
    # deployment's profile, with the work dir overridden at trigger time.
    flow_run = stack.flow_run(flow_run_id)
    assert flow_run["parameters"] == {"profile": "smoke", "workdir": str(workdir)}

    client = MlflowClient(stack.mlflow_uri)
    failed, parent = parents_of(client, flow_run_id)  # the failed attempt, then the retry
    assert (failed.info.status, parent.info.status) == ("FAILED", "FINISHED")
    assert parent.data.params["grid.learning_rates"] == "[0.01, 0.005]"
    assert 0 < parent.data.metrics["final_test_mse"] < SMOKE_FINAL_MSE_BOUND
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "report.md",
        "figures",
        "tables",
    }

    # Across the two attempts, every task has exactly one FINISHED nested run.
    finished: dict[str, list] = {}
    for attempt in (failed, parent):
        for name, run in nested_runs(client, attempt.info.run_id).items():
            assert run.data.tags["prefect.flow_run_id"] == flow_run_id, name
            if run.info.status == "FINISHED":
                finished.setdefault(name, []).append(run)
    final_name = next(name for name in finished if name.startswith("final size="))
    assert set(finished) - {final_name} == expected_task_runs()
    assert all(len(runs) == 1 for name, runs in finished.items() if name != "download")
    for name in grid_names():
        run = finished[name][0]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, SMOKE.grid.epochs + 1))
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["tables"]

    # The model is registered on the server and loads from it (its files travel through
    # the server's artifact proxy, not a shared path).
    import mlflow.pytorch
    import torch

    final = finished[final_name][0]
    versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    version = next(v for v in versions if v.run_id == final.info.run_id)
    mlflow.set_tracking_uri(stack.mlflow_uri)
    try:
        model = mlflow.pytorch.load_model(f"models:/{REGISTERED_MODEL}/{version.version}")
    finally:
        mlflow.set_tracking_uri(None)
    with torch.inference_mode():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    # The very model the final task saved in the run's work dir, served back by the registry.
    assert_registered_model_is_the_final_model(model, workdir, final.data.metrics["test_mse"])
    assert final.data.metrics["test_mse"] == parent.data.metrics["final_test_mse"]

    # Everything landed on the server's store; the run's work dir holds tables, no store.
    assert not (workdir / "mlflow.db").exists()
    assert (workdir / "report.md").exists()
    stored = stack.workdir / "mlartifacts"
    assert any(stored.rglob("report.md"))
    served = MlflowClient(embedded_tracking_uri(stack.workdir))
    assert served.get_run(parent.info.run_id).info.status == "FINISHED"


def test_deployment_run_shows_tables_1_and_2_and_the_report_in_prefect(
    stack: Stack, deployed_smoke: DeployedRun
) -> None:
    flow_run_id, workdir = deployed_smoke.flow_run_id, deployed_smoke.workdir
    artifacts = stack.artifacts(flow_run_id)
    assert artifacts["aemnist-report"]["type"] == "markdown"
    assert artifacts["aemnist-report"]["data"] == (workdir / "report.md").read_text()
    table_1, table_2 = artifacts["aemnist-table-1"], artifacts["aemnist-table-2"]
    assert (table_1["type"], table_2["type"]) == ("table", "table")
    rows_1, rows_2 = json.loads(table_1["data"]), json.loads(table_2["data"])
    n_pairs = len(SMOKE.grid.learning_rates) * len(SMOKE.grid.weight_decays)
    assert len(rows_1) == n_pairs and {"lr", "weight_decay"} <= set(rows_1[0])
    assert sorted(row["size"] for row in rows_2) == sorted(SMOKE.sweep.sizes)
    # Each attempt links to its MLflow parent run on the tracking server's UI.
    links = {a["data"] for a in stack.all_artifacts(flow_run_id) if a["key"] == "mlflow-run"}
    client = MlflowClient(stack.mlflow_uri)
    assert links == {
        f"[MLflow run {run.info.run_id}]({stack.mlflow_uri}/#/experiments/"
        f"{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning)"
        for run in parents_of(client, flow_run_id)
    }


def test_credentials_reach_no_log_flow_parameter_or_mlflow_run(
    stack: Stack, deployed_smoke: DeployedRun
) -> None:
    # The workers ran the deployment with the credentials in their environment.
    secrets = [
        stack.credentials.prefect_auth_string.partition(":")[2],
        stack.credentials.mlflow_password,
    ]
    logs = sorted(stack.root.glob("*.log")) + sorted((stack.workdir / "server").glob("*.log"))
    assert len(logs) >= 4  # the stack's, its two servers' and the workers'
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(secret in text for secret in secrets), log
    flow_run = stack.flow_run(deployed_smoke.flow_run_id)
    assert not any(secret in json.dumps(flow_run) for secret in secrets)
    client = MlflowClient(stack.mlflow_uri)
    for parent in parents_of(client, deployed_smoke.flow_run_id):
        for run in [parent, *nested_runs(client, parent.info.run_id).values()]:
            recorded = json.dumps([run.data.params, run.data.tags])
            assert not any(secret in recorded for secret in secrets), run.info.run_name


def test_failed_deployment_run_retried_from_the_cli_reuses_completed_tasks(
    stack: Stack, deployed_smoke: DeployedRun
) -> None:
    client = MlflowClient(stack.mlflow_uri)
    failed, retried = parents_of(client, deployed_smoke.flow_run_id)
    first = nested_runs(client, failed.info.run_id)
    assert first[FAULTY_FOLD].info.status == "FAILED"
    assert "AEMNIST_FAULT" in first[FAULTY_FOLD].data.tags["error"]
    # The retry trained only the fold that had failed; the five others are reused and
    # linked to the runs of the failed attempt that produced them.
    second = nested_runs(client, retried.info.run_id)
    assert {name for name in second if name.startswith("grid lr=")} == {FAULTY_FOLD}
    assert second[FAULTY_FOLD].info.status == "FINISHED"
    links = {k: v for k, v in retried.data.tags.items() if k.startswith("reused.grid")}
    assert sorted(links.values()) == sorted(
        first[name].info.run_id for name in grid_names() - {FAULTY_FOLD}
    )


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's chromium, headless, driven by Playwright (its own browser download cannot
    work offline)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield browser
        finally:
            browser.close()


def test_prefect_ui_logs_in_and_shows_the_task_runs_of_a_finished_deployment_run(
    stack: Stack, deployed_smoke: DeployedRun
) -> None:
    from playwright.sync_api import expect

    ui = stack.prefect_api.removesuffix("/api")
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # The UI talks to the API of the server that served it (on this port, not 4200), and
        # asks for the auth string before it shows anything.
        page.goto(f"{ui}/login")
        expect(page.get_by_role("heading", name="Login")).to_be_visible(timeout=60_000)
        page.get_by_placeholder("admin:pass").fill(stack.credentials.prefect_auth_string)
        page.get_by_role("button", name="Login").click()
        page.goto(f"{ui}/runs/flow-run/{deployed_smoke.flow_run_id}")
        expect(page.get_by_text("Completed").first).to_be_visible(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "prefect-ui-flow-run.png")
        page.get_by_text("Task Runs", exact=True).click()
        for name in sorted(grid_names()) + ["grid summary", "corruption", "embedding"]:
            expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "prefect-ui-task-runs.png", full_page=True)


def test_mlflow_ui_compares_the_grid_runs_on_parallel_coordinates(
    stack: Stack, deployed_smoke: DeployedRun
) -> None:
    from playwright.sync_api import expect

    client = MlflowClient(stack.mlflow_uri)
    runs = [
        run
        for parent in parents_of(client, deployed_smoke.flow_run_id)
        for name, run in nested_runs(client, parent.info.run_id).items()
        if name in grid_names() and run.info.status == "FINISHED"
    ]
    assert len(runs) == len(grid_names())
    ids = json.dumps([run.info.run_id for run in runs])
    experiments = json.dumps([runs[0].info.experiment_id])
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        page = stack.mlflow_page(browser, height=1000)
        page.goto(f"{stack.mlflow_uri}/#/compare-runs?runs={ids}&experiments={experiments}")
        expect(page.get_by_text(f"Comparing {len(runs)} Runs")).to_be_visible(timeout=60_000)
        expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
        # The plot's axes as a reader picks them: the grid's two parameters and the loss.
        page.get_by_role("button", name="Clear All").click()
        parameters, metrics = page.get_by_role("combobox").all()[:2]
        parameters.click()
        for name in ("lr", "weight_decay"):
            parameters.fill(name)
            page.keyboard.press("Enter")
        metrics.click()
        metrics.fill("val_loss")
        page.keyboard.press("Enter")
        page.keyboard.press("Escape")
        titles = page.locator(".js-plotly-plot text.axis-title")
        expect(titles).to_have_count(3, timeout=60_000)
        assert titles.evaluate_all("ts => ts.map(t => t.textContent)") == [
            "lr", "weight_decay", "val_loss"
        ]  # fmt: skip
        # Each axis spans its values over the runs (the plot shows them to 5 decimals).
        extents = page.locator(".js-plotly-plot text.axis-extent-text").evaluate_all(
            "ts => ts.map(t => t.textContent)"
        )
        spans = [
            [float(run.data.params["lr"]) for run in runs],
            [float(run.data.params["weight_decay"]) for run in runs],
            [run.data.metrics["val_loss"] for run in runs],
        ]
        assert extents == [f"{f(span):.5f}" for span in spans for f in (max, min)]
        page.locator(".js-plotly-plot").first.scroll_into_view_if_needed()
        page.screenshot(path=ARTIFACTS / "mlflow-ui-parallel-coordinates.png")


def test_mlflow_ui_shows_the_final_models_alias_on_the_registered_model_page(
    stack: Stack, deployed_smoke: DeployedRun
) -> None:
    from playwright.sync_api import expect

    client = MlflowClient(stack.mlflow_uri)
    _, parent = parents_of(client, deployed_smoke.flow_run_id)
    final = next(
        run for name, run in nested_runs(client, parent.info.run_id).items()
        if name.startswith("final size=")
    )  # fmt: skip
    version = client.get_model_version_by_alias(REGISTERED_MODEL, "latest-smoke")
    assert version.run_id == final.info.run_id
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        page = stack.mlflow_page(browser)
        page.goto(f"{stack.mlflow_uri}/#/models/{REGISTERED_MODEL}")
        row = page.get_by_role("row").filter(has_text=f"Version {version.version}")
        expect(row).to_contain_text("@ latest-smoke", timeout=60_000)
        page.screenshot(path=ARTIFACTS / "mlflow-ui-registered-model.png")


def test_mlflow_ui_shows_the_study_a_fold_and_its_metric_charts(
    stack: Stack, deployed_smoke: DeployedRun
) -> None:
    from playwright.sync_api import expect

    client = MlflowClient(stack.mlflow_uri)
    failed, parent = parents_of(client, deployed_smoke.flow_run_id)
    experiment_id = parent.info.experiment_id
    fold = nested_runs(client, failed.info.run_id)["grid lr=0.005 wd=1e-05 fold=2"]
    sweep = nested_runs(client, parent.info.run_id)[f"sweep size={SMOKE.sweep.sizes[-1]}"]
    ARTIFACTS.mkdir(exist_ok=True)
    base = f"{stack.mlflow_uri}/#/experiments/{experiment_id}"

    with chromium() as browser:
        page = stack.mlflow_page(browser)
        page.goto(f"{base}/runs", wait_until="domcontentloaded")
        study_link = page.get_by_role("link", name="study-smoke").first
        expect(study_link).to_be_visible(timeout=60_000)
        page.screenshot(path=ARTIFACTS / "mlflow-ui-experiment.png")

        page.goto(f"{base}/runs/{fold.info.run_id}", wait_until="domcontentloaded")
        expect(page.get_by_text("grid lr=0.005 wd=1e-05 fold=2").first).to_be_visible(
            timeout=60_000
        )
        params = page.get_by_text(re.compile(r"^Parameters \(\d+\)$"))
        expect(params).to_have_text(f"Parameters ({len(fold.data.params)})")
        for name in ("weight_decay", "fold", "size", "epochs"):  # names no metric has
            row = page.get_by_role("row").filter(
                has=page.get_by_role("cell", name=name, exact=True)
            )
            expect(row).to_contain_text(fold.data.params[name])
        page.screenshot(path=ARTIFACTS / "mlflow-ui-fold-run.png")

        # A run with several epochs, so that its charts draw lines, not single points.
        page.goto(f"{base}/runs/{sweep.info.run_id}", wait_until="domcontentloaded")
        heading = page.get_by_text(sweep.info.run_name, exact=True).first
        expect(heading).to_be_visible(timeout=60_000)
        page.get_by_role("tab", name="Model metrics").click()
        for metric in ("train_loss", "test_loss"):
            expect(page.get_by_text(metric, exact=True).first).to_be_visible(timeout=60_000)
        lines = page.locator(".js-plotly-plot .scatterlayer .trace path.js-line")
        expect(lines.first).to_be_attached(timeout=60_000)
        # Drawn lines: a loss that fell over the epochs is a segment that is not flat.
        points = [
            [tuple(map(float, xy.split(","))) for xy in re.findall(r"[\d.]+,[\d.]+", d)]
            for d in lines.evaluate_all("paths => paths.map(p => p.getAttribute('d'))")
        ]
        assert any(len({y for _, y in line}) > 1 for line in points), points
        page.screenshot(path=ARTIFACTS / "mlflow-ui-metric-charts.png")
    assert (ARTIFACTS / "mlflow-ui-metric-charts.png").stat().st_size > 10_000


@dataclass
class TlsFiles:
    ca: Path  # the certificate authority's certificate
    cert: Path  # a certificate it signed (the scheduler's, the workers' and the client's)
    key: Path

    def option(self) -> str:
        return f"ca={self.ca},cert={self.cert},key={self.key}"

    def dask_args(self) -> list[str]:
        return ["--tls-ca-file", str(self.ca), "--tls-cert", str(self.cert),
                "--tls-key", str(self.key)]  # fmt: skip


def make_tls_files(folder: Path, name: str = "aemnist-test") -> TlsFiles:
    """A certificate authority of its own and one certificate it signed, in PEM, as an
    operator makes them for a cluster (`openssl` would do the same)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                    signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:  # fmt: skip
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(signer, hashes.SHA256())
        )

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files = TlsFiles(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    pem = serialization.Encoding.PEM
    files.ca.write_bytes(certificate(f"{name} CA", ca_key, f"{name} CA", ca_key, True)
                         .public_bytes(pem))  # fmt: skip
    files.cert.write_bytes(certificate(name, key, f"{name} CA", ca_key, False).public_bytes(pem))
    files.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files.key.chmod(0o600)
    return files


@dataclass
class DaskCluster:
    address: str  # tls://127.0.0.1:PORT
    workers: set[str]
    tls: TlsFiles


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """A real Dask cluster from its own command line, as the README's recipe starts one: a
    scheduler and two 1-thread worker processes speaking mutual TLS, on loopback."""
    root = tmp_path_factory.mktemp("dask")
    tls = make_tls_files(root / "tls")
    env = cli_env(root / "home")
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler = Background(
        [*dask, "--protocol", "tls", *tls.dask_args(), "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", ":0"],
        env,
        root / "scheduler.log",
    )  # fmt: skip
    workers = None
    try:
        # Port 0: the scheduler binds a free port; the line after its address is the
        # dashboard's, so the address line is whole.
        output = scheduler.wait_for("dashboard at", timeout=120)
        address = re.search(r"Scheduler at:\s+(tls://127\.0\.0\.1:\d+)\n", output).group(1)
        workers = Background(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, *tls.dask_args(),
             "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            env,
            root / "workers.log",
        )  # fmt: skip
        from distributed import Client
        from distributed.security import Security

        security = Security(
            tls_ca_file=str(tls.ca),
            tls_client_cert=str(tls.cert),
            tls_client_key=str(tls.key),
            require_encryption=True,
        )
        with Client(address, security=security, timeout=120) as client:
            client.wait_for_workers(2, timeout=120)
            addresses = set(client.scheduler_info()["workers"])
        yield DaskCluster(address, addresses, tls)
    finally:
        if workers is not None:
            workers.stop()
        scheduler.stop()


def test_dask_task_runner_runs_the_folds_on_the_cluster_workers_over_tls(
    tmp_path: Path, mnist_mirror: Path, stack: Stack, dask_cluster: DaskCluster
) -> None:
    # As on a real cluster, the Dask workers report to the Prefect server (PREFECT_API_URL,
    # with its credentials); the run logs to the embedded store of its work dir, which every
    # worker can reach.
    workers = dask_cluster.workers
    assert len(workers) == 2
    workdir = tmp_path / "work"
    prefect_only = {
        "PREFECT_API_URL": stack.prefect_api,
        "PREFECT_API_AUTH_STRING": stack.credentials.prefect_auth_string,
    }
    result = run_cli(
        smoke_run(workdir, mnist_mirror, "--task-runner", "dask", "--dask-address",
                  dask_cluster.address, "--dask-security", dask_cluster.tls.option()),
        home=tmp_path / "home",
        env=prefect_only,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    client = MlflowClient(embedded_tracking_uri(workdir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    parent = client.search_runs([experiment.experiment_id], "tags.profile = 'smoke'")[0]
    runs = nested_runs(client, parent.info.run_id)
    ran_on = {name: runs[name].data.tags.get("dask.worker") for name in grid_names()}
    # Every fold ran in a worker process of the cluster, and the two workers shared them.
    assert set(ran_on.values()) <= workers, ran_on
    assert set(ran_on.values()) == workers, ran_on
    for size in SMOKE.sweep.sizes:
        assert runs[f"sweep size={size}"].data.tags.get("dask.worker") in workers
    flow_pid = parent.data.tags["aemnist.pid"]
    assert all(runs[name].data.tags["aemnist.pid"] != flow_pid for name in grid_names())
    assert parent.info.status == "FINISHED"
    assert (workdir / "report.md").exists()


def test_a_tls_scheduler_without_the_right_certificates_is_refused_before_any_work(
    tmp_path: Path, dask_cluster: DaskCluster
) -> None:
    stranger = make_tls_files(tmp_path / "other", name="someone-else")
    address = dask_cluster.address
    run = ["run", "--profile", "smoke", "--workdir", str(tmp_path / "w"), "--task-runner",
           "dask", "--dask-address", address]  # fmt: skip
    cases = {
        "no certificate": ([], "speaks TLS and no client certificate is configured"),
        "another CA": (
            ["--dask-security", stranger.option()],
            f"the TLS handshake with the Dask scheduler {address} failed",
        ),
        "plain tcp": (
            ["--dask-address", "tcp://192.0.2.1:8786"],
            "refusing the unencrypted Dask scheduler tcp://192.0.2.1:8786",
        ),
    }
    for case, (extra, message) in cases.items():
        result = run_cli([*run, *extra], home=tmp_path / "home")
        assert result.returncode == 2, case
        assert message in result.stderr, (case, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)
    assert not (tmp_path / "w").exists()


def test_worker_without_its_pool_or_tracking_server_says_so_before_starting(
    stack: Stack, deployed: list[str]
) -> None:
    home = stack.root / "client-home"
    no_pool = run_cli(["worker", "--pool", "gpu-pool"], home=home, env=stack.env)
    assert no_pool.returncode == 2
    assert "work pool 'gpu-pool' does not exist" in no_pool.stderr
    assert "aemnist deploy" in no_pool.stderr

    with refused_port() as port:
        dead = f"http://127.0.0.1:{port}"
        for command in (["worker"], ["deploy"]):
            env = {**stack.env, "MLFLOW_TRACKING_URI": dead}
            result = run_cli(command, home=home, env=env)
            assert result.returncode == 2, command
            assert f"MLflow tracking server {dead} is unreachable" in result.stderr, command
            assert "Traceback" not in result.stderr


def test_server_commands_name_the_missing_server_the_busy_port_and_the_timeout(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    # Other machines reach a server only with authentication on.
    for command, what in (("server", "Prefect and MLflow servers"), ("ui", "MLflow UI")):
        public = run_cli([command, "--workdir", str(tmp_path / "w"), "--host", "0.0.0.0"], home)
        assert public.returncode == 2, public.stderr
        assert f"refusing to serve the {what} on 0.0.0.0 without authentication" in (public.stderr)
        assert "add --auth" in public.stderr
    assert not (tmp_path / "w").exists()
    for command in (["deploy"], ["worker"]):
        unset = run_cli(command, home=home)
        assert unset.returncode == 2
        assert f"`aemnist {command[0]}` needs a Prefect server" in unset.stderr
    with refused_port() as port:
        silent = f"http://127.0.0.1:{port}/api"
        down = run_cli(["worker"], home=home, env={"PREFECT_API_URL": silent})
    assert down.returncode == 2
    assert f"no Prefect server answers at PREFECT_API_URL={silent}" in down.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_cli(
            ["server", "--workdir", str(tmp_path / "w"), "--prefect-port", "0",
             "--mlflow-port", str(port)],
            home=home,
        )  # fmt: skip
    assert taken.returncode == 2
    assert f"cannot start the MLflow server on 127.0.0.1:{port}: the port is in use" in (
        taken.stderr
    )

    # A Prefect server whose database another process holds locked waits for the lock
    # (up to PREFECT_SERVER_DATABASE_TIMEOUT) before it binds its port: it cannot answer.
    database = tmp_path / "w" / "server" / "prefect.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(database, isolation_level=None)) as lock:
        lock.execute("BEGIN EXCLUSIVE")
        late = run_cli(
            ["server", "--workdir", str(tmp_path / "w"), "--prefect-port", "0",
             "--mlflow-port", "0", "--timeout", "1"],
            home=home,
            env={"PREFECT_SERVER_DATABASE_TIMEOUT": "600"},
        )  # fmt: skip
    assert late.returncode == 2
    assert "the Prefect server did not answer within 1 s" in late.stderr
    assert str(tmp_path / "w" / "server") in late.stderr  # names its log


def test_dask_address_without_a_scheduler_fails_before_any_work(tmp_path: Path) -> None:
    with refused_port() as port:
        address = f"tcp://127.0.0.1:{port}"
        result = run_cli(
            ["run", "--profile", "smoke", "--workdir", str(tmp_path / "w"), "--task-runner",
             "dask", "--dask-address", address],
            home=tmp_path / "home",
        )  # fmt: skip
    assert result.returncode == 2
    assert f"no Dask scheduler answers at {address}" in result.stderr
    assert not (tmp_path / "w" / "mlflow.db").exists()


def test_a_temporary_prefect_server_that_cannot_start_gives_one_clear_error(
    tmp_path: Path,
) -> None:
    # Its database cannot be created: a folder of that name is a regular file.
    (tmp_path / "not-a-folder").write_text("")
    database = f"sqlite+aiosqlite:///{tmp_path / 'not-a-folder' / 'prefect.db'}"
    result = run_cli(
        ["run", "--profile", "smoke", "--workdir", str(tmp_path / "w")],
        home=tmp_path / "home",
        env={"PREFECT_API_DATABASE_CONNECTION_URL": database},
        timeout=180,
    )
    assert result.returncode == 2
    assert "aemnist: error: the temporary Prefect server exited with code 3" in result.stderr
    assert "start one with `aemnist server`" in result.stderr
    assert not (tmp_path / "w" / "grid").exists()  # no task ran


def test_a_deployment_run_honours_runtime_workers_and_gives_the_cli_runs_tables(
    stack: Stack, deployed: list[str], tmp_path: Path, mnist_mirror: Path
) -> None:
    # runtime.workers = 1 from a config file: the deployment run must size its task runner
    # from it (before, a deployment ran the decorator's one-per-core runner whatever it said).
    config = tmp_path / "one-worker.toml"
    config.write_text("[runtime]\nworkers = 1\n")
    deployed_dir, cli_dir = tmp_path / "deployed", tmp_path / "cli"
    with stack.worker("single") as worker:
        proc = stack.prefect(
            "deployment", "run", "study/smoke",
            "--param", f"workdir={deployed_dir}", "--param", f"config_file={config}",
        )  # fmt: skip
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1)
        assert stack.wait_for_flow_run(flow_run_id) == "COMPLETED", worker.output()[-5000:]
        # A deployment run takes the work dir's lock too: while another process holds it
        # (here this one, as a running `aemnist run` would), the run stops before any task.
        # The finished run's process lets the lock go as it exits, a moment after its state.
        for _ in range(300):
            try:
                held = lock_workdir(deployed_dir)
                break
            except WorkdirLocked:
                time.sleep(0.1)
        else:
            raise AssertionError(f"the finished run kept {deployed_dir}'s lock for 30 s")
        with held:
            second = stack.run_deployment("study/smoke", deployed_dir)
            assert stack.wait_for_flow_run(second) == "FAILED"
        stack.wait_for_log(second, f"work dir {deployed_dir} is in use by process {os.getpid()}")
        tasks = stack.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [second]}}})
        assert tasks == []

    client = MlflowClient(stack.mlflow_uri)
    (parent,) = parents_of(client, flow_run_id)
    assert parent.data.params["runtime.workers"] == "1"
    runs = nested_runs(client, parent.info.run_id)
    spans = sorted((runs[name].info.start_time, runs[name].info.end_time) for name in grid_names())
    # One task slot: each grid task started after the one before it had ended.
    assert all(later[0] >= earlier[1] for earlier, later in pairwise(spans)), spans

    result = run_cli(
        smoke_run(cli_dir, mnist_mirror, "--config", str(config)), home=tmp_path / "home"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tables = sorted(p.relative_to(deployed_dir) for p in deployed_dir.rglob("*.parquet")
                    if "mlartifacts" not in p.parts and p.parts[-2] != "data")  # fmt: skip
    assert len(tables) >= 10
    for name in tables:  # same machine, same config and seed: the same bytes
        assert (deployed_dir / name).read_bytes() == (cli_dir / name).read_bytes(), name
