"""PostgreSQL for `aemnist server --database`: a cluster of the stack's own, kept in the work
dir (``--database postgres``), or an existing server (``--database URL``). Either way the
stack keeps its data in two databases there, ``prefect`` (the Prefect server's, through
asyncpg) and ``mlflow`` (the MLflow tracking server's, through psycopg), created when absent.

The stack's own cluster lives in ``WORKDIR/server/postgres/`` (``data/``, and ``sockets/``
for its Unix socket), is run from Debian's server binaries (initdb, postgres, pg_ctl), listens
on 127.0.0.1 only and admits its one role, ``aemnist``, by a password generated at its
creation and kept in ``WORKDIR/server/postgres.password`` (mode 0600). The password reaches
the servers only through their environment, and is never printed, logged or put in an
error: every URL shown is redacted.

PostgreSQL refuses to run as root. Run by root, the cluster belongs to the unprivileged
system user ``postgres`` (Debian's package creates it), which runs initdb, the server and
pg_ctl through ``setpriv``; as the work dir is usually one only root may enter (mode 0700),
that user keeps one capability, CAP_DAC_READ_SEARCH, to reach its data folder in it, and
nothing else of root's.

The server runs in the foreground as one of the stack's children (deployments/servers.py),
launched before the Prefect and MLflow servers and so stopped after them; it is stopped as
its manual says, ``pg_ctl stop -m fast`` (a clean shutdown checkpoint), and gets SIGTERM
should the stack die. A server an earlier stack left running (after a ``kill -9`` of it) is
stopped first: the stack holds the work dir's server lock, so no other stack is using it.

Only the standard library at import time; asyncpg (Prefect's dependency) is imported when a
database is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from deployments.stack import LOOPBACK, StackError

SQLITE = "sqlite"
OWN_CLUSTER = "postgres"
DATABASES = ("prefect", "mlflow")
ROLE = "aemnist"  # the own cluster's one role, its superuser
DEFAULT_PORT = 5432
SERVICE_USER = "postgres"  # who runs the cluster when we are root
BINARIES = ("initdb", "postgres", "pg_ctl")
# Where Debian's (and Ubuntu's) postgresql-NN packages put their server binaries.
DEBIAN_BIN_DIRS = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = (
    "install PostgreSQL's server binaries (Debian and Ubuntu: `apt-get install postgresql`) "
    "or put the folder holding initdb on PATH"
)
# Unix sockets have a path limit (108 bytes on Linux, the name .s.PGSQL.NNNNN included).
SOCKET_PATH_MAX = 107 - len("/.s.PGSQL.65535")


@dataclass(frozen=True)
class Server:
    """A PostgreSQL server as the stack reaches it: where, and as whom."""

    host: str
    port: int
    user: str
    password: str | None  # None: the server needs none, or ~/.pgpass holds it

    @property
    def shown(self) -> str:
        """The server as messages and output name it: no user, no password."""
        return f"postgresql://***@{self._netloc}" if self.user else f"postgresql://{self._netloc}"

    @property
    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, driver: str, database: str) -> str:
        """The SQLAlchemy URL of ``database`` with ``driver`` (asyncpg, psycopg): it holds
        the password, so it goes into a server's environment and nowhere else."""
        userinfo = quote(self.user, safe="")
        if self.password is not None:
            userinfo += ":" + quote(self.password, safe="")
        return f"postgresql+{driver}://{userinfo}@{self._netloc}/{database}"

    def scrub(self, text: str) -> str:
        """``text`` with the password, plain or URL-quoted, replaced by ***."""
        if self.password:
            for secret in {self.password, quote(self.password, safe="")}:
                text = text.replace(secret, "***")
        return text


@dataclass
class Database:
    """What `aemnist server` runs its servers on: the two URLs (secret), and one line that
    says where the data is (no secret)."""

    prefect_url: str
    mlflow_url: str
    description: str


