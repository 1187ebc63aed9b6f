"""Where a study's stage data lives: the local work dir, or any fsspec URL (``s3://bucket/
prefix``) given as ``runtime.storage`` (`--storage`).

Paths stay paths: a local one is a ``pathlib.Path``, a URL a ``upath.UPath`` (the pathlib
API over fsspec), so the code that names a table, its hash record, a checkpoint or a figure
is the same for both; what differs (an atomic write, a read through pyarrow or torch) is
decided here. Credentials never appear in a URL or a config: fsspec's backends take them
from the usual environment (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for an S3-compatible service).

Atomicity on an object store: an object is written whole from a local temporary file in one
request (``put_file``), and an S3 PUT (or a multipart upload, on completion) becomes visible
whole or not at all: a writer killed mid-write leaves no object, never half of one.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from upath import UPath


class StorageError(RuntimeError):
    """The storage URL cannot be used (unknown protocol, no credentials, no bucket, no
    write): the message names it and the fix."""


def is_url(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def as_path(location: str | os.PathLike[str]) -> Path:
    """A path for ``location``: ``UPath`` for a URL (``s3://b/k``), ``Path`` otherwise; a
    path object is kept as it is."""
    if isinstance(location, Path):
        return location
    if is_url(location):
        from upath import UPath

        return UPath(str(location))
    return Path(location)


def is_remote(path: Path) -> bool:
    """Whether ``path`` lies in an fsspec store rather than on this machine's disk."""
    return getattr(path, "protocol", "") not in ("", "file", "local")


def fs_path(path: Path) -> tuple[Any, str]:
    """``path``'s fsspec file system and its path there (for pyarrow's ``filesystem=``)."""
    upath: UPath = path  # type: ignore[assignment]
    return upath.fs, upath.path


def put_whole(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` in an object store whole or not at all: ``write`` fills a local
    temporary file, which is sent in one request."""
    fs, key = fs_path(path)
    with tempfile.TemporaryDirectory(prefix="aemnist-put-") as folder:
        tmp = Path(folder) / f"{uuid.uuid4().hex}-{path.name}"
        write(tmp)
        fs.put_file(str(tmp), key)
    fs.invalidate_cache(key)


def describe_failure(url: str, exc: BaseException) -> str:
    """One line naming what is wrong with the store at ``url`` and how to fix it."""
    name = type(exc).__name__
    text = str(exc)
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        return (
            f"no credentials for the storage {url}: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of the run"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") or (
        "connect" in text.lower() and "endpoint" in text.lower()
    ):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the S3 endpoint"
        return (
            f"the storage {url} is unreachable ({endpoint} does not answer); check "
            f"AWS_ENDPOINT_URL and the network"
        )
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        return (
            f"the bucket {bucket!r} of the storage {url} does not exist; create it "
            f"(`aws s3 mb s3://{bucket}`) or name another"
        )
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return (
            f"the storage {url} refuses this run's writes ({name}); grant these credentials "
            f"write access (s3:PutObject, s3:DeleteObject) or name another location"
        )
    return f"the storage {url} cannot be used ({name}: {text}); check the URL and credentials"


def check_storage(url: str) -> None:
    """Fail before any training, in one line, when the store at ``url`` cannot hold the
    study: an unknown protocol or missing package, no credentials, an unreachable endpoint,
    a bucket that does not exist, or no right to write. Writes and removes one probe
    object; nothing already stored is touched."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        package = {"s3": "s3fs (pip install 'aemnist[s3]')", "gs": "gcsfs", "az": "adlfs"}
        hint = package.get(protocol, f"the fsspec package for {protocol}://")
        raise StorageError(
            f"the storage {url} needs {hint}, which is not installed ({exc})"
        ) from None
    path = as_path(url.rstrip("/"))
    probe = path / f".aemnist-probe-{uuid.uuid4().hex}"
    try:
        fs, key = fs_path(probe)
        # Listing the bucket raises what is wrong (exists() would answer False to all).
        fs.ls(key.split("/", 1)[0], refresh=True)
        fs.pipe_file(key, b"aemnist storage probe\n")
        fs.rm_file(key)
    except StorageError:
        raise
    except Exception as exc:  # botocore and aiohttp raise many types: each is described
        raise StorageError(describe_failure(url, exc)) from None
