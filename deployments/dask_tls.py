"""TLS between a study and an existing Dask cluster.

A Dask scheduler listening on plain ``tcp://`` runs whatever any client that reaches it
submits, and carries the tasks' data in clear: off this machine, the study connects only to
a ``tls://`` scheduler, with mutual TLS (Dask's ``Security``, encryption required). The
certificate files come from ``--dask-security ca=FILE,cert=FILE,key=FILE`` (the flow's
``dask_security`` parameter), else from Dask's own config
(``distributed.comm.tls.ca-file``, ``distributed.comm.tls.client.cert`` and ``.key``; also
set by ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` and friends).

Only the standard library and pydantic at import time: `aemnist run` checks these before it
imports Dask.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

from deployments.auth import is_loopback
from deployments.stack import StackError

if TYPE_CHECKING:
    from distributed.security import Security

OPTION = "--dask-security"
# Dask's config keys for a client's TLS files.
CONFIG_KEYS = {
    "ca": "distributed.comm.tls.ca-file",
    "cert": "distributed.comm.tls.client.cert",
    "key": "distributed.comm.tls.client.key",
}


class DaskTLS(BaseModel):
    """A client's TLS files for a ``tls://`` Dask scheduler: the certificate authority that
    signed the cluster's certificates, and this client's certificate and key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: str
    cert_file: str
    key_file: str

    def security(self) -> Security:
        from distributed.security import Security

        return Security(
            tls_ca_file=self.ca_file,
            tls_client_cert=self.cert_file,
            tls_client_key=self.key_file,
            require_encryption=True,
        )


def parse_dask_security(text: str) -> DaskTLS:
    """``ca=FILE,cert=FILE,key=FILE`` (the option's value) as ``DaskTLS``."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in CONFIG_KEYS or not value.strip():
            raise StackError(
                f"{OPTION} {text!r} is not of the form ca=FILE,cert=FILE,key=FILE (the "
                f"cluster's certificate authority, this client's certificate and its key)"
            )
        fields[name.strip()] = str(Path(value.strip()).expanduser().resolve())
    missing = sorted(set(CONFIG_KEYS) - set(fields))
    if missing:
        raise StackError(f"{OPTION} lacks {', '.join(missing)}: give ca=FILE,cert=FILE,key=FILE")
    return DaskTLS(ca_file=fields["ca"], cert_file=fields["cert"], key_file=fields["key"])


def tls_from_dask_config() -> DaskTLS | None:
    """The client TLS files Dask's own config names, when it names all three."""
    import dask.config

    values = {name: dask.config.get(key, None) for name, key in CONFIG_KEYS.items()}
    if not all(values.values()):
        return None
    return DaskTLS(ca_file=values["ca"], cert_file=values["cert"], key_file=values["key"])


def check_dask_scheduler(address: str, tls: DaskTLS | None, prefect_api: str | None) -> None:
    """Everything about an existing cluster that can be known before any work: the address's
    form, encryption off this machine, the TLS files, a scheduler that answers (for TLS: a
    handshake that both sides accept), and a Prefect API its workers can reach."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname or not parsed.port:
        raise StackError(
            f"--dask-address {address!r} is not of the form tls://HOST:PORT (or "
            f"tcp://127.0.0.1:PORT for a cluster on this machine)"
        )
    host, port = parsed.hostname, parsed.port
    if parsed.scheme == "tcp":
        if tls is not None:
            raise StackError(
                f"{OPTION} was given but --dask-address {address} is plain tcp://: start the "
                f"scheduler with TLS and give its tls:// address"
            )
        if not is_loopback(host):
            raise StackError(
                f"refusing the unencrypted Dask scheduler {address}: any client that reaches "
                f"it can run code on its workers; start the scheduler and workers with "
                f"--tls-ca-file/--tls-cert/--tls-key and give tls://{host}:{port} with "
                f"{OPTION} ca=FILE,cert=FILE,key=FILE"
            )
    elif tls is None:
        raise StackError(
            f"the Dask scheduler {address} speaks TLS and no client certificate is "
            f"configured: give {OPTION} ca=FILE,cert=FILE,key=FILE, or set Dask's config "
            f"distributed.comm.tls.ca-file, .client.cert and .client.key"
        )
    try:
        connection = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        raise StackError(
            f"no Dask scheduler answers at {address} ({exc}): start one (`dask scheduler`, "
            f"then `dask worker {address}` on each machine) or drop --dask-address to run on a "
            f"local cluster"
        ) from None
    with connection:
        if tls is not None:
            _handshake(connection, address, tls)
    if not is_loopback(host) and not prefect_api:
        raise StackError(
            f"the Dask cluster at {address} runs tasks in processes that report to the Prefect "
            f"API: set PREFECT_API_URL to a server they all reach (`aemnist server --host "
            f"0.0.0.0 --auth` prints one), here and on every Dask worker"
        )


def _handshake(connection: socket.socket, address: str, tls: DaskTLS) -> None:
    """A TLS handshake with the scheduler, as Dask's client makes it: the cluster's CA,
    this client's certificate, no host-name check (Dask's own default)."""
    for name, path in (("ca", tls.ca_file), ("cert", tls.cert_file), ("key", tls.key_file)):
        if not Path(path).is_file():
            raise StackError(f"{OPTION}: the {name} file {path} does not exist")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
        context.check_hostname = False
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise StackError(
            f"{OPTION}: the TLS files cannot be used ({exc}): give the cluster's CA "
            f"certificate and this client's certificate and key, in PEM"
        ) from None
    try:
        with context.wrap_socket(connection) as wrapped:
            wrapped.do_handshake()
    except (ssl.SSLError, OSError) as exc:
        raise StackError(
            f"the TLS handshake with the Dask scheduler {address} failed ({exc}): check that "
            f"{OPTION} names the CA that signed the cluster's certificates and a client "
            f"certificate it accepts"
        ) from None
