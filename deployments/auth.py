"""Who may talk to the stack's servers.

`aemnist server --auth` generates credentials once, into ``WORKDIR/server/credentials.env``
(mode 0600): Prefect's API auth string (HTTP basic auth on every route but the health
check) and the admin password of MLflow's basic-auth app. Clients take them from the
environment, where Prefect's and MLflow's own clients look: ``PREFECT_API_AUTH_STRING``,
``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` (`set -a; .
WORKDIR/server/credentials.env; set +a` in a shell). The file is parsed here as plain
``KEY=VALUE`` lines, never executed, and refused when anyone but its owner could read or
write it.

Whatever the host, the Prefect server runs with CSRF protection on (a state-changing request
needs a token that only a page allowed by CORS can read) and CORS limited to the UI's own
origin; MLflow's server keeps its default protections (host-header check, CORS limited to
localhost origins). A non-loopback ``--host`` without ``--auth`` is refused.

Only the standard library: imported before `aemnist run` imports Prefect.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aemnist.workdir import sqlite_url
from deployments.stack import StackError

CREDENTIALS_FILE = "credentials.env"
MLFLOW_AUTH_CONFIG = "mlflow-auth.ini"
MLFLOW_AUTH_DB = "mlflow-auth.db"
MLFLOW_SECRET_KEY = "mlflow-secret-key"
PREFECT_USER = "aemnist"
MLFLOW_ADMIN = "admin"

PREFECT_AUTH_ENV = "PREFECT_API_AUTH_STRING"
MLFLOW_USER_ENV = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
CLIENT_ENV_KEYS = (PREFECT_AUTH_ENV, MLFLOW_USER_ENV, MLFLOW_PASSWORD_ENV)


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def require_auth_off_loopback(host: str, auth: bool, what: str) -> None:
    """Refuse to serve ``what`` on a non-loopback address without authentication: anyone
    who reaches an open Prefect API can have a worker run a command of theirs."""
    if not auth and not is_loopback(host):
        raise StackError(
            f"refusing to serve the {what} on {host} without authentication: anyone who "
            f"reaches it could create runs that a worker executes; add --auth (credentials "
            f"are generated into WORKDIR/server/{CREDENTIALS_FILE}) or bind 127.0.0.1"
        )


@dataclass(frozen=True)
class Credentials:
    """The stack's credentials; never shown (repr hides them)."""

    prefect_auth_string: str = field(repr=False)  # "user:password"
    mlflow_username: str
    mlflow_password: str = field(repr=False)

    def client_env(self) -> dict[str, str]:
        """The variables through which Prefect's and MLflow's clients authenticate."""
        return {
            PREFECT_AUTH_ENV: self.prefect_auth_string,
            MLFLOW_USER_ENV: self.mlflow_username,
            MLFLOW_PASSWORD_ENV: self.mlflow_password,
        }


def load_or_create_credentials(state_dir: Path) -> tuple[Credentials, Path, bool]:
    """The stack's credentials from ``state_dir``, generated on first use; returns them, the
    file that holds them and whether it was created now."""
    path = state_dir / CREDENTIALS_FILE
    if path.exists():
        return read_credentials(path), path, False
    if (state_dir / MLFLOW_AUTH_DB).exists():
        # MLflow's auth app takes the admin password only when it creates its user store:
        # a new password would not open the old store.
        raise StackError(
            f"{state_dir / MLFLOW_AUTH_DB} exists but its credentials file {path} is gone: "
            f"restore the file, or delete {MLFLOW_AUTH_DB} to start MLflow's users afresh"
        )
    credentials = Credentials(
        prefect_auth_string=f"{PREFECT_USER}:{secrets.token_urlsafe(24)}",
        mlflow_username=MLFLOW_ADMIN,
        mlflow_password=secrets.token_urlsafe(24),
    )
    text = "".join(f"{key}={value}\n" for key, value in credentials.client_env().items())
    _write_private(path, text)
    return credentials, path, True


