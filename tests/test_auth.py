"""The stack's credentials file and the Dask TLS option, without servers: what is accepted,
what is refused and what each refusal says. (The servers that use them are exercised in
test_production_e2e and test_processes_e2e.)"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from deployments.auth import (
    CLIENT_ENV_KEYS,
    CREDENTIALS_FILE,
    MLFLOW_AUTH_DB,
    is_loopback,
    load_or_create_credentials,
    mlflow_auth,
    prefect_server_env,
    read_credentials,
    require_auth_off_loopback,
)
from deployments.dask_tls import check_dask_scheduler, parse_dask_security
from deployments.stack import StackError


def test_credentials_are_generated_once_private_and_never_shown(tmp_path: Path) -> None:
    state = tmp_path / "server"
    first, path, created = load_or_create_credentials(state)
    assert created and path == state / CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    # A shell's `set -a; . FILE` exports exactly the three variables the clients read.
    lines = path.read_text().splitlines()
    assert [line.partition("=")[0] for line in lines] == list(CLIENT_ENV_KEYS)
    again, _, created_again = load_or_create_credentials(state)
    assert again == first and not created_again
    # Two generations differ, and the secrets are long.
    other, _, _ = load_or_create_credentials(tmp_path / "elsewhere")
    assert other.mlflow_password != first.mlflow_password
    assert len(first.mlflow_password) >= 32
    assert first.prefect_auth_string.startswith("aemnist:")
    shown = repr(first)
    assert first.mlflow_password not in shown
    assert first.prefect_auth_string.partition(":")[2] not in shown


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_credentials_file_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    _, path, _ = load_or_create_credentials(tmp_path)
    path.chmod(mode)
    with pytest.raises(StackError, match=r"is open to others .*\(`chmod 600 "):
        read_credentials(path)


def test_a_credentials_file_is_parsed_not_executed_and_must_be_complete(tmp_path: Path) -> None:
    path = tmp_path / CREDENTIALS_FILE
    marker = tmp_path / "ran"
    path.write_text(
        f"# comment\nPREFECT_API_AUTH_STRING=aemnist:x\n$(touch {marker})\n"
        f"MLFLOW_TRACKING_USERNAME=admin\n"
    )
    path.chmod(0o600)
    with pytest.raises(StackError, match="lacks MLFLOW_TRACKING_PASSWORD: delete it"):
        read_credentials(path)
    assert not marker.exists()


def test_a_lost_credentials_file_with_an_mlflow_user_store_is_named_not_replaced(
    tmp_path: Path,
) -> None:
    (tmp_path / MLFLOW_AUTH_DB).write_bytes(b"")
    with pytest.raises(StackError, match="credentials file .* is gone: restore the file"):
        load_or_create_credentials(tmp_path)
    assert not (tmp_path / CREDENTIALS_FILE).exists()


def test_only_loopback_serves_without_auth() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
        require_auth_off_loopback(host, auth=False, what="servers")
    for host in ("0.0.0.0", "::", "192.168.1.4", "my-host.example"):
        assert not is_loopback(host)
        with pytest.raises(StackError, match=f"on {host} without authentication: .*--auth"):
            require_auth_off_loopback(host, auth=False, what="servers")
        require_auth_off_loopback(host, auth=True, what="servers")


def test_prefect_server_settings_turn_csrf_on_and_narrow_cors_whatever_the_auth(
    tmp_path: Path,
) -> None:
    credentials, _, _ = load_or_create_credentials(tmp_path)
    open_env = prefect_server_env(4200, None)
    assert open_env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert open_env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == (
        "http://127.0.0.1:4200,http://localhost:4200"
    )
    assert open_env["PREFECT_UI_API_URL"] == "/api"
    assert "PREFECT_SERVER_API_AUTH_STRING" not in open_env
    assert prefect_server_env(0, None)["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == ""
    authed = prefect_server_env(0, credentials)
    assert authed["PREFECT_SERVER_API_AUTH_STRING"] == credentials.prefect_auth_string


def test_mlflow_auth_keeps_the_password_off_the_command_line(tmp_path: Path) -> None:
    credentials, _, _ = load_or_create_credentials(tmp_path)
    args, env = mlflow_auth(tmp_path, credentials)
    assert args == ["--app-name", "basic-auth"]
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert credentials.mlflow_password not in config.read_text()
    assert f"sqlite:///{tmp_path / MLFLOW_AUTH_DB}" in config.read_text()
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == credentials.mlflow_password


def test_dask_security_option_is_parsed_and_its_mistakes_named(tmp_path: Path) -> None:
    tls = parse_dask_security(f"ca={tmp_path}/ca.pem, cert={tmp_path}/c.pem,key={tmp_path}/k.pem")
    assert (tls.ca_file, tls.cert_file, tls.key_file) == (
        f"{tmp_path}/ca.pem",
        f"{tmp_path}/c.pem",
        f"{tmp_path}/k.pem",
    )
    with pytest.raises(StackError, match="is not of the form ca=FILE,cert=FILE,key=FILE"):
        parse_dask_security(f"{tmp_path}/ca.pem")
    with pytest.raises(StackError, match="lacks key"):
        parse_dask_security("ca=a.pem,cert=c.pem")
    with pytest.raises(StackError, match="was given but --dask-address .* is plain tcp://"):
        check_dask_scheduler("tcp://127.0.0.1:8786", tls, None)
    with pytest.raises(StackError, match="is not of the form tls://HOST:PORT"):
        check_dask_scheduler("udp://10.0.0.1:8786", None, None)
