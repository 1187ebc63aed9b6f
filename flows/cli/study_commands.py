"""The study's commands: `run` (the `study` flow, on a temporary Prefect server unless
PREFECT_API_URL names one), `status` and `report`."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aemnist.config import (
    MIRROR_ENV,
    PROFILES,
    StudyConfig,
    config_json_schema,
    from_dict,
    load_config,
    read_saved_config,
    run_overrides,
)
from aemnist.datasets import DEFAULT_DATASET
from aemnist.layout import Layout

# Only light modules here: `aemnist run` starts its temporary Prefect server before it
# imports torch, MLflow, pandas and Prefect, so that the server's start-up overlaps theirs.
from aemnist.machine_slots import slot_folder
from aemnist.plan import STAGES
from aemnist.storage import check_storage
from aemnist.workdir import WorkdirLocked, hold_workdir
from deployments.auth import CREDENTIALS_FILE, PREFECT_AUTH_ENV, read_credentials
from deployments.dask_tls import (
    DaskTLS,
    check_dask_scheduler,
    parse_dask_security,
    tls_from_dask_config,
)
from deployments.discovery import PREFECT_PORT, find_servers, prefect_database, server_dir
from deployments.servers import (
    DATABASE_ENVS,
    TemporaryPrefectServer,
    check_prefect_credentials,
    handle_stop_signals,
    stop_exit_code,
    stop_signal,
)
from deployments.stack import PREFECT_API_ENV, StackError
from flows.cli.options import (
    add_config_options,
    add_dataset,
    add_storage,
    add_workdir,
    study_config,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

    from flows.cli.options import Commands

# Seconds a run stopped by SIGINT, SIGTERM or SIGHUP has to wind down (its flow and MLflow run
# marked failed) before it stops its processes and exits regardless: a task thread mid-epoch
# is never waited for.
RUN_GRACE = 10.0


def add_run(commands: Commands) -> None:
    run = commands.add_parser(
        "run",
        help="run the whole study (the `study` flow)",
        description="Run every stage of the study: download, folds, grid search, size sweep, "
        "final model, corruption, embedding, report. Progress is logged as each task runs.",
    )
    add_config_options(run)
    run.add_argument(
        "--mnist-mirror",
        metavar="PATH|URL",
        help=f"a folder or URL holding the four MNIST files (.gz or raw); default: "
        f"${MIRROR_ENV}, else torchvision's public mirrors",
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
        metavar="tls://HOST:PORT",
        help="the scheduler of an existing Dask cluster (with --task-runner dask): tls:// "
        "(plain tcp:// only on 127.0.0.1); without it a local cluster of one 1-thread worker "
        "process per task slot is started",
    )
    run.add_argument(
        "--dask-security",
        metavar="ca=FILE,cert=FILE,key=FILE",
        help="for a tls:// scheduler: the cluster's CA certificate and this client's "
        "certificate and key (PEM); default: Dask's config (distributed.comm.tls.*)",
    )
    run.set_defaults(handler=_run)


def add_status(commands: Commands) -> None:
    status = commands.add_parser(
        "status",
        help="what a re-run would do: every stage and task as cached, partial, failed or pending",
        description="List every stage and task of the current config with its state: cached "
        "(its result is stored and a re-run reuses it), partial (interrupted; a re-run resumes "
        "from its checkpoint), failed (its last attempt failed; a re-run retries it) or pending "
        "(a re-run computes it).",
    )
    add_config_options(status)
    status.set_defaults(handler=_status)


def add_report(commands: Commands) -> None:
    report = commands.add_parser(
        "report",
        help="rebuild report.md from the stored tables",
        description="Rebuild report.md and its figures from the tables of a finished study. "
        "The report keeps the date its study recorded: a rebuild of the same tables gives the "
        "same file on any machine and any day.",
    )
    add_workdir(report)
    report.add_argument(
        "--out",
        type=Path,
        metavar="PATH.md",
        help="write the report there instead of WORKDIR/report.md, its figure links relative "
        "to that file's folder (the figures stay in WORKDIR/figures)",
    )
    add_dataset(report)
    add_storage(report)
    report.set_defaults(handler=_report)


def add_export(commands: Commands) -> None:
    export = commands.add_parser(
        "export",
        help="copy a finished study to ship: tables, report, figures and a portable MLflow store",
        description="Copy what a reader needs of a finished study into the new folder DIR: "
        "its config, stage tables with their hash records, report, figures and MLflow store "
        "(database and artifacts, its locations made relative, so that `aemnist ui --workdir "
        "DIR` serves it wherever DIR lands); not the MNIST tables, checkpoints, cached "
        "results, server state or credentials. Writes the report beside it as DIR.md (figure "
        "links into DIR), which `aemnist report --workdir DIR --out DIR.md` rebuilds byte for "
        "byte.",
    )
    add_workdir(export)
    export.add_argument(
        "--out", type=Path, required=True, metavar="DIR",
        help="the folder to create (absent or empty), e.g. results/paper",
    )  # fmt: skip
    export.add_argument(
        "--max-mb",
        type=float,
        default=25.0,
        metavar="MB",
        help="refuse, writing nothing, when the export would take more (default: 25)",
    )
    export.set_defaults(handler=_export)


def add_config(commands: Commands) -> None:
    config = commands.add_parser(
        "config",
        help="print the resolved config of a profile (and --config file), or its JSON schema",
        description="Print, as JSON, the config a run with these options would use (validated: "
        "an invalid field is named), or with --schema the JSON schema of every field, with "
        "types, ranges, allowed values and descriptions.",
    )
    config.add_argument("--profile", choices=PROFILES, help="as for run")
    config.add_argument(
        "--config", type=Path, metavar="FILE.toml", help="a TOML file overriding any field"
    )
    add_dataset(config)
    config.add_argument("--schema", action="store_true", help="print the JSON schema instead")
    config.set_defaults(handler=_config)


def _config(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(config_json_schema(), indent=2))
    else:
        overrides = run_overrides(dataset=args.dataset)
        print(json.dumps(load_config(args.profile, args.config, overrides).to_dict(), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    # A bad config value costs no server start and no training.
    config = study_config(args)
    if args.dask_address and args.task_runner != "dask":
        raise StackError("--dask-address needs --task-runner dask")
    if args.task_runner == "dask" and importlib.util.find_spec("prefect_dask") is None:
        raise StackError(
            "--task-runner dask needs Dask and prefect-dask: pip install 'aemnist[dask]'"
        )
    if args.dask_security and not args.dask_address:
        raise StackError("--dask-security needs --dask-address (a tls:// scheduler)")
    dask_security = parse_dask_security(args.dask_security) if args.dask_security else None
    if config.runtime.storage:  # an unusable store costs no server start and no training
        check_storage(config.runtime.storage)
    if args.task_runner == "dask" and args.dask_address:
        if dask_security is None and args.dask_address.startswith("tls://"):
            dask_security = tls_from_dask_config()
        check_dask_scheduler(args.dask_address, dask_security, os.environ.get(PREFECT_API_ENV))
    started = time.monotonic()
    # Before the first child: a SIGINT, SIGTERM or SIGHUP from here on stops the run and every
    # process it started, its temporary Prefect server included.
    handle_stop_signals(RUN_GRACE)
    try:
        # A work dir that exists is locked before any server starts or module loads, so that
        # a second run on it stops at once; a new one once it is created (`_run_study`).
        workdir = args.workdir.resolve()
        if workdir.is_dir():
            with contextlib.suppress(OSError):  # not writable: `_run_study` says so
                hold_workdir(workdir)
        configured = os.environ.get(PREFECT_API_ENV)
        api = None
        if configured:
            check_prefect_credentials(configured.rstrip("/"))
        elif not _use_workdir_servers(workdir):
            # The server starts first: its seconds of start-up overlap the imports and checks
            # below.
            api = _temporary_server(config, args.workdir)
        return _run_study(args, config, api, started, dask_security)
    except WorkdirLocked as exc:
        print(f"aemnist: error: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        if (signum := stop_signal()) is not None:  # it said so on stderr when it came
            return stop_exit_code(signum)
        raise


def _use_workdir_servers(workdir: Path) -> bool:
    """Point this run at the Prefect server of an `aemnist server` serving ``workdir``, if one
    runs. MLflow stays the work dir's store, which that command's MLflow server serves: the
    run shows there at once, and an experiment this run creates keeps its artifacts in the
    work dir, readable by runs without the server too (one created through the server keeps
    them behind its artifact proxy, which a run without it cannot reach)."""
    servers = find_servers(workdir)
    if servers is None:
        return False
    os.environ[PREFECT_API_ENV] = servers.prefect_api_url
    credentials = server_dir(workdir) / CREDENTIALS_FILE
    if credentials.exists() and not os.environ.get(PREFECT_AUTH_ENV):
        # The work dir's own server, started with --auth: its credentials are the owner's
        # (read_credentials refuses a file anyone else could read or write).
        os.environ[PREFECT_AUTH_ENV] = read_credentials(credentials).prefect_auth_string
    check_prefect_credentials(servers.prefect_api_url)
    print(
        f"Running on the Prefect server of `aemnist server` in {workdir} (process "
        f"{servers.pid}): {servers.prefect_api_url}",
        flush=True,
    )
    return True


def _temporary_server(config: StudyConfig, workdir: Path) -> TemporaryPrefectServer:
    """This run's own Prefect server, on a database that outlives it, so that the run's flow
    and task runs, logs and artifacts stay browsable after the server stops with the run:
    the work dir's (WORKDIR/server/prefect.db) where `aemnist server --workdir` has made one,
    so that every flow run of the work dir shows in one place; else Prefect's default, in
    PREFECT_HOME, which `prefect server start` opens (a new database costs its migrations,
    about 8 s: once per Prefect home, not once per work dir)."""
    if config.runtime.device == "cuda":
        # A GPU this machine lacks is named before the work dir is created (checking takes
        # torch: only a run that insists on CUDA gives up the overlap with the server).
        from aemnist.plan import resolve_study

        resolve_study(config, workdir)
    # Its training tasks will hold the machine's slot lock files: a slot folder that is not
    # the user's own is named now, in one line, not by the flow's first training task.
    slot_folder()
    workdir = workdir.resolve()
    state = server_dir(workdir)
    try:
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        state.mkdir(mode=0o700, exist_ok=True)
        writable = os.access(state, os.W_OK)
    except OSError:
        writable = False
    # Not writable: `_run_study` says so in one line; meanwhile the server keeps Prefect's
    # default database rather than failing on this one with messages of its own.
    database = prefect_database(workdir)
    return TemporaryPrefectServer(database if writable and database.exists() else None)


def _run_study(
    args: argparse.Namespace,
    config: StudyConfig,
    api: TemporaryPrefectServer | None,
    started: float,
    dask_security: DaskTLS | None,
) -> int:
    from aemnist.data import ensure_writable, flow_mirror_parameter
    from aemnist.plan import resolve_study
    from aemnist.tracking import TRACKING_ENV, open_store, resolve_tracking_uri, ui_page

    # The flow resolves the study from its parameters, as a deployment run does; resolving it
    # here too (the same function) stops a device this machine lacks before the work dir is
    # created.
    resolve_study(config, args.workdir)
    workdir = args.workdir.resolve()
    ensure_writable(workdir)
    # One run at a time in a work dir: a second stops here (if not before), naming the first's
    # process id.
    hold_workdir(workdir)
    tracked_over_http = resolve_tracking_uri(workdir).startswith(("http://", "https://"))
    if (
        args.task_runner == "dask"
        and args.dask_address
        and not (config.runtime.storage and tracked_over_http)
    ):
        # The workers read and write the tables in the work dir (and log to its MLflow store
        # without a tracking server): one that does not share it is named now, before any
        # work, not by a stage's failure in its own log. With the tables in an object store
        # and MLflow on a server, the workers need nothing of the work dir.
        from deployments.dask_workers import check_workers_see_workdir

        check_workers_see_workdir(args.dask_address, dask_security, workdir)
    # Opens (creates, migrates) the MLflow store now, while the server starts; or fails
    # fast when a tracking server does not answer.
    experiment_id = open_store(resolve_tracking_uri(workdir), workdir)

    from flows.study import study

    if api is not None:
        api.ready()
    # The flow run, recorded as it starts, for the lines that say where to browse it.
    flow_runs: list[FlowRun] = []

    def remember(flow: object, flow_run: FlowRun, state: object) -> None:
        flow_runs.append(flow_run)

    browse = _BrowseHint(flow_runs, workdir, api)
    with _heartbeats_off() if api is not None else contextlib.nullcontext(), browse:
        report = study.with_options(on_running=[remember])(
            profile=config.profile,
            workdir=str(workdir),
            config_file=str(args.config.resolve()) if args.config else None,
            # Prefect stores a flow's parameters: a mirror URL with credentials goes to the
            # flow through AEMNIST_MNIST_MIRROR instead.
            mnist_mirror=flow_mirror_parameter(args.mnist_mirror),
            seed=args.seed,
            fresh=args.fresh,
            refresh=args.refresh,
            device=args.device,
            repeats=args.repeats,
            dataset=args.dataset,
            storage=args.storage,
            task_runner=args.task_runner,
            dask_address=args.dask_address,
            dask_security=dask_security,
            # No other study shares a temporary server: no slots to share there.
            share_slots=api is None,
        )
    tracking = os.environ.get(TRACKING_ENV)
    print(f"\nStudy ({config.profile}) finished in {time.monotonic() - started:.0f} s.")
    print(f"Report: {report}")
    # The experiment's runs list (not the UI's GenAI overview), without credentials.
    runs = ui_page(tracking or "", experiment_id)
    if tracking:
        print(f"MLflow runs: {runs}")
    else:
        print(f"MLflow UI:  aemnist ui --workdir {workdir}   then open {runs}")
    browse.tell()
    return 0


class _BrowseHint:
    """The line that says where to browse the run's flow run (its graph, logs and artifacts)
    in the Prefect UI: the run's last, or printed as it fails."""

    def __init__(
        self, runs: list[FlowRun], workdir: Path, temporary: TemporaryPrefectServer | None
    ) -> None:
        self.runs, self.workdir, self.temporary = runs, workdir, temporary

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.tell()

    def tell(self) -> None:
        if self.runs:
            _tell(_flow_run_lines(self.runs[0], self.workdir, self.temporary))


