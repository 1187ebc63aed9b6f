"""``aemnist``: run the study, rebuild its report, browse its runs in the MLflow UI."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from aemnist.config import PROFILES, ConfigError, load_config, read_saved_config
from aemnist.data import MIRROR_ENV, DataError, ensure_writable
from aemnist.layout import Layout
from aemnist.plan import STAGES
from aemnist.schemas import TableError
from aemnist.tracking import (
    TRACKING_ENV,
    TrackingError,
    check_reachable,
    embedded_tracking_uri,
    failed_task_keys,
    resolve_tracking_uri,
)

DEFAULT_WORKDIR = "aemnist-runs"
# Errors that are the user's to fix: one line, no traceback.
USER_ERRORS = (ConfigError, DataError, TableError, TrackingError)

# Offline machines: no analytics or telemetry calls, and room for a slow first start of the
# temporary Prefect server on two busy cores.
OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


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

    status = commands.add_parser(
        "status",
        help="what a re-run would do: every stage and task as cached, partial, failed or pending",
        description="List every stage and task of the current config with its state: cached "
        "(its result is stored and a re-run reuses it), partial (interrupted; a re-run resumes "
        "from its checkpoint), failed (its last attempt failed; a re-run retries it) or pending "
        "(a re-run computes it).",
    )
    status.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR), help="the work dir")
    status.add_argument("--profile", choices=PROFILES, help="the profile (as for run)")
    status.add_argument("--config", type=Path, metavar="FILE.toml", help="as for run")
    status.add_argument("--seed", type=int, help="as for run")

    ui = commands.add_parser(
        "ui",
        help="serve the MLflow UI on a work dir's store",
        description="Serve the MLflow UI on the embedded store of a work dir "
        "(its SQLite database and artifact folder).",
    )
    ui.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR), help="the work dir")
    ui.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")

    report = commands.add_parser(
        "report",
        help="rebuild report.md from the stored tables",
        description="Rebuild report.md and its figures from the tables of a finished study.",
    )
    report.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR), help="the work dir")
    return parser


def _run(args: argparse.Namespace) -> int:
    # Validate before anything starts: a bad value costs no server start and no training.
    overrides = {"seed": args.seed} if args.seed is not None else None
    config = load_config(args.profile, args.config, overrides)
    workdir = args.workdir.resolve()
    ensure_writable(workdir)
    check_reachable(resolve_tracking_uri(workdir))

    from prefect.task_runners import ThreadPoolTaskRunner

    from aemnist.runtime import parallel_workers
    from flows.study import study

    started = time.monotonic()
    runner = ThreadPoolTaskRunner(max_workers=parallel_workers(config.runtime.workers))
    report = study.with_options(task_runner=runner)(
        profile=config.profile,
        workdir=str(workdir),
        config_file=str(args.config.resolve()) if args.config else None,
        mnist_mirror=args.mnist_mirror,
        seed=args.seed,
        fresh=args.fresh,
        refresh=args.refresh,
    )
    tracking = os.environ.get(TRACKING_ENV)
    print(f"\nStudy ({config.profile}) finished in {time.monotonic() - started:.0f} s.")
    print(f"Report: {report}")
    if tracking:
        print(f"MLflow runs: {tracking}")
    else:
        print(f"MLflow UI:  aemnist ui --workdir {workdir}   then open http://127.0.0.1:5000")
    return 0


def _ui(args: argparse.Namespace) -> int:
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
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} (store: {workdir}); Ctrl-C stops it.")
    return subprocess.call(command)


def _status(args: argparse.Namespace) -> int:
    from aemnist.status import format_status, study_status

    overrides = {"seed": args.seed} if args.seed is not None else None
    config = load_config(args.profile, args.config, overrides)
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
    handler = {"run": _run, "ui": _ui, "report": _report, "status": _status}[args.command]
    try:
        return handler(args)
    except USER_ERRORS as exc:
        print(f"aemnist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aemnist: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from flows.study import StageFailed

        if isinstance(exc, StageFailed):
            print(f"aemnist: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
