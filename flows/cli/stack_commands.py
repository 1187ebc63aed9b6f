"""The production stack's commands: `server` (a Prefect server and an MLflow tracking
server), `deploy` (the work pool and the study's deployments), `worker`, and `ui` (the
MLflow UI on a work dir's store)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING

from aemnist.workdir import LOCK_NAME
from deployments.discovery import PREFECT_PORT
from deployments.stack import JOB_ENV, LOOPBACK, PROJECT_ROOT, ROOT_ENV, WORK_POOL, StackError
from flows.cli.options import add_auth, add_host, add_port, add_workdir

if TYPE_CHECKING:
    from pathlib import Path

    from aemnist.workdir import WorkdirLock
    from flows.cli.options import Commands

# Seconds a stopped `server` or `ui` has to stop its servers in order before it stops them
# at once and exits: each server gets up to 15 s between its SIGTERM and its SIGKILL.
SERVER_GRACE = 45.0
UI_GRACE = WORKER_GRACE = 30.0
# Seconds `ui` waits for the MLflow UI to answer.
UI_TIMEOUT = 180.0
# `aemnist server --database`'s value from the environment (a URL with a password).
DATABASE_ENV = "AEMNIST_DATABASE"


def add_ui(commands: Commands) -> None:
    ui = commands.add_parser(
        "ui",
        help="serve the MLflow UI on a work dir's store",
        description="Serve the MLflow UI on the embedded store of a work dir "
        "(its SQLite database and artifact folder).",
    )
    add_workdir(ui)
    add_port(ui, "--port", 5000)
    add_host(ui, "to bind")
    add_auth(ui)
    ui.set_defaults(handler=_ui)


def add_server(commands: Commands) -> None:
    server = commands.add_parser(
        "server",
        help="start a Prefect server and an MLflow tracking server; print their URLs",
        description="Start a Prefect server (API and UI; its database in WORKDIR/server) and "
        "an MLflow tracking server on the work dir's store (WORKDIR/mlflow.db and "
        "WORKDIR/mlartifacts, or --artifacts URL), wait until both answer, print their URLs "
        "and the variables that point the other commands at them, and serve until Ctrl-C.",
    )
    add_workdir(server)
    add_host(server, "both servers bind")
    add_port(server, "--prefect-port", PREFECT_PORT)
    add_port(server, "--mlflow-port", 5000)
    server.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for both servers to answer (default: 180)",
    )
    add_auth(server)
    server.add_argument(
        "--database",
        default=os.environ.get(DATABASE_ENV, "sqlite"),
        metavar="sqlite|postgres|URL",
        help="where both servers keep their data: sqlite (the default: WORKDIR/mlflow.db and "
        "WORKDIR/server/prefect.db), postgres (a PostgreSQL cluster of the stack's own in "
        "WORKDIR/server/postgres, on 127.0.0.1) or postgresql://USER:PASSWORD@HOST:PORT (an "
        "existing server; the stack uses its databases prefect and mlflow, created if "
        f"absent). A password in this option shows in `ps`: set {DATABASE_ENV} instead",
    )
    server.add_argument(
        "--database-port",
        type=int,
        default=5432,
        metavar="PORT",
        help="the port of the stack's own PostgreSQL cluster (default: 5432)",
    )
    server.add_argument(
        "--artifacts",
        metavar="URL",
        help="where the MLflow server stores the runs' artifacts (default: WORKDIR/mlartifacts): "
        "an fsspec URL such as s3://bucket/prefix, checked (bucket, credentials, a write) "
        "before anything starts. The server writes there with the credentials of its own "
        "environment (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and "
        "AWS_ENDPOINT_URL for an S3-compatible service); runs send their artifacts through "
        "it and need none. MLflow keeps an experiment's artifact location: a study first run "
        "without a server keeps its artifacts in WORKDIR/mlartifacts whatever URL says (a new "
        "work dir puts them at URL); an experiment created through `aemnist server` stores "
        "at the destination of the server of the day, so artifacts logged through one with "
        "another --artifacts are not found by this one",
    )
    server.set_defaults(handler=_server)


def add_deploy(commands: Commands) -> None:
    deploy = commands.add_parser(
        "deploy",
        help=f"create the {WORK_POOL!r} process work pool and the study's deployments",
        description=f"Create the process work pool {WORK_POOL!r} (unless it exists) and apply "
        f"deployments/prefect.yaml: the study flow as study/smoke, study/quick and "
        f"study/paper. Needs PREFECT_API_URL.",
    )
    deploy.set_defaults(handler=_deploy)


def add_worker(commands: Commands) -> None:
    worker = commands.add_parser(
        "worker",
        help=f"start a process worker on the {WORK_POOL!r} pool",
        description="Start a Prefect process worker that runs the study's deployments. Its "
        "environment (MLFLOW_TRACKING_URI, AEMNIST_MNIST_MIRROR) passes to every run it "
        "starts. Needs PREFECT_API_URL and the pool (`aemnist deploy`).",
    )
    worker.add_argument("--pool", default=WORK_POOL, help=f"(default: {WORK_POOL})")
    worker.add_argument("--limit", type=int, help="at most this many flow runs at once")
    worker.add_argument("--name", help="the worker's name (default: Prefect's)")
    worker.set_defaults(handler=_worker)


def _server(args: argparse.Namespace) -> int:
    from aemnist.data import ensure_writable
    from deployments.auth import load_or_create_credentials, require_auth_off_loopback
    from deployments.discovery import Endpoints, write_endpoints
    from deployments.postgres import OWN_CLUSTER, open_database, parse_database
    from deployments.servers import (
        check_port_free,
        handle_stop_signals,
        start_mlflow_server,
        start_prefect_server,
        stop_children,
        stop_exit_code,
        stop_signal,
        wait_until_ready,
    )

    require_auth_off_loopback(args.host, args.auth, "Prefect and MLflow servers")
    spec = parse_database(args.database)
    if args.artifacts is not None:
        check_artifacts(args.artifacts)
    workdir = args.workdir.resolve()
    ensure_writable(workdir)
    state = workdir / "server"
    state.mkdir(mode=0o700, exist_ok=True)
    _lock = lock_server(state)  # held until this process ends
    credentials, credentials_file, created = (
        load_or_create_credentials(state) if args.auth else (None, None, False)
    )
    check_port_free(args.host, args.prefect_port, "Prefect server", "--prefect-port")
    check_port_free(args.host, args.mlflow_port, "MLflow server", "--mlflow-port")
    if spec == OWN_CLUSTER:
        check_port_free(LOOPBACK, args.database_port, "PostgreSQL server", "--database-port")
    # Before the first server: Ctrl-C, a plain `kill` or a closed terminal (SIGINT, SIGTERM,
    # SIGHUP) stops both servers, during their start-up too.
    handle_stop_signals(SERVER_GRACE)
    env = dict(os.environ)
    env.pop(DATABASE_ENV, None)  # its password is for the servers' database URLs only
    serving = False
    try:
        # PostgreSQL first: launched before both servers, it is stopped after them.
        database = open_database(spec, state, args.database_port, args.timeout, _tell)
        if database is not None:
            print(f"Database: {database.description}", flush=True)
        print("Starting the Prefect server and the MLflow server ...", flush=True)
        prefect = start_prefect_server(
            state, args.host, args.prefect_port, env, credentials,
            database_url=database and database.prefect_url,
        )  # fmt: skip
        mlflow = start_mlflow_server(
            workdir, state, args.host, args.mlflow_port, env, credentials,
            backend_store_uri=database and database.mlflow_url, artifacts=args.artifacts,
        )  # fmt: skip
        services = [prefect, mlflow]
        wait_until_ready(services, args.timeout)
        # `aemnist run --workdir` on this work dir finds these servers and runs on them.
        write_endpoints(workdir, Endpoints(f"{prefect.url}/api", mlflow.url, os.getpid()))
        if credentials_file is None:
            access = "no authentication (loopback only; --auth to require it)"
            load = ""
        else:
            access = (
                f"authentication required; credentials {'written to' if created else 'from'} "
                f"{credentials_file} (yours alone)"
            )
            load = f"  set -a; . {credentials_file}; set +a\n"
        print(
            f"Prefect server: {prefect.url}  (UI; API at {prefect.url}/api)\n"
            f"MLflow server:  {mlflow.url}  (UI and tracking; store: {workdir}"
            f"{f', artifacts at {args.artifacts}' if args.artifacts else ''})\n"
            f"Access: {access}\n"
            f"In each shell that deploys, starts a worker or runs the study:\n"
            f"  export PREFECT_API_URL={prefect.url}/api\n"
            f"  export MLFLOW_TRACKING_URI={mlflow.url}\n"
            f"{load}"
            f"Logs: {state}/*.log. Ctrl-C stops both servers"
            f"{' and PostgreSQL' if spec == OWN_CLUSTER else ''}.",
            flush=True,
        )
        serving = True
        while all(service.alive() for service in services):
            time.sleep(1.0)
        dead = next(service for service in services if not service.alive())
        raise StackError(
            f"the {dead.name} stopped (exit code {dead.process.returncode}); see {dead.log}"
        )
    except BaseException:
        if (signum := stop_signal()) is None:
            raise
        _tell("Stopping the servers.")
        # Stopped while serving is how a server ends; during its start-up, it did not start.
        return 0 if serving else stop_exit_code(signum)
    finally:
        stop_children()


def check_artifacts(url: str) -> None:
    """Stop `aemnist server --artifacts URL` in one line, before it starts or creates
    anything, when the MLflow server could not store artifacts at ``url``: not a URL, an
    unknown protocol, no credentials, an unreachable endpoint, no such bucket, no write."""
    from aemnist.storage import StorageError, check_storage, is_url

    if not is_url(url):
        raise StackError(
            f"--artifacts {url} is not a URL: name the store as one (s3://bucket/prefix), or "
            f"leave --artifacts out to keep the artifacts in WORKDIR/mlartifacts"
        )
    try:
        check_storage(url)
    except StorageError as exc:
        raise StackError(f"--artifacts: {exc}") from None


def lock_server(state: Path) -> WorkdirLock:
    """The work dir's server lock (an flock on WORKDIR/server/.aemnist.lock): one `aemnist
    server` per work dir, so that two never start servers, or PostgreSQL, on one store."""
    from aemnist.workdir import WorkdirLocked, lock_workdir

    try:
        return lock_workdir(state)
    except WorkdirLocked as exc:
        who = f"process {exc.holder}" if exc.holder else "another process"
        raise StackError(
            f"work dir {state.parent} is already served by {who} (another `aemnist server`; "
            f"it holds {state / LOCK_NAME}): use that one, stop it first, or pick another "
            f"--workdir"
        ) from None


def _tell(line: str) -> None:
    """Print, unless the terminal has gone (a SIGHUP)."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def _deploy(args: argparse.Namespace) -> int:
    from aemnist.tracking import TRACKING_ENV, check_reachable
    from deployments.servers import require_prefect_api
    from deployments.stack import deploy_study, ensure_work_pool

    api = require_prefect_api("deploy")
    tracking = os.environ.get(TRACKING_ENV)
    if tracking:
        check_reachable(tracking)
    created = ensure_work_pool(WORK_POOL)
    print(f"Work pool {WORK_POOL!r} (process) {'created' if created else 'exists'} on {api}")
    names = deploy_study(os.environ)
    print(f"Deployments: {', '.join(names)}")
    recorded = [name for name in JOB_ENV if os.environ.get(name)]
    print(
        f"Their runs start in {os.environ.get(ROOT_ENV) or PROJECT_ROOT}, with "
        + (f"{' and '.join(recorded)} as in this shell" if recorded else "the worker's environment")
    )
    print("Next: `aemnist worker`, then for instance `prefect deployment run study/smoke` "
          "(override any parameter with --param NAME=VALUE)")  # fmt: skip
    return 0


def _worker(args: argparse.Namespace) -> int:
    from aemnist.tracking import TRACKING_ENV, check_reachable
    from deployments.servers import (
        handle_stop_signals,
        launch_child,
        require_prefect_api,
        stop_children,
        stop_signal,
    )
    from deployments.stack import work_pool_exists, worker_command

    api = require_prefect_api("worker")
    if not work_pool_exists(args.pool):
        raise StackError(
            f"work pool {args.pool!r} does not exist on {api}: create it and the deployments "
            f"with `aemnist deploy`"
        )
    tracking = os.environ.get(TRACKING_ENV)
    if tracking:
        check_reachable(tracking)
        print(f"Runs log to {tracking}, unless their deployment names another tracking server")
    else:
        print(
            "MLFLOW_TRACKING_URI is not set: runs log where their deployment says, else to the "
            "embedded store of their work dir"
        )
    command = worker_command(args.pool, args.limit, args.name)
    print(f"Worker on pool {args.pool!r} at {api}: {' '.join(command[2:])}", flush=True)
    # Prefect's worker runs as our child rather than in our place, so that a SIGHUP (a closed
    # terminal), which it does not handle, stops it and its flow runs as SIGINT and SIGTERM do.
    handle_stop_signals(WORKER_GRACE)
    try:
        worker = launch_child("Prefect worker", command, os.environ)
        return worker.process.wait()
    except BaseException:
        if stop_signal() is None:
            raise
        return 0  # stopped: how a worker ends
    finally:
        stop_children()


def _ui(args: argparse.Namespace) -> int:
    from aemnist.tracking import TrackingError, embedded_tracking_uri
    from deployments.auth import (
        load_or_create_credentials,
        mlflow_auth,
        require_auth_off_loopback,
        without_client_credentials,
    )
    from deployments.servers import (
        check_port_free,
        handle_stop_signals,
        launch_server,
        stop_children,
        stop_exit_code,
        stop_signal,
        wait_until_answers,
    )

    require_auth_off_loopback(args.host, args.auth, "MLflow UI")
    workdir = args.workdir.resolve()
    if not (workdir / "mlflow.db").exists():
        raise TrackingError(
            f"{workdir} holds no MLflow store (mlflow.db); run `aemnist run --workdir {workdir}` "
            f"first or pass the work dir of an earlier study with --workdir"
        )
    if args.port:  # a busy port is named now, not in MLflow's log after a minute
        check_port_free(args.host, args.port, "MLflow UI", "--port")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        embedded_tracking_uri(workdir),
        "--default-artifact-root",
        (workdir / "mlartifacts").as_uri(),
        # Runs whose artifact URI is proxied (mlflow-artifacts:/..., as an exported store's
        # are: aemnist.export) are served from the work dir's artifact folder, wherever it
        # now is; MLflow's own default is ./mlartifacts of whatever folder the UI started in.
        "--serve-artifacts",
        "--artifacts-destination",
        str(workdir / "mlartifacts"),
        "--host",
        args.host,
        "--port",
        str(args.port),
        # One worker process serves one person's browser; MLflow's default of four costs
        # seconds of start-up on two cores.
        "--workers",
        "1",
    ]
    env = without_client_credentials(os.environ)
    access = ""
    if args.auth:
        state = workdir / "server"
        credentials, credentials_file, _ = load_or_create_credentials(state)
        auth_args, auth_env = mlflow_auth(state, credentials)
        command += auth_args
        env |= auth_env
        access = f"; user {credentials.mlflow_username}, password in {credentials_file}"
    handle_stop_signals(UI_GRACE)  # before the server: Ctrl-C, kill or SIGHUP stop it
    serving = False
    try:
        # Its output is ours; its process group its own, stopped whole when we stop.
        service = launch_server("MLflow UI", command, env, args.host, args.port, "/health")
        # Read while the server starts: the page of the study's runs, announced with it.
        from aemnist.tracking import study_experiment_id, ui_page

        experiment_id = study_experiment_id(embedded_tracking_uri(workdir))
        at = f"{args.host}:{args.port}" if args.port else f"{args.host} (a free port)"
        if not wait_until_answers(service, time.monotonic() + UI_TIMEOUT, interval=0.2):
            code = service.process.returncode
            raise StackError(
                f"the MLflow UI did not start on {at}: "
                + (
                    f"it exited with code {code} before answering (its messages are above)"
                    if code is not None
                    else f"it did not answer within {UI_TIMEOUT:g} s"
                )
            )
        # Announced once it answers: on port 0 the port it bound is known only then.
        url = f"http://{args.host}:{service.port}"
        print(f"MLflow UI on {url} (store: {workdir}{access}); Ctrl-C stops it.", flush=True)
        if experiment_id is not None:
            print(f"The study's runs: {ui_page(url, experiment_id)}", flush=True)
        serving = True
        code = service.process.wait()
        raise StackError(f"the MLflow UI on {args.host}:{service.port} stopped (exit code {code})")
    except BaseException:
        if (signum := stop_signal()) is None:
            raise
        return 0 if serving else stop_exit_code(signum)
    finally:
        stop_children()
