"""Whether the workers of an existing Dask cluster see the study's work dir.

Every task of a study reads and writes its tables in the work dir, on whichever worker it
runs. A worker that cannot read the work dir fails the first stage (a permission error
that only its own log and the Prefect UI show); a worker that sees a folder of its own at
the same path (another machine, no shared file system) is worse: the download succeeds
there, and the next stage, on another worker, finds no table. So before any work, every
worker present reads a file this process writes into the work dir and writes one back
that this process reads; a worker that cannot is named, in one line, with the fix.

Imported by `aemnist run` only with ``--dask-address``: it imports Dask.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

from deployments.dask_tls import DaskTLS
from deployments.stack import StackError

PROBE_PREFIX = ".aemnist-dask-probe-"
TIMEOUT = 30.0  # seconds for the scheduler's answer and every worker's


def reply_path(probe: str, worker: str) -> str:
    """Where ``worker`` (its address) answers ``probe``: beside it, one file per worker."""
    return f"{probe}-{hashlib.sha256(worker.encode()).hexdigest()[:12]}"


def _answer_probe(probe: str, token: str, dask_worker: Any) -> str | None:
    """On a worker (``client.run`` passes it as ``dask_worker``): read ``probe``, expect
    ``token``, write it back beside it. None when done, else what went wrong (the
    exception's type and message)."""
    try:
        with open(probe, encoding="ascii") as file:
            if file.read() != token:
                return f"{probe} holds something else (another file system at that path?)"
        with open(reply_path(probe, dask_worker.address), "x", encoding="ascii") as file:
            file.write(token)
    except (OSError, ValueError) as exc:  # ValueError: not the ASCII token we wrote
        # The reason, not the probe's path: the message names the work dir once.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"{type(exc).__name__} ({reason})"
    return None


def check_workers_see_workdir(address: str, tls: DaskTLS | None, workdir: Path) -> int:
    """Each worker of the cluster at ``address`` reads and writes ``workdir`` as this
    process does; returns how many were checked (a cluster with none yet checks none: the
    tasks wait for workers). Raises StackError naming those that cannot, and the fix."""
    from distributed import Client

    token = secrets.token_hex(16)
    probe = workdir / f"{PROBE_PREFIX}{token[:12]}"
    probe.write_text(token, encoding="ascii")
    try:
        # Without TLS files of ours, Dask's client takes its config's, as the task runner does.
        kwargs = {"security": tls.security()} if tls is not None else {}
        try:
            with Client(address, timeout=TIMEOUT, **kwargs) as client:
                answers = client.run(_answer_probe, str(probe), token, wait=True)
        except (OSError, TimeoutError) as exc:  # the scheduler answered a moment ago
            raise StackError(
                f"the Dask cluster at {address} did not let this run ask its workers about "
                f"the work dir ({type(exc).__name__}: {exc}): check the scheduler's log"
            ) from None
        problems = {worker: problem for worker, problem in answers.items() if problem}
        for worker in set(answers) - set(problems):
            reply = Path(reply_path(str(probe), worker))
            try:
                seen = reply.read_text(encoding="ascii")
            except OSError:
                seen = None
            if seen != token:
                problems[worker] = "its reply is not in the work dir here (a folder of its own?)"
    finally:
        for path in workdir.glob(f"{probe.name}*"):
            path.unlink(missing_ok=True)
    if problems:
        listed = "; ".join(f"{worker}: {problem}" for worker, problem in sorted(problems.items()))
        raise StackError(
            f"{len(problems)} of {len(answers)} workers of the Dask cluster at {address} do "
            f"not share the work dir {workdir} ({listed}): every task reads and writes its "
            f"tables there; give --workdir a folder on a file system every worker mounts at "
            f"the same path, with the same user, or --storage URL (an object store they all "
            f"reach) with MLFLOW_TRACKING_URI set to a tracking server they reach"
        )
    return len(answers)
