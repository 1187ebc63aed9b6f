"""``aemnist``: run the study, rebuild its report, browse its runs in the MLflow UI, and
serve it in production (a Prefect server, deployments, a worker).

The commands live in ``study_commands`` (run, status, report, export) and ``stack_commands``
(server, deploy, worker, ui); the options they share in ``options``.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import sys

# Only light modules here: `aemnist run` starts its temporary Prefect server before it
# imports torch, MLflow, pandas and Prefect, so that the server's start-up overlaps theirs.
from aemnist.config import MIRROR_ENV, ConfigError
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
    study_commands.add_export,
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
    from aemnist.export import ExportError
    from aemnist.machine_slots import SlotError
    from aemnist.schemas import TableError
    from aemnist.storage import StorageError
    from aemnist.tracking import TrackingError

    return (
        ConfigError, DataError, ExportError, SlotError, StorageError, TableError,
        TrackingError, StackError,
    )  # fmt: skip


# OSErrors that the machine causes, not the code: a full disk, a denied or read-only path, a
# file where a folder should be. Others (a missing file the code expected, a bad descriptor)
# keep their traceback: they are more likely a bug.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space there or choose another --workdir",
    errno.EDQUOT: "free some space there or choose another --workdir",
    errno.EFBIG: "choose another --workdir",
    errno.EACCES: "fix its permissions or choose another --workdir",
    errno.EPERM: "fix its permissions or choose another --workdir",
    errno.EROFS: "choose a --workdir on a writable file system",
    errno.EIO: "check the disk",
    errno.ENOTDIR: "a file stands where a folder should be: move it or choose another --workdir",
    errno.EISDIR: "a folder stands where a file should be: move it or choose another --workdir",
    errno.ENAMETOOLONG: "choose a shorter --workdir",
    errno.EMFILE: "raise the open-files limit (ulimit -n)",
    errno.ENFILE: "close other programs or raise the system's open-files limit",
}


def _os_error_message(exc: OSError, args: argparse.Namespace) -> str:
    """``<what happened>: <path>; <what to do>`` for an OSError of ``_ENVIRONMENT_ERRNOS``;
    without a path (os.write and the like give none), the command's work dir, if it has one."""
    what = exc.strerror or os.strerror(exc.errno or 0)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    if paths:
        where = f": {' -> '.join(paths)}"
    elif getattr(args, "workdir", None) is not None:
        where = f" (in the work dir {args.workdir.resolve()})"
    else:
        where = ""
    return f"{what}{where}; {_ENVIRONMENT_ERRNOS[exc.errno]}"


def _check_mirror(args: argparse.Namespace) -> None:
    """A mirror URL of a scheme other than file, http and https stops a command that takes
    --mnist-mirror before it starts a server or creates anything (the flow checks it again,
    for the launch paths that skip this command line)."""
    if not hasattr(args, "mnist_mirror"):
        return
    mirror = args.mnist_mirror or os.environ.get(MIRROR_ENV)
    if mirror and "://" in mirror:  # aemnist.data costs a second to import: URLs only
        from aemnist.data import check_mirror

        check_mirror(mirror)


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
        _check_mirror(args)
        return args.handler(args)
    except KeyboardInterrupt:
        print("aemnist: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"aemnist: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
            print(f"aemnist: error: {_os_error_message(exc, args)}", file=sys.stderr)
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