def parse_database(spec: str) -> Server | str:
    """``--database``: ``sqlite`` or ``postgres`` (returned as they are), or the URL of an
    existing server, ``postgresql://USER[:PASSWORD]@HOST[:PORT]``; anything else stops the
    command with one line (that shows no password)."""
    if spec in (SQLITE, OWN_CLUSTER):
        return spec
    shown = _redacted(spec)
    hint = (
        "give `sqlite` (the default), `postgres` (a cluster of the stack's own in the work "
        "dir) or postgresql://USER:PASSWORD@HOST:PORT"
    )
    if "://" not in spec:
        raise StackError(f"--database {shown} is neither a database kind nor a URL: {hint}")
    try:
        parts = urlsplit(spec)
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise StackError(f"--database {shown} is not a valid URL: {hint}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise StackError(f"--database {shown} is not a PostgreSQL URL: {hint}")
    if not parts.hostname or not parts.username:
        raise StackError(f"--database {shown} names no host or no user: {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise StackError(
            f"--database {shown} names a database or options: give only the server "
            f"(postgresql://USER:PASSWORD@HOST:PORT); the stack uses its databases "
            f"{' and '.join(DATABASES)} there"
        )
    password = unquote(parts.password) if parts.password is not None else None
    return Server(parts.hostname, port, unquote(parts.username), password)


def _redacted(spec: str) -> str:
    from aemnist.data import redact_url  # the project's one way of showing a URL

    return redact_url(spec)


# --- an existing server: checked, and its databases created -------------------------------


def prepare(server: Server, timeout: float = 10.0) -> None:
    """Connect to ``server`` and create the stack's databases that it lacks; a server that
    does not answer, refuses the user or password, or may not create them stops the command
    with one line naming it and the fix."""
    try:
        asyncio.run(_prepare(server, timeout))
    except StackError:
        raise
    except Exception as exc:  # what asyncpg or the network raise: one line, scrubbed
        raise StackError(server.scrub(_connect_problem(server, exc))) from None


async def _prepare(server: Server, timeout: float) -> None:
    import asyncpg

    connection = await _connect(server, "postgres", timeout)
    try:
        present = {
            row["datname"]
            for row in await connection.fetch(
                "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", list(DATABASES)
            )
        }
        for name in DATABASES:
            if name in present:
                continue
            try:
                # A name from DATABASES, never from input: nothing to quote.
                await connection.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.InsufficientPrivilegeError:
                raise StackError(
                    f"the user of --database {server.shown} may not create the database "
                    f"{name!r}: create it there (CREATE DATABASE {name} OWNER that user) or "
                    f"grant the user CREATEDB"
                ) from None
            except asyncpg.DuplicateDatabaseError:  # created meanwhile by someone else
                pass
    finally:
        await connection.close()


async def _connect(server: Server, database: str, timeout: float):  # -> asyncpg.Connection
    import asyncpg

    return await asyncpg.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=server.password,
        database=database,
        timeout=timeout,
    )


