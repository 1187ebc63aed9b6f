"""What a security probe of the command line found, each closed: mirror credentials kept out of
every record, downloads limited to three schemes and capped in size, the fault hook made
visible, and bad files, odd work dirs and a full disk ending in one line, not a traceback."""

from __future__ import annotations

import base64
import errno
import gzip
import http.server
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import nested_runs, refused_port, run_cli
from mlflow import MlflowClient

from aemnist.config import (
    MIRROR_ENV,
    ConfigError,
    load_config,
    read_saved_config,
    read_toml,
    save_config,
)
from aemnist.data import (
    MAX_DOWNLOAD_BYTES,
    PINS,
    DataError,
    MirrorUnreachable,
    check_mirror,
    fetch_payloads,
    flow_mirror_parameter,
    has_secrets,
    mirror_to_fetch,
    redact_url,
)
from aemnist.faults import FAULT_ENV
from aemnist.tracking import EXPERIMENT, embedded_tracking_uri, open_store
from flows import cli

USER, TOKEN, SIGNATURE = "probe-user", "s3cret-T0ken", "qs-signature-42"
SECRETS = (USER, TOKEN, SIGNATURE)


# --- a loopback mirror ----------------------------------------------------------------------


class Mirror(http.server.ThreadingHTTPServer):
    """Serves ``folder`` (requiring basic auth when ``auth`` is given), or in ``mode``
    "endless" an unending body, "huge" a body declared a terabyte long, "busy" 503s."""

    def __init__(
        self, folder: Path | None = None, auth: str | None = None, mode: str = "files"
    ) -> None:
        self.folder, self.auth, self.mode = folder, auth, mode
        self.requests: Counter[str] = Counter()
        self.authorizations: list[str | None] = []
        self.sent = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, credentials: bool = True) -> str:
        userinfo = f"{USER}:{TOKEN}@" if credentials else ""
        return f"http://{userinfo}127.0.0.1:{self.port}/mnist/?sig={SIGNATURE}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Mirror

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        with self.server.lock:
            self.server.requests[name] += 1
            self.server.authorizations.append(self.headers.get("Authorization"))
        mode = self.server.mode
        if mode == "busy":
            self.send_response(503)
            self.end_headers()
        elif mode == "huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif mode == "endless":
            self.send_response(200)
            self.end_headers()
            block = b"\0" * 2**16
            try:
                while True:
                    self.wfile.write(block)
                    self.server.sent += len(block)
            except OSError:  # the client hung up
                pass
        else:
            self._serve_file(name)

    def _serve_file(self, name: str) -> None:
        auth = self.server.auth
        expected = f"Basic {base64.b64encode(auth.encode()).decode()}" if auth else None
        if auth and self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.end_headers()
            return
        path = self.server.folder / name
        if not path.is_file():
            self.send_response(404)
            self.end_headers()
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """AEMNIST_MNIST_MIRROR restored after the test, whatever it set."""
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    yield


def basic_token() -> str:
    return base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into: {text[:2000]}"