def _flow_run_lines(
    flow_run: FlowRun, workdir: Path, temporary: TemporaryPrefectServer | None
) -> str:
    from prefect.utilities.urls import url_for

    if temporary is None:
        url = url_for("flow-run", obj_id=flow_run.id)
        return f"Prefect flow run {flow_run.name!r}: {url or flow_run.id}"
    page = f"http://127.0.0.1:{PREFECT_PORT}/runs/flow-run/{flow_run.id}"
    if any(name in os.environ for name in DATABASE_ENVS):  # a database of the user's
        return (
            f"Prefect flow run {flow_run.name!r}: to browse it, `prefect server start` with "
            f"the same database settings, then open {page}"
        )
    if temporary.database is None:
        return (
            f"Prefect flow run {flow_run.name!r} (in Prefect's database in PREFECT_HOME): to "
            f"browse it, `prefect server start`, then open {page}"
        )
    return (
        f"Prefect flow run {flow_run.name!r} (in {prefect_database(workdir)}): to browse it, "
        f"`aemnist server --workdir {workdir}`, then open {page}"
    )


def _tell(line: str) -> None:
    """Print, unless the terminal has gone (a SIGHUP)."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def _heartbeats_off() -> contextlib.AbstractContextManager[object]:
    """No flow-run heartbeats on a temporary server: they exist to tell a server that a
    flow's process died, and this server dies with it; their thread's 1-second naps cost
    up to a second at the end of every run."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _status(args: argparse.Namespace) -> int:
    from aemnist.plan import resolve_study
    from aemnist.status import format_status, study_status
    from aemnist.tracking import (
        TRACKING_ENV,
        check_reachable,
        embedded_tracking_uri,
        failed_task_keys,
        resolve_tracking_uri,
    )

    config = study_config(args)
    if config.runtime.storage:
        check_storage(config.runtime.storage)
    study = resolve_study(config, args.workdir)
    root = study.layout.root
    uri = resolve_tracking_uri(root)
    if os.environ.get(TRACKING_ENV):
        # MLflow's client retries an unreachable server for minutes: one quick look first.
        check_reachable(uri)
    store_exists = uri != embedded_tracking_uri(root) or (root / "mlflow.db").exists()
    failed = failed_task_keys(uri) if store_exists else set()
    print(format_status(study_status(study, failed), study))
    return 0


def _report(args: argparse.Namespace) -> int:
    from aemnist.report import build_report

    # An unknown name gets the config's one line, before any file is read.
    chosen = from_dict(
        {
            "data": {"dataset": args.dataset or DEFAULT_DATASET},
            "runtime": {"storage": args.storage or ""},
        }
    )
    storage = chosen.runtime.storage
    if storage:
        check_storage(storage)
    layout = Layout(args.workdir.resolve(), chosen.data.dataset, storage)
    config = read_saved_config(layout.config)
    print(f"Report: {build_report(layout, config, out=args.out)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from aemnist.export import export_study

    done = export_study(args.workdir, args.out, args.max_mb)
    print(
        f"Exported {args.workdir.resolve()} to {done.folder}: {done.files} files, "
        f"{done.size / 1e6:.1f} MB (at most {args.max_mb:g})"
    )
    print(f"Report: {done.report}")
    print(f"Browse it: aemnist ui --workdir {done.folder}")
    return 0
