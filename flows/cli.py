"""``aemnist``: run the study, rebuild its report, browse its runs in the MLflow UI."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Only light modules here: `aemnist run` starts its temporary Prefect server before it
# imports torch, MLflow, pandas and Prefect, so that the server's start-up overlaps theirs.
from aemnist.config import (
    DEVICES,
    MIRROR_ENV,
    PROFILES,
    ConfigError,
    StudyConfig,
    load_config,
    read_saved_config,
    run_overrides,
)
from aemnist.layout import Layout
from aemnist.plan import STAGES
from deployments.stack import LOOPBACK, PREFECT_API_ENV, WORK_POOL, StackError

DEFAULT_WORKDIR = "aemnist-runs"


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: one line, no traceback."""
    from aemnist.data import DataError
    from aemnist.schemas import TableError
    from aemnist.tracking import TrackingError

    return (ConfigError, DataError, TableError, TrackingError, StackError)


# Offline machines: no analytics or telemetry calls, and room for a slow first start of the
# temporary Prefect server on two busy cores.
OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def _workdir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR), help="the work dir")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the flags of ``run`` and ``status`` override."""
    return run_overrides(args.seed, args.device, args.repeats)


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        help="where models train and evaluate: auto (a GPU where torch sees one, else the CPU), "
        "cpu or cuda; default: the config's runtime.device (auto). On a GPU, "
        "runtime.gpu_concurrency tasks share it",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aemnist",
        description="A convolutional autoencoder study on MNIST, orchestrated by Prefect and "
        "tracked in MLflow.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run the whole study (the `study` flow)",
        description="Run every stage of the study: download, folds, grid search, size sweep, "
        "final model, corruption, embedding, report. Progress is logged as each task runs.",
    )
    run.add_argument(
        "--profile",
        choices=PROFILES,
        help="smoke (about a minute, for tests), quick (the default: full data, reduced grid "
        "and epochs) or paper (the seed's study exactly)",
    )
    run.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="a TOML file overriding any field of the profile (see aemnist/profiles/*.toml)",
    )
    run.add_argument(
        "--workdir",
        type=Path,
        default=Path(DEFAULT_WORKDIR),
        help=f"where tables, checkpoints, figures, the report and the embedded MLflow store go "
        f"(default: ./{DEFAULT_WORKDIR})",
    )
    run.add_argument(
        "--mnist-mirror",
        metavar="PATH|URL",
        help=f"a folder or URL holding the four MNIST files (.gz or raw); default: "
        f"${MIRROR_ENV}, else torchvision's public mirrors",
    )
    run.add_argument("--seed", type=int, help="the study's seed (default: the profile's, 0)")
    run.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="train the sweep and the final model with N seeds (sweep.repeats, default 1): "
        "Table 2 and the final test MSE then show mean ± standard deviation over them",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="recompute every stage, reusing no earlier result or checkpoint",
    )
    run.add_argument(
        "--refresh",
        action="append",
        choices=list(STAGES),
        metavar="STAGE",
        help=f"recompute STAGE and every stage that follows from it (repeatable); stages: "
        f"{', '.join(STAGES)}",
    )
    run.add_argument(
        "--task-runner",
        choices=("threads", "dask"),
        default="threads",
        help="threads (the default: tasks side by side in this process) or dask (the grid, "
        "sweep and other tasks on a Dask cluster through prefect-dask)",
    )
    run.add_argument(
        "--dask-address",
        metavar="tcp://HOST:PORT",
        help="the scheduler of an existing Dask cluster (with --task-runner dask); without "
        "it a local cluster of one 1-thread worker process per task slot is started",
    )

    _device_option(run)

    status = commands.add_parser(
        "status",
        help="what a re-run would do: every stage and task as cached, partial, failed or pending",
        description="List every stage and task of the current config with its state: cached "
        "(its result is stored and a re-run reuses it), partial (interrupted; a re-run resumes "
        "from its checkpoint), failed (its last attempt failed; a re-run retries it) or pending "
        "(a re-run computes it).",
    )
    _workdir_option(status)
    status.add_argument("--profile", choices=PROFILES, help="the profile (as for run)")
    status.add_argument("--config", type=Path, metavar="FILE.toml", help="as for run")
    status.add_argument("--seed", type=int, help="as for run")
    status.add_argument("--repeats", type=int, metavar="N", help="as for run")
    _device_option(status)

    ui = commands.add_parser(
        "ui",
        help="serve the MLflow UI on a work dir's store",
        description="Serve the MLflow UI on the embedded store of a work dir "
        "(its SQLite database and artifact folder).",
    )
    _workdir_option(ui)
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.add_argument("--host", default=LOOPBACK, help=f"address to bind (default: {LOOPBACK})")

    server = commands.add_parser(
        "server",
        help="start a Prefect server and an MLflow tracking server; print their URLs",
        description="Start a Prefect server (API and UI; its database in WORKDIR/server) and "
        "an MLflow tracking server on the work dir's store (WORKDIR/mlflow.db and "
        "WORKDIR/mlartifacts), wait until both answer, print their URLs and the variables "
        "that point the other commands at them, and serve until Ctrl-C.",
    )
    _workdir_option(server)
    server.add_argument(
        "--host",
        default=LOOPBACK,
        help=f"address both servers bind (default: {LOOPBACK}; 0.0.0.0 for workers on other "
        f"machines)",
    )
    server.add_argument("--prefect-port", type=int, default=4200, help="(default: 4200)")
    server.add_argument("--mlflow-port", type=int, default=5000, help="(default: 5000)")
    server.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for both servers to answer (default: 180)",
    )

    commands.add_parser(
        "deploy",
        help=f"create the {WORK_POOL!r} process work pool and the study's deployments",
        description=f"Create the process work pool {WORK_POOL!r} (unless it exists) and apply "
        f"deployments/prefect.yaml: the study flow as study/smoke, study/quick and "
        f"study/paper. Needs PREFECT_API_URL.",
    )

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

    report = commands.add_parser(
        "report",
        help="rebuild report.md from the stored tables",
        description="Rebuild report.md and its figures from the tables of a finished study.",
    )
    _workdir_option(report)
    return parser


def _run(args: argparse.Namespace) -> int:
    # A bad config value costs no server start and no training.
    config = load_config(args.profile, args.config, _overrides(args))
    if args.dask_address and args.task_runner != "dask":
        raise StackError("--dask-address needs --task-runner dask")
    if args.task_runner == "dask" and args.dask_address:
        _check_dask_scheduler(args.dask_address)
    started = time.monotonic()
    # The server starts first: its seconds of start-up overlap the imports and checks below.
    api = None if os.environ.get(PREFECT_API_ENV) else _TemporaryApi()
    return _run_study(args, config, api, started)


def _run_study(
    args: argparse.Namespace, config: StudyConfig, api: _TemporaryApi | None, started: float
) -> int:
    from aemnist.data import ensure_writable
    from aemnist.runtime import parallel_workers, with_resolved_device
    from aemnist.tracking import TRACKING_ENV, open_store, resolve_tracking_uri

    config = with_resolved_device(config)
    workdir = args.workdir.resolve()
    ensure_writable(workdir)
    # Opens (creates, migrates) the MLflow store now, while the server starts; or fails
    # fast when a tracking server does not answer.
    open_store(resolve_tracking_uri(workdir), workdir)

    from flows.study import study

    runtime = config.runtime
    workers = parallel_workers(runtime.workers, runtime.device, runtime.gpu_concurrency)
    runner = _task_runner(args.task_runner, args.dask_address, workers)
    if api is not None:
        api.ready()
    with _heartbeats_off() if api is not None else contextlib.nullcontext():
        report = study.with_options(task_runner=runner)(
            profile=config.profile,
            workdir=str(workdir),
            config_file=str(args.config.resolve()) if args.config else None,
            mnist_mirror=args.mnist_mirror,
            seed=args.seed,
            fresh=args.fresh,
            refresh=args.refresh,
            device=args.device,
            repeats=args.repeats,
        )
    tracking = os.environ.get(TRACKING_ENV)
    print(f"\nStudy ({config.profile}) finished in {time.monotonic() - started:.0f} s.")
    print(f"Report: {report}")
    if tracking:
        print(f"MLflow runs: {tracking}")
    else:
        print(f"MLflow UI:  aemnist ui --workdir {workdir}   then open http://127.0.0.1:5000")
    return 0


def _heartbeats_off() -> contextlib.AbstractContextManager[object]:
    """No flow-run heartbeats on a temporary server: they exist to tell a server that a
    flow's process died, and this server dies with it; their thread's 1-second naps cost
    up to a second at the end of every run."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _check_dask_scheduler(address: str) -> None:
    """A scheduler that does not answer is named before any work starts; so is a remote
    cluster whose workers could not reach this machine's temporary Prefect server."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise StackError(f"--dask-address {address!r} is not of the form tcp://HOST:PORT")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=5).close()
    except OSError as exc:
        raise StackError(
            f"no Dask scheduler answers at {address} ({exc}): start one (`dask scheduler`, "
            f"then `dask worker {address}` on each machine) or drop --dask-address to run on a "
            f"local cluster"
        ) from None
    if parsed.hostname not in ("127.0.0.1", "localhost") and not os.environ.get(PREFECT_API_ENV):
        raise StackError(
            f"the Dask cluster at {address} runs tasks in processes that report to the Prefect "
            f"API: set PREFECT_API_URL to a server they all reach (`aemnist server --host "
            f"0.0.0.0` prints one), here and on every Dask worker"
        )


def _task_runner(kind: str, address: str | None, workers: int) -> Any:
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    # One single-threaded worker process per task slot: each task then sets its own torch
    # threads, as the thread runner's tasks do.
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": LOOPBACK,
        }
    )


class _TemporaryApi:
    """This run's temporary Prefect server: the uvicorn process Prefect's own temporary
    server runs (prefect.server.api.server.SubprocessASGIServer), launched without importing
    the server's code here. It starts before this process imports torch, MLflow and Prefect,
    so their seconds and the server's overlap; `ready()` waits for its health check. The
    whole process, and the worker processes it starts (Dask's), is pointed at it: they would
    otherwise each start a temporary server of their own."""

    # uvicorn's exit code when it could not start: the port taken after we picked it (then
    # one new port is tried), or a failed start-up (then it fails the same way again).
    PORT_IN_USE = 3

    def __init__(self) -> None:
        self.process = self._launch()
        # Stopped after the process's last logs and events are shipped to it: Prefect
        # registers their flush at exit after this, and exit handlers run last-in first-out.
        atexit.register(self.stop)
        self.error: StackError | None = None
        self.waiting = threading.Thread(target=self._await, name="prefect-api", daemon=True)
        self.waiting.start()

    def _launch(self) -> subprocess.Popen[bytes]:
        # Where Prefect is installed, without importing it: that alone takes over a second.
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise StackError("Prefect is not installed here: `pip install -e .` installs it")
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            self.port = probe.getsockname()[1]
        self.api_url = f"http://{LOOPBACK}:{self.port}/api"
        command = [
            sys.executable, "-m", "uvicorn",
            "--app-dir", str(Path(spec.origin).parent.parent),
            "--factory", "prefect.server.api.server:create_app",
            "--host", LOOPBACK, "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        return subprocess.Popen(command, env=env)

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}{path}", timeout=10) as response:
                return response.status == 200
        except OSError:  # not listening yet
            return False

    def _await(self) -> None:
        """In a thread (it mostly sleeps): poll the server until it answers, then send the
        request every client opens with, whose first answer takes the server most of a
        second (measured 0.75 s against 0.01 s after). Errors go to ``ready()``."""
        try:
            self._poll()
        except Exception as exc:  # raised in the main thread by ready()
            self.error = StackError(f"the temporary Prefect server could not start: {exc}")

    def _poll(self) -> None:
        timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        deadline = time.monotonic() + timeout
        relaunches = 0
        while not self._answers("/health"):
            code = self.process.poll()
            if code == self.PORT_IN_USE and relaunches < 1:
                relaunches += 1
                self.process = self._launch()
            elif code is not None:
                self.error = StackError(
                    f"the temporary Prefect server exited with code {code} before answering "
                    f"(its messages are above); start one with `aemnist server` and set "
                    f"{PREFECT_API_ENV} to it"
                )
                return
            if time.monotonic() > deadline:
                self.error = StackError(
                    f"the temporary Prefect server did not answer within {timeout:.0f} s "
                    f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); start one with "
                    f"`aemnist server` and set {PREFECT_API_ENV} to it"
                )
                return
            time.sleep(0.05)
        self._answers("/admin/version")

    def ready(self) -> None:
        """Wait until the server answers, then point this process (and its children) at it."""
        self.waiting.join()
        if self.error is not None:
            raise self.error
        from prefect.context import refresh_global_settings_context

        os.environ[PREFECT_API_ENV] = self.api_url
        refresh_global_settings_context()

    def _wait_until_idle(self, quiet: float = 0.2, limit: float = 5.0) -> None:
        """Wait until the server has used no CPU for ``quiet`` seconds (at most ``limit``):
        it has then written every event it received. Where /proc is not there, half a
        second."""
        stat = Path(f"/proc/{self.process.pid}/stat")

        def cpu_ticks() -> int | None:
            try:  # utime and stime: fields 14 and 15, counted after the ")" of the name
                fields = stat.read_text().rpartition(")")[2].split()
                return int(fields[11]) + int(fields[12])
            except (OSError, ValueError, IndexError):
                return None

        last = cpu_ticks()
        if last is None:
            time.sleep(0.5)
            return
        deadline = time.monotonic() + limit
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            ticks = cpu_ticks()
            if ticks is None:
                return
            if ticks != last:
                last, quiet_since = ticks, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet:
                return

    def stop(self) -> None:
        """Stop the server. A server still creating its database finishes that first
        (uvicorn completes its start-up before it acts on SIGTERM): it is never killed
        mid-migration."""
        if self.process.poll() is not None:
            return
        if not self.waiting.is_alive():  # it answered: let it record the last task-run
            # events this process shipped on its way out; a stop mid-write loses them, and
            # its task-run recorder logs the cancelled write as an error.
            self._wait_until_idle()
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # hung in its shutdown, long after any migration
            self.process.kill()
            self.process.wait()


def _server(args: argparse.Namespace) -> int:
    from aemnist.data import ensure_writable
    from deployments.stack import (
        check_port_free,
        start_mlflow_server,
        start_prefect_server,
        wait_until_ready,
    )

    workdir = args.workdir.resolve()
    ensure_writable(workdir)
    state = workdir / "server"
    state.mkdir(exist_ok=True)
    check_port_free(args.host, args.prefect_port, "Prefect server", "--prefect-port")
    check_port_free(args.host, args.mlflow_port, "MLflow server", "--mlflow-port")
    print("Starting the Prefect server and the MLflow server ...", flush=True)
    env = dict(os.environ)
    services = [start_prefect_server(state, args.host, args.prefect_port, env)]
    try:
        services.append(start_mlflow_server(workdir, state, args.host, args.mlflow_port, env))
        wait_until_ready(services, args.timeout)
        prefect, mlflow = services
        print(
            f"Prefect server: {prefect.url}  (UI; API at {prefect.url}/api)\n"
            f"MLflow server:  {mlflow.url}  (UI and tracking; store: {workdir})\n"
            f"In each shell that deploys, starts a worker or runs the study:\n"
            f"  export PREFECT_API_URL={prefect.url}/api\n"
            f"  export MLFLOW_TRACKING_URI={mlflow.url}\n"
            f"Logs: {state}/*.log. Ctrl-C stops both servers.",
            flush=True,
        )
        # A plain `kill` stops the servers as Ctrl-C does.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while all(service.alive() for service in services):
            time.sleep(1.0)
        dead = next(service for service in services if not service.alive())
        raise StackError(
            f"the {dead.name} stopped (exit code {dead.process.returncode}); see {dead.log}"
        )
    except KeyboardInterrupt:
        print("Stopping the servers.", flush=True)
        return 0
    finally:
        for service in reversed(services):
            service.stop()


def _deploy(args: argparse.Namespace) -> int:
    from aemnist.tracking import TRACKING_ENV, check_reachable
    from deployments.stack import deploy_study, ensure_work_pool, require_prefect_api

    api = require_prefect_api("deploy")
    tracking = os.environ.get(TRACKING_ENV)
    if tracking:
        check_reachable(tracking)
    created = ensure_work_pool(WORK_POOL)
    print(f"Work pool {WORK_POOL!r} (process) {'created' if created else 'exists'} on {api}")
    names = deploy_study(os.environ)
    print(f"Deployments: {', '.join(names)}")
    print("Next: `aemnist worker`, then for instance `prefect deployment run study/smoke` "
          "(override any parameter with --param NAME=VALUE)")  # fmt: skip
    return 0


def _worker(args: argparse.Namespace) -> int:
    from aemnist.tracking import TRACKING_ENV, check_reachable
    from deployments.stack import require_prefect_api, work_pool_exists, worker_command

    api = require_prefect_api("worker")
    if not work_pool_exists(args.pool):
        raise StackError(
            f"work pool {args.pool!r} does not exist on {api}: create it and the deployments "
            f"with `aemnist deploy`"
        )
    tracking = os.environ.get(TRACKING_ENV)
    if tracking:
        check_reachable(tracking)
        print(f"Runs log to the MLflow tracking server {tracking}")
    else:
        print("MLFLOW_TRACKING_URI is not set: runs log to the embedded store of their work dir")
    command = worker_command(args.pool, args.limit, args.name)
    print(f"Worker on pool {args.pool!r} at {api}: {' '.join(command[2:])}", flush=True)
    os.execv(command[0], command)
    return 0  # not reached


def _ui(args: argparse.Namespace) -> int:
    from aemnist.tracking import TrackingError, embedded_tracking_uri

    workdir = args.workdir.resolve()
    if not (workdir / "mlflow.db").exists():
        raise TrackingError(
            f"{workdir} holds no MLflow store (mlflow.db); run `aemnist run --workdir {workdir}` "
            f"first or pass the work dir of an earlier study with --workdir"
        )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        embedded_tracking_uri(workdir),
        "--default-artifact-root",
        (workdir / "mlartifacts").as_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
        # One worker process serves one person's browser; MLflow's default of four costs
        # seconds of start-up on two cores.
        "--workers",
        "1",
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} (store: {workdir}); Ctrl-C stops it.")
    return subprocess.call(command)


def _status(args: argparse.Namespace) -> int:
    from aemnist.runtime import with_resolved_device
    from aemnist.status import format_status, study_status
    from aemnist.tracking import embedded_tracking_uri, failed_task_keys, resolve_tracking_uri

    config = with_resolved_device(load_config(args.profile, args.config, _overrides(args)))
    layout = Layout(args.workdir.resolve())
    uri = resolve_tracking_uri(layout.root)
    store_exists = uri != embedded_tracking_uri(layout.root) or (layout.root / "mlflow.db").exists()
    failed = failed_task_keys(uri) if store_exists else set()
    print(format_status(study_status(config, layout, failed), config, layout))
    return 0


def _report(args: argparse.Namespace) -> int:
    from aemnist.report import build_report

    layout = Layout(args.workdir.resolve())
    config = read_saved_config(layout.config)
    print(f"Report: {build_report(layout, config)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = _parser().parse_args(argv)
    handlers = {
        "run": _run,
        "ui": _ui,
        "report": _report,
        "status": _status,
        "server": _server,
        "deploy": _deploy,
        "worker": _worker,
    }
    handler = handlers[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("aemnist: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"aemnist: error: {exc}", file=sys.stderr)
            return 2
        from flows.study import StageFailed

        if isinstance(exc, StageFailed):
            print(f"aemnist: error: {exc}", file=sys.stderr)
            return 1
        raise


def entry() -> None:
    """The `aemnist` command: ``main``, then exit without the interpreter's last garbage
    collection over every object torch, MLflow and Prefect created (about 1.2 s here);
    exit handlers (Prefect shipping its last logs, the temporary server's stop) still run."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