def _read_private(path: Path) -> str:
    """The text of a secret file, refused when anyone but its owner can read or write it."""
    try:
        info = path.stat()
    except OSError as exc:
        raise StackError(f"cannot read the secret file {path} ({exc.strerror})") from None
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StackError(
            f"the secret file {path} is open to others (mode "
            f"{stat.filemode(info.st_mode)}, owner uid {info.st_uid}): make it yours alone "
            f"(`chmod 600 {path}`) or delete it to generate a new one"
        )
    return path.read_text(encoding="utf-8", errors="replace").strip()


def read_credentials(path: Path) -> Credentials:
    """Parse a credentials file (``KEY=VALUE`` lines, ``#`` comments); refuse one that others
    can read or write, or that lacks a key."""
    values: dict[str, str] = {}
    for line in _read_private(path).splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    missing = [key for key in CLIENT_ENV_KEYS if not values.get(key)]
    if missing:
        raise StackError(
            f"the credentials file {path} lacks {', '.join(missing)}: delete it to generate "
            f"new credentials"
        )
    return Credentials(
        prefect_auth_string=values[PREFECT_AUTH_ENV],
        mlflow_username=values[MLFLOW_USER_ENV],
        mlflow_password=values[MLFLOW_PASSWORD_ENV],
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file that only its owner can read (created 0600: no moment
    at which another user could open it)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_TRUNC


def prefect_server_env(port: int, credentials: Credentials | None) -> dict[str, str]:
    """Settings for a Prefect server on loopback ``port`` (0: not known yet): CSRF protection
    on; cross-origin requests only from its own UI's origins on this machine (its UI calls
    the API on its own origin, which needs no CORS; nothing else is let through); the auth
    string when authenticating."""
    origins = [f"http://{host}:{port}" for host in ("127.0.0.1", "localhost")] if port else []
    env = {
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
        # Starlette's CORS middleware compares origins exactly: "" allows none.
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(origins),
        # The UI asks its settings where the API is; by default it is told 127.0.0.1:4200,
        # whatever host and port served it. On the path alone, it calls the server that
        # served it, under whatever name and port the browser reached it.
        "PREFECT_UI_API_URL": "/api",
    }
    if credentials is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = credentials.prefect_auth_string
    return env


def mlflow_auth(state_dir: Path, credentials: Credentials) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment that run an MLflow server with its basic-auth app: its
    user store in ``state_dir``, the generated admin password taken when that store is
    created (through the environment: never on the command line, where `ps` shows it)."""
    config = state_dir / MLFLOW_AUTH_CONFIG
    _write_private(
        config,
        "[mlflow]\n"
        "# Written by `aemnist server --auth`; the admin password is in credentials.env.\n"
        "default_permission = READ\n"
        # configparser reads "%" as the start of an interpolation: doubled.
        f"database_uri = {sqlite_url(state_dir / MLFLOW_AUTH_DB).replace('%', '%%')}\n"
        f"admin_username = {credentials.mlflow_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Every request checks the password against its PBKDF2 hash, about 0.1 s of CPU
        # (0.6 s measured on a loaded two-core machine): a run's hundreds of logging calls
        # would spend minutes there. A successful check is remembered for five minutes, in
        # the one worker process this server runs, where a password change also clears it.
        "auth_cache_ttl_seconds = 300\n",
    )
    # The key of the auth app's own CSRF tokens: the server's secret, not the clients'.
    secret_file = state_dir / MLFLOW_SECRET_KEY
    if not secret_file.exists():
        _write_private(secret_file, secrets.token_urlsafe(32))
    env = {
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _read_private(secret_file),
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": credentials.mlflow_username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.mlflow_password,
    }
    return ["--app-name", "basic-auth"], env


def without_client_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less the clients' credentials: a server process needs none of them."""
    return {key: value for key, value in env.items() if key not in CLIENT_ENV_KEYS}