# --- 1. mirror credentials ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:tok@host:8080/mnist/?sig=x#frag", "http://***@host:8080/mnist/?***#***"),
        ("https://tok@host/mnist", "https://***@host/mnist"),
        ("https://u:p@ss@host/m", "https://***@host/m"),
        ("http://u:a/b@host/m", "http://***"),  # unparsable: nothing after the scheme shown
        ("http://host/mnist", "http://host/mnist"),
        ("/data/mnist", "/data/mnist"),
        ("file:///data/mnist", "file:///data/mnist"),
    ],
)
def test_redact_url_hides_user_password_query_and_fragment(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert has_secrets(url) is (url != shown)
    assert redact_url(shown) == shown  # redacting twice changes nothing


def test_a_credentialed_mirror_goes_to_the_flow_through_the_environment(mirror_env) -> None:
    url = f"http://{USER}:{TOKEN}@mirror.example/mnist"
    assert flow_mirror_parameter(url) is None
    assert os.environ[MIRROR_ENV] == url
    assert flow_mirror_parameter("/data/mnist") == "/data/mnist"
    assert flow_mirror_parameter("http://mirror.example/mnist") == "http://mirror.example/mnist"


def test_a_job_records_the_redacted_mirror_and_fetches_from_the_environment(
    mirror_env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flows.study import prepare_study

    url = f"http://{USER}:{TOKEN}@mirror.example/mnist/?sig={SIGNATURE}"
    monkeypatch.setenv(MIRROR_ENV, url)
    study = prepare_study("smoke", str(tmp_path / "w"), None, None, {}, frozenset())

    assert study.mirror == "http://***@mirror.example/mnist/?***"
    assert mirror_to_fetch(study.mirror) == url
    assert mirror_to_fetch("/data/mnist") == "/data/mnist"
    monkeypatch.delenv(MIRROR_ENV)
    with pytest.raises(DataError, match=f"credentials are not in this process's {MIRROR_ENV}"):
        mirror_to_fetch(study.mirror)


def test_download_over_http_sends_the_credentials_and_shows_them_nowhere(
    mnist_mirror: Path, tmp_path: Path
) -> None:
    mirror = Mirror(mnist_mirror, auth=f"{USER}:{TOKEN}")
    try:
        payloads = fetch_payloads(mirror.url(), tmp_path)
        # Without them the mirror refuses (401, not retried): the credentials did the work.
        with pytest.raises(DataError) as refused:
            fetch_payloads(mirror.url(credentials=False), tmp_path)
    finally:
        mirror.shutdown()
    assert set(payloads) == set(PINS)
    for name, (_, source) in payloads.items():
        assert source == f"http://***@127.0.0.1:{mirror.port}/mnist/{name}.gz?***"
    assert mirror.authorizations[0] == f"Basic {basic_token()}"
    assert type(refused.value) is DataError and "HTTP 401" in str(refused.value)
    assert_no_secret(str(refused.value))


def test_a_refused_connection_fails_at_once_without_a_retry_or_a_secret(tmp_path: Path) -> None:
    with refused_port() as port:
        url = f"http://{USER}:{TOKEN}@127.0.0.1:{port}/mnist?sig={SIGNATURE}"
        started = time.monotonic()
        with pytest.raises(DataError) as refused:
            fetch_payloads(url, tmp_path)
    assert time.monotonic() - started < 5
    assert not isinstance(refused.value, MirrorUnreachable)  # the task does not retry it
    message = str(refused.value)
    assert f"http://***@127.0.0.1:{port}/mnist/train-images-idx3-ubyte.gz?***" in message
    assert "Connection refused" in message
    assert_no_secret(message)


def test_a_busy_mirror_is_retried(tmp_path: Path) -> None:
    mirror = Mirror(mode="busy")
    try:
        with pytest.raises(MirrorUnreachable, match="HTTP 503"):
            fetch_payloads(mirror.url(), tmp_path)
    finally:
        mirror.shutdown()


# --- 2. schemes and sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://{USER}:{TOKEN}@mirror.example/mnist",
        "gopher://mirror.example/mnist",
        f"s3://bucket/mnist?sig={SIGNATURE}",
    ],
)
def test_only_file_http_and_https_mirrors_are_allowed(url: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as refused:
        fetch_payloads(url, tmp_path)
    message = str(refused.value)
    assert message.startswith(f"MNIST mirror {redact_url(url)}: ")
    assert "file://, http://, https://" in message and "\n" not in message
    assert_no_secret(message)


def test_the_flow_refuses_a_bad_mirror_scheme_before_any_task(tmp_path: Path) -> None:
    from flows.study import prepare_study

    with pytest.raises(DataError, match=r"^MNIST mirror ftp://\*\*\*@host/m: ftp:// URLs"):
        prepare_study(
            "smoke", str(tmp_path / "w"), None, f"ftp://u:{TOKEN}@host/m", {}, frozenset()
        )
    check_mirror("file:///data/mnist")  # a file URL and a folder pass
    check_mirror("/data/mnist")


@pytest.mark.e2e
def test_the_command_line_refuses_a_bad_mirror_scheme_before_starting_anything(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "work"
    url = f"ftp://{USER}:{TOKEN}@mirror.example/mnist?sig={SIGNATURE}"
    for args, env in (
        (["--mnist-mirror", url], None),
        ([], {MIRROR_ENV: url}),
    ):
        result = run_cli(
            ["run", "--profile", "smoke", "--workdir", str(workdir), *args],
            home=tmp_path / "home",
            env=env,
        )
        assert result.returncode == 2
        assert result.stderr == (
            "aemnist: error: MNIST mirror ftp://***@mirror.example/mnist?***: ftp:// URLs are "
            f"not supported; give a folder or a file://, http://, https:// URL to "
            f"--mnist-mirror or {MIRROR_ENV}\n"
        )
    assert not workdir.exists() and not (tmp_path / "home").exists()


@pytest.mark.parametrize("mode", ["endless", "huge"])
def test_a_mirror_serving_an_endless_stream_is_cut_off(mode: str, tmp_path: Path) -> None:
    mirror = Mirror(mode=mode)
    started = time.monotonic()
    try:
        with pytest.raises(DataError) as refused:
            fetch_payloads(mirror.url(), tmp_path)
    finally:
        mirror.shutdown()
    assert time.monotonic() - started < 30
    assert not isinstance(refused.value, MirrorUnreachable)
    message = str(refused.value)
    assert f"more than {MAX_DOWNLOAD_BYTES // 2**20} MB" in message and "\n" not in message
    assert "train-images-idx3-ubyte.gz?***" in message
    assert_no_secret(message)
    # Streamed: it stopped reading at the cap (plus what the socket buffers held).
    assert mirror.sent < 2 * MAX_DOWNLOAD_BYTES


def test_a_gzip_bomb_is_refused_past_the_pinned_size(mnist_mirror: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bomb"
    folder.mkdir()
    *good, last = PINS  # read in this order: the bomb is the last file
    for name in good:
        (folder / f"{name}.gz").symlink_to(mnist_mirror / f"{name}.gz")
    (folder / f"{last}.gz").write_bytes(gzip.compress(b"\0" * 2**24))  # 16 MB in 16 kB
    with pytest.raises(DataError, match=f"decompresses to more than the {PINS[last].n_bytes} "):
        fetch_payloads(folder, tmp_path)


# --- 4. one line instead of a traceback -----------------------------------------------------


def cli_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_a_config_folder_or_a_non_utf8_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="is a folder, not a TOML file; give --config"):
        read_toml(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("seed = 1 # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_toml(latin1)

    for path, says in ((tmp_path, "is a folder"), (latin1, "is not UTF-8 text")):
        code, err = cli_main(capsys, "config", "--profile", "smoke", "--config", str(path))
        assert code == 2
        assert err.startswith(f"aemnist: error: config file {path} {says}")
        assert err.count("\n") == 1


def test_a_half_written_saved_config_is_one_line_under_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "study_config.json"
    save_config(load_config("smoke"), saved)
    saved.write_text(saved.read_text()[:100])
    code, err = cli_main(capsys, "report", "--workdir", str(tmp_path))
    assert code == 2
    assert err.startswith(f"aemnist: error: {saved} is not a valid saved config (")
    assert "run `aemnist run` again" in err and err.count("\n") == 1

    saved.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="a JSON list, not an object"):
        read_saved_config(saved)
    saved.write_text(json.dumps({"seed": -1}))
    with pytest.raises(ConfigError, match=f"^{saved}: seed: "):
        read_saved_config(saved)


def test_the_saved_config_is_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = tmp_path / "study_config.json"
    save_config(load_config("smoke"), saved)
    before = saved.read_text()
    inode = saved.stat().st_ino

    def full_disk(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left") as full:
        save_config(load_config("quick"), saved)
    assert full.value.filename == str(saved)  # named by its file, not the temporary one
    assert saved.read_text() == before  # the old file whole, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study_config.json"]
    monkeypatch.undo()
    save_config(load_config("quick"), saved)
    assert saved.stat().st_ino != inode  # replaced, not rewritten in place
    assert read_saved_config(saved) == load_config("quick")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study_config.json"]


def test_the_mlflow_store_lands_inside_a_work_dir_with_url_characters(tmp_path: Path) -> None:
    # Unescaped, SQLAlchemy read this as the store "<tmp>/w a" (query "b=c#d%20e"), or with
    # only the "%20" as "<tmp>/w a?b=c#d e".
    name = "w a?b=c#d%20e"
    workdir = tmp_path / name
    workdir.mkdir()
    uri = embedded_tracking_uri(workdir)
    open_store(uri, workdir)
    assert (workdir / "mlflow.db").is_file()
    stores = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("mlflow.db"))
    assert stores == [f"{name}/mlflow.db"]
    assert MlflowClient(uri).get_experiment_by_name(EXPERIMENT) is not None


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/w/study_config.json"),
         "No space left on device: /w/study_config.json; free some space"),
        (PermissionError(errno.EACCES, "Permission denied", "/w/report.md"),
         "Permission denied: /w/report.md; fix its permissions"),
    ],
)  # fmt: skip
def test_a_full_disk_or_a_denied_path_is_one_line_naming_it(
    error: OSError, says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import study_commands

    def failing(args: object) -> int:
        raise error

    monkeypatch.setattr(study_commands, "_config", failing)
    code, err = cli_main(capsys, "config", "--profile", "smoke")
    assert code == 2 and err.startswith(f"aemnist: error: {says}")
    assert err.count("\n") == 1


def test_a_full_disk_without_a_path_names_the_work_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import study_commands

    def failing(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")  # as os.write raises it

    monkeypatch.setattr(study_commands, "_report", failing)
    code, err = cli_main(capsys, "report", "--workdir", str(tmp_path))
    assert code == 2
    assert err == (
        f"aemnist: error: No space left on device (in the work dir {tmp_path}); free some "
        f"space there or choose another --workdir\n"
    )


def test_an_os_error_that_looks_like_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.cli import study_commands

    def failing(args: object) -> int:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/w/expected")

    monkeypatch.setattr(study_commands, "_config", failing)
    with pytest.raises(FileNotFoundError):
        cli.main(["config", "--profile", "smoke"])


# --- end to end: a credentialed mirror and the fault hook through `aemnist run` --------------


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.e2e
def test_a_refused_mirror_fails_the_run_without_a_retry_naming_it_redacted(tmp_path: Path) -> None:
    with refused_port() as port:
        url = f"http://{USER}:{TOKEN}@127.0.0.1:{port}/mnist?sig={SIGNATURE}"
        result = run_cli(
            ["run", "--profile", "smoke", "--workdir", str(tmp_path / "w"), "--mnist-mirror", url],
            home=tmp_path / "home",
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert f"http://***@127.0.0.1:{port}/mnist/train-images-idx3-ubyte.gz?***" in output
    assert "Retry" not in output and "retrying" not in output
    assert_no_secret(output)
    assert not files_holding(tmp_path, TOKEN.encode())


@pytest.mark.e2e
def test_smoke_run_keeps_mirror_credentials_out_of_every_record_and_shows_the_fault_hook(
    mnist_mirror: Path, tmp_path: Path
) -> None:
    mirror = Mirror(mnist_mirror, auth=f"{USER}:{TOKEN}")
    workdir, home = tmp_path / "work", tmp_path / "home"
    spec = "sweep:size=999"  # matches no task: the study runs through
    try:
        result = run_cli(
            ["run", "--profile", "smoke", "--workdir", str(workdir), "--mnist-mirror",
             mirror.url()],
            home=home,
            env={FAULT_ENV: spec},
        )  # fmt: skip
    finally:
        mirror.shutdown()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    shown = f"http://***@127.0.0.1:{mirror.port}/mnist/?***"
    # The mirror was used, with the credentials: four files, each fetched once.
    assert sorted(mirror.requests.values()) == [1, 1, 1, 1]
    assert all(a and a.startswith("Basic ") for a in mirror.authorizations)

    # Nowhere: not in the output, the work dir (MLflow's store, Prefect's results), nor the
    # Prefect server's database (flow and task runs, their parameters, states and logs).
    assert_no_secret(output)
    for secret in SECRETS:
        assert files_holding(tmp_path, secret.encode()) == []
    # ... where the redacted form is: the scan reads what it should.
    assert f"MNIST downloaded from {shown} and verified" in output
    assert files_holding(home, shown.encode()), "the Prefect database holds no download log"

    client = MlflowClient(embedded_tracking_uri(workdir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.profile = 'smoke'")
    download = nested_runs(client, parent.info.run_id)["download"]
    assert download.data.params["mirror"] == shown

    # The fault hook: a warning as the study starts and a tag on its parent run.
    assert parent.data.tags["aemnist.fault"] == spec
    assert f"{FAULT_ENV}='{spec}' is set" in output
