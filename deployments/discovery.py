"""Where a work dir's servers are: `aemnist server --workdir W` leaves W/server/endpoints.json
(mode 0600: the Prefect API URL, the MLflow tracking URI and the server's process id) while it
serves, and removes it as it stops; `aemnist run --workdir W` without PREFECT_API_URL finds
it and runs on those servers, so that the run stays browsable in their UIs afterwards.

A file left by a server that is gone (killed with SIGKILL, a machine that restarted) is
recognised as stale: its process no longer runs, or its Prefect API does not answer. The file
is parsed as JSON and its fields checked; nothing in it is executed.

Only the standard library: `aemnist run` reads it before it imports anything heavy."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from deployments.servers import answers

ENDPOINTS = "endpoints.json"
# The port `aemnist server` serves the Prefect UI and API on unless told otherwise.
PREFECT_PORT = 4200
# Seconds a live server's Prefect API has to answer before its file is taken for stale.
ANSWER_WITHIN = 30.0


def server_dir(workdir: Path) -> Path:
    """A work dir's server state: the Prefect database (shared by `aemnist server` and the
    temporary server of `aemnist run`), the servers' logs, the discovery file."""
    return workdir / "server"


def prefect_database(workdir: Path) -> Path:
    """The Prefect database of a work dir's flow runs."""
    return server_dir(workdir) / "prefect.db"


@dataclass(frozen=True)
class Endpoints:
    """A running `aemnist server`: where its Prefect API and MLflow server answer."""

    prefect_api_url: str  # http://HOST:PORT/api
    mlflow_tracking_uri: str  # http://HOST:PORT
    pid: int


def write_endpoints(workdir: Path, endpoints: Endpoints) -> Path:
    """Write W/server/endpoints.json (0600, replaced atomically), removed at this process's
    exit; returns its path."""
    path = server_dir(workdir) / ENDPOINTS
    temp = path.with_name(f".{ENDPOINTS}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(endpoints), out, indent=2)
    os.replace(temp, path)
    atexit.register(remove_endpoints, workdir, endpoints.pid)
    return path


def remove_endpoints(workdir: Path, pid: int) -> None:
    """Remove the discovery file if it is still the one server ``pid`` wrote."""
    path = server_dir(workdir) / ENDPOINTS
    found = _read(path)
    if found is not None and found.pid == pid:
        with contextlib.suppress(OSError):
            path.unlink()


def find_servers(workdir: Path, patience: float = ANSWER_WITHIN) -> Endpoints | None:
    """The servers `aemnist server --workdir W` runs for ``workdir``, if it runs: its
    discovery file is there, its process is alive and its Prefect API answers within
    ``patience`` seconds (a busy machine's server can take seconds to answer a first
    request). None otherwise (no file, a stale or malformed one)."""
    found = _read(server_dir(workdir) / ENDPOINTS)
    if found is None or not _alive(found.pid):
        return None
    deadline = time.monotonic() + patience
    while not answers(f"{found.prefect_api_url}/health", timeout=10.0):
        if time.monotonic() > deadline or not _alive(found.pid):
            return None
        time.sleep(0.5)
    return found


def _read(path: Path) -> Endpoints | None:
    try:
        raw = json.loads(path.read_text())
        found = Endpoints(
            prefect_api_url=str(raw["prefect_api_url"]).rstrip("/"),
            mlflow_tracking_uri=str(raw["mlflow_tracking_uri"]).rstrip("/"),
            pid=int(raw["pid"]),
        )
    except (OSError, ValueError, TypeError, KeyError):
        return None
    urls = (found.prefect_api_url, found.mlflow_tracking_uri)
    if not all(urlsplit(url).scheme in ("http", "https") for url in urls) or found.pid <= 0:
        return None
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: its API answering decides
        return True
    return True
