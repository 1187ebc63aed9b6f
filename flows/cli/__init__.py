"""``aemnist``: run the study, rebuild its report, browse its runs in the MLflow UI, and
serve it in production (a Prefect server, deployments, a worker).

The commands live in ``study_commands`` (run, status, report) and ``stack_commands``
(server, deploy, worker, ui); the options they share in ``options``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

# Only light modules here: `aemnist run` starts its temporary Prefect server before it
# imports torch, MLflow, pandas and Prefect, so that the server's start-up overlaps theirs.
from aemnist.config import ConfigError
from deployments.stack import StackError
from flows.cli import bundle_commands, stack_commands, study_commands

# In the order `aemnist --help` lists them.
COMMANDS = (
    study_commands.add_run,
    study_commands.add_status,
    stack_commands.add_ui,
    stack_commands.add_server,
    stack_commands.add_deploy,
    stack_commands.add_worker,
    study_commands.add_report,
    study_commands.add_config,
    bundle_commands.add_bundle,
)

# Offline machines: no analytics or telemetry calls, and room for a slow first start of the
# temporary Prefect server on two busy cores.
OFFLINE_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: one line, no traceback."""
    from aemnist.data import DataError
    from aemnist.schemas import TableError
    from aemnist.tracking import TrackingError

    return (ConfigError, DataError, TableError, TrackingError, StackError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aemnist",
        description="A convolutional autoencoder study on MNIST, orchestrated by Prefect and "
        "tracked in MLflow.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(commands)  # each sets its handler: args.handler
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
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