def _connect_problem(server: Server, exc: BaseException) -> str:
    import asyncpg

    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return (
            f"the PostgreSQL server at {server.shown} refused the user or password "
            f"({exc}): correct them in --database"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return (
            f"the PostgreSQL server at {server.shown} has no database 'postgres' to connect "
            f"to first ({exc}): create it, or create the databases "
            f"{' and '.join(DATABASES)} there yourself"
        )
    if isinstance(exc, asyncpg.PostgresError):
        return f"the PostgreSQL server at {server.shown} answered with an error: {exc}"
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        reason = "no answer in time"
    return (
        f"no PostgreSQL server answers at {server.shown} ({reason}): start it, or correct "
        f"the host and port in --database"
    )


# --- the stack's own cluster ---------------------------------------------------------------


def find_binaries(path: str | None = None, search: str = DEBIAN_BIN_DIRS) -> dict[str, Path]:
    """initdb, postgres and pg_ctl, from one folder: the first on ``path`` (default: PATH)
    that holds initdb, else the newest of Debian's /usr/lib/postgresql/NN/bin."""
    found = shutil.which("initdb", path=path)
    candidates = [Path(found).resolve().parent] if found else []
    versions = sorted(
        Path("/").glob(search.lstrip("/")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    candidates += versions
    for folder in candidates:
        binaries = {name: folder / name for name in BINARIES}
        if all(os.access(p, os.X_OK) for p in binaries.values()):
            return binaries
    raise StackError(
        f"`aemnist server --database {OWN_CLUSTER}` needs PostgreSQL's server binaries "
        f"(initdb, postgres, pg_ctl), found neither on PATH nor in {DEBIAN_BIN_DIRS}: "
        f"{INSTALL_HINT}"
    )


class Cluster:
    """The stack's own PostgreSQL cluster in ``folder`` (WORKDIR/server/postgres), its
    password in ``password_file`` and its server's output in ``log``."""

    def __init__(self, folder: Path, password_file: Path, log: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.sockets = folder / "sockets"
        self.password_file = password_file
        self.log = log
        self.binaries = find_binaries()
        self.owner, self.runner = _runner()

    # What runs the binaries: as ourselves, or (root) as the service user.
    def _command(self, name: str, *args: str) -> list[str]:
        return [*self.runner, str(self.binaries[name]), *args]

    def _run(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._command(name, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_server_env(),
            stdin=subprocess.DEVNULL,
        )

    def _owned_folder(self, path: Path) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        if self.owner is not None:
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        path.chmod(0o700)

    @property
    def exists(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def password(self) -> str:
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            raise StackError(
                f"the PostgreSQL cluster in {self.folder} has lost its password file "
                f"{self.password_file}: restore it, or move {self.folder} away to start a new "
                f"cluster (the runs it holds stay in the old one)"
            ) from None

    def create(self) -> None:
        """initdb, unless the cluster exists: a fresh password, then the cluster in a
        folder renamed into place once initdb succeeded (one it left half-made is
        discarded)."""
        if self.exists:
            return
        self._owned_folder(self.folder)
        password = secrets.token_urlsafe(24)
        # Written before the cluster exists, so that a cluster never lacks it.
        _write_private(self.password_file, password)
        # initdb reads the password from a file: the service user's own, removed after.
        pwfile = self.folder / ".initdb-password"
        _write_private(pwfile, password, self.owner)
        partial = self.folder / "data.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            proc = self._run(
                "initdb",
                "--pgdata", str(partial),
                "--username", ROLE,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise StackError(
                f"initdb could not create the PostgreSQL cluster in {self.folder} (exit "
                f"{proc.returncode}); it says:\n    {tail}"
            )
        partial.rename(self.data)

    def stop_leftover(self, say: Callable[[str], None]) -> None:
        """Stop a server an earlier stack left running on this cluster (killed with -9, it
        could not stop it)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return  # none, or a stale file postgres itself will replace
        if b"postgres" not in command:
            return
        say(f"Stopping the PostgreSQL server (pid {pid}) an earlier `aemnist server` left running.")
        self.stop()

    def start(self, port: int):  # -> deployments.servers.Service
        """Launch the server on 127.0.0.1:``port`` as a child of the stack."""
        from deployments.servers import launch_child

        self._owned_folder(self.sockets)
        sockets = str(self.sockets) if len(str(self.sockets)) <= SOCKET_PATH_MAX else ""
        command = self._command(
            "postgres",
            "-D", str(self.data),
            "-c", f"listen_addresses={LOOPBACK}",
            "-c", f"port={port}",
            # Its own socket folder: not the system's /var/run/postgresql (whose owner may
            # not be us); none where the path would be too long for a socket.
            "-c", f"unix_socket_directories={sockets}",
        )  # fmt: skip
        service = launch_child("PostgreSQL server", command, _server_env(), self.log)
        service.before_stop = self.stop
        service.grace = 60.0  # a shutdown checkpoint may take a while on a busy disk
        return service

    def stop(self) -> None:
        """A clean stop: pg_ctl's fast mode (sessions ended, a shutdown checkpoint)."""
        self._run("pg_ctl", "stop", "--pgdata", str(self.data), "-m", "fast", "-w", "-t", "60",
                  timeout=90)  # fmt: skip

    def server(self, port: int) -> Server:
        return Server(LOOPBACK, port, ROLE, self.password())


def _runner() -> tuple[pwd.struct_passwd | None, list[str]]:
    """Who owns and runs the cluster: we ourselves (None, no prefix), or, when we are root,
    the service user through setpriv."""
    if os.geteuid() != 0:
        return None, []
    try:
        owner = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise StackError(
            f"PostgreSQL refuses to run as root, and there is no system user {SERVICE_USER!r} "
            f"to run it: create that user (Debian's postgresql package does) or run "
            f"`aemnist server` as an ordinary user"
        ) from None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise StackError(
            "running PostgreSQL from root needs setpriv to drop to the postgres user: install "
            "util-linux, or run `aemnist server` as an ordinary user"
        )
    return owner, [
        setpriv,
        f"--reuid={owner.pw_uid}",
        f"--regid={owner.pw_gid}",
        "--init-groups",
        # To reach its data folder through the work dir's folders that only root may enter.
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        # The stack's death signal survives the change of user: no orphaned server.
        "--pdeathsig=keep",
        "--",
    ]


def _server_env() -> dict[str, str]:
    """PostgreSQL's environment: a path and English messages, nothing of ours (no PG*
    variable that would point it elsewhere)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


def _write_private(path: Path, text: str, owner: pwd.struct_passwd | None = None) -> None:
    """``text`` in a new file only its owner may read (created so: never briefly readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def wait_until_accepting(service, server: Server, log: Path, deadline: float) -> None:
    """Poll until the server accepts a session (True), or say why it did not: it exited, or
    ``deadline`` (monotonic) passed."""
    import asyncpg

    while True:
        if not service.alive():
            raise StackError(
                f"the PostgreSQL server exited with code {service.process.returncode} before "
                f"accepting connections; its log {log} ends:\n    {_log_tail(log)}"
            )
        try:
            asyncio.run(_ping(server))
            return
        except (OSError, TimeoutError, asyncpg.CannotConnectNowError):
            pass
        if time.monotonic() > deadline:
            raise StackError(
                f"the PostgreSQL server did not accept connections on {server.shown} in time "
                f"(on a slow or busy machine, allow longer with --timeout); its log {log} "
                f"ends:\n    {_log_tail(log)}"
            )
        time.sleep(0.2)


async def _ping(server: Server) -> None:
    connection = await _connect(server, "postgres", timeout=2.0)
    await connection.close()


def _log_tail(path: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip().splitlines()
        return "\n    ".join(text[-lines:]) or "(empty log)"
    return "(no log)"


def open_database(
    spec: Server | str, state: Path, port: int, timeout: float, say: Callable[[str], None]
) -> Database | None:
    """The database of `aemnist server`: None for SQLite (the servers' defaults); else the
    stack's own cluster in ``state`` (created, started on ``port``) or the existing server
    ``spec``, with the stack's two databases on it."""
    if spec == SQLITE:
        return None
    if importlib.util.find_spec("psycopg") is None:  # the MLflow server's driver
        raise StackError(
            "the MLflow server needs the PostgreSQL driver psycopg, which is not installed "
            "here: pip install -e '.[postgres]' (or pip install 'psycopg[binary]')"
        )
    if isinstance(spec, Server):
        server, where = spec, f"PostgreSQL at {spec.shown}"
    else:
        cluster = Cluster(state / "postgres", state / "postgres.password", state / "postgres.log")
        created = not cluster.exists
        cluster.create()
        cluster.stop_leftover(say)
        server = cluster.server(port)
        service = cluster.start(port)
        wait_until_accepting(service, server, cluster.log, time.monotonic() + timeout)
        where = (
            f"PostgreSQL on {LOOPBACK}:{port}, {'a new' if created else 'the'} cluster in "
            f"{cluster.folder} (password in {cluster.password_file})"
        )
    prepare(server)
    return Database(
        server.url("asyncpg", "prefect"),
        server.url("psycopg", "mlflow"),
        f"{where}, databases {' and '.join(DATABASES)}",
    )
