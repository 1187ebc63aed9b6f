"""MNIST (or Fashion-MNIST, KMNIST): fetch the four IDX files, check them against their pins
(aemnist.datasets), store them as parquet.

Sources, in order of preference: a mirror given by the caller (a directory or a URL holding
the four files, gzip-compressed or raw), else torchvision's downloader and its public mirrors.
The decompressed payload of every file is checked against its pin before anything is written,
so a damaged or foreign file never reaches a table.

A mirror URL is file, http or https; each file is read in chunks and refused past
MAX_DOWNLOAD_BYTES (compressed) or its pinned size (decompressed). A URL's user and password
go out as HTTP basic authentication; wherever a mirror is recorded, logged or put in an
error it is redacted first (``redact_url``).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import os
import shutil
import socket
import ssl
import struct
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import pandas as pd
import pyarrow as pa

from aemnist.config import MIRROR_ENV
from aemnist.datasets import (
    DATASETS,
    DEFAULT_DATASET,
    SPLITS,
    DatasetSpec,
    IdxFile,
    dataset_spec,
    identify,
)
from aemnist.schemas import (
    N_PIXELS,
    TableError,
    TableRef,
    read_table,
    recorded_ref,
    table_footer,
    write_table,
)
from aemnist.storage import is_remote

if TYPE_CHECKING:
    import torch


# MNIST's pins (aemnist.datasets holds every dataset's): the SHA-256 of the decompressed
# payloads (../shared/data/mnist/README.md), byte-identical to the originals whatever gzip
# wrapper a mirror uses.
PINS: dict[str, IdxFile] = DATASETS[DEFAULT_DATASET].files
SPLIT_ROWS = {"train": 60000, "test": 10000}


class DataError(RuntimeError):
    """A data file that is missing, damaged or not what it should be; says which and how to fix."""


class MirrorUnreachable(DataError):
    """A transient network error while fetching (a 503, a timeout, a reset connection): worth
    retrying, unlike a wrong file, a refused connection or an unknown host."""


# --- mirror URLs: which are allowed, and how they are shown -----------------------------------

ALLOWED_SCHEMES = ("file", "http", "https")
# Shown in place of a URL's user, password, query string and fragment.
REDACTED = "***"
# The most one file may be, compressed or raw: the largest MNIST file is 9.9 MB gzipped and
# 45 MB raw. A mirror serving more (an endless stream) is cut off there.
MAX_DOWNLOAD_BYTES = 64 * 2**20
# The longest one file's download may take, however slowly its bytes trickle in.
DOWNLOAD_DEADLINE_S = 900.0
# HTTP statuses worth a retry: the server is busy or briefly down, not wrong.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK = 2**20


def redact_url(url: str | Path) -> str:
    """``url`` without its user, password, query string and fragment (each shown as ``***``):
    the one form in which a mirror is recorded, logged or put in an error. A folder path, or a
    URL without any of them, comes back as it is."""
    text = str(url)
    if "://" not in text:
        return text
    scheme = text.split("://", 1)[0]
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a malformed netloc, e.g. a password holding "/"
    except ValueError:
        return f"{scheme}://{REDACTED}"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = REDACTED if parts.query else ""
    fragment = REDACTED if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def has_secrets(url: str | Path | None) -> bool:
    """Whether ``url`` names something ``redact_url`` hides (credentials, a query string)."""
    return url is not None and redact_url(url) != str(url)


def check_mirror(mirror: str | Path, title: str = "MNIST") -> None:
    """Refuse a mirror URL of a scheme other than file, http and https, or without a host;
    a folder path passes (its existence is checked when the download reads it). ``title``:
    the dataset's, as the messages name the mirror."""
    text = str(mirror)
    if "://" not in text:
        return
    shown = redact_url(text)
    scheme = text.split("://", 1)[0].lower()
    if scheme not in ALLOWED_SCHEMES:
        raise DataError(
            f"{title} mirror {shown}: {scheme}:// URLs are not supported; give a folder or a "
            f"{', '.join(s + '://' for s in ALLOWED_SCHEMES)} URL to --mnist-mirror or "
            f"{MIRROR_ENV}"
        )
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise DataError(
            f"{title} mirror {shown} is not a valid URL; check --mnist-mirror or {MIRROR_ENV}"
        ) from None
    if scheme == "file" and parts.netloc not in ("", "localhost"):
        raise DataError(
            f"{title} mirror {shown}: a file URL names a folder on this machine "
            f"(file:///path/to/folder); check --mnist-mirror or {MIRROR_ENV}"
        )
    if scheme != "file" and not parts.hostname:
        raise DataError(
            f"{title} mirror {shown} names no host; check --mnist-mirror or {MIRROR_ENV}"
        )


def flow_mirror_parameter(mirror: str | None) -> str | None:
    """What `aemnist run` passes as the flow's ``mnist_mirror``: Prefect records a flow's
    parameters, so a mirror URL that carries credentials or a query string goes through this
    process's ``AEMNIST_MNIST_MIRROR`` instead (the flow falls back to it, and the processes
    this one starts inherit it)."""
    if mirror and has_secrets(mirror):
        os.environ[MIRROR_ENV] = mirror
        return None
    return mirror


def mirror_to_fetch(shown: str | None) -> str | None:
    """The mirror a download fetches from, given the one its job records: a redacted URL is
    the credentialed one in this process's ``AEMNIST_MNIST_MIRROR``."""
    if not shown or has_secrets(shown) or REDACTED not in shown:
        return shown
    configured = os.environ.get(MIRROR_ENV)
    if configured and redact_url(configured) == shown:
        return configured
    raise DataError(
        f"MNIST mirror {shown}: its credentials are not in this process's {MIRROR_ENV}; set "
        f"{MIRROR_ENV} to the full URL in the environment of every process that runs the "
        f"download task (a Prefect worker's, a Dask worker's)"
    )


def parse_idx(payload: bytes, name: str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (the only type MNIST uses) into an array."""
    if len(payload) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(payload)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", payload[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(
            f"{name}: wrong IDX header (magic {payload[:4].hex()}, expected 00000801 for "
            f"labels or 00000803 for images); the file is not an MNIST IDX file, replace it "
            f"with the original"
        )
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise DataError(f"{name}: IDX header cut short; the file is truncated, fetch it again")
    dims = struct.unpack(f">{ndim}I", payload[4:header])
    expected = int(np.prod(dims))
    if len(payload) - header != expected:
        raise DataError(
            f"{name}: IDX header declares dims {dims} ({expected} bytes of data) but the file "
            f"holds {len(payload) - header}; the file is truncated or damaged, fetch it again"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims)


def _fix(spec: DatasetSpec) -> str:
    return (
        f"replace it or point {MIRROR_ENV} / --mnist-mirror at a folder holding "
        f"{spec.title}'s four files"
    )


def check_pin(payload: bytes, name: str, source: str, dataset: str = DEFAULT_DATASET) -> None:
    """Refuse a decompressed payload whose SHA-256 is not the pinned one, naming the
    dataset it is when it is another's."""
    spec = dataset_spec(dataset)
    pin = spec.files[name]
    digest = hashlib.sha256(payload).hexdigest()
    if digest != pin.sha256:
        _refuse_foreign(spec, name, source, identify(sha256=digest))
        raise DataError(
            f"{source}: wrong SHA-256 for the decompressed {name} (got {digest}, expected "
            f"{pin.sha256}, {pin.n_bytes} bytes; this one has {len(payload)}); the file is "
            f"damaged or not the original {spec.title}: {_fix(spec)}"
        )


def _refuse_foreign(
    spec: DatasetSpec, name: str, source: str, found: tuple[str, str] | None
) -> None:
    """Raise when a file is pinned as another dataset's (``found``: which, by
    aemnist.datasets.identify): the mirror holds that dataset, not the one the study uses."""
    if found is None or found[0] == spec.name:
        return
    other = DATASETS[found[0]]
    raise DataError(
        f"{source}: this is {other.title}'s {found[1]}, not {spec.title}'s {name}: the mirror "
        f"holds {other.title}, and the study uses {spec.title} (data.dataset = "
        f"{spec.name!r}); point {MIRROR_ENV} / --mnist-mirror at {spec.title}'s files, or "
        f"run with --dataset {other.name}"
    )


def verified_payload(spec: DatasetSpec, name: str, raw: bytes, packed: bool, source: str) -> bytes:
    """The decompressed payload of one file as read (``packed``: gzip-compressed), checked
    against its pin: the payload's SHA-256 where the dataset pins it, else the ``.gz``
    file's published MD5. Another dataset's file is refused naming both datasets."""
    pin = spec.files[name]
    if packed:
        md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if md5 != pin.gz_md5:
            _refuse_foreign(spec, name, source, identify(gz_md5=md5))
        elif pin.sha256 is None:
            return _decompress(raw, source, name, spec)
        # A dataset pinned by SHA-256 (MNIST) is checked on its payload, whatever its .gz.
        payload = _decompress(raw, source, name, spec)
    else:
        payload = raw
    if pin.sha256 is not None:
        check_pin(payload, name, source, spec.name)
        return payload
    _refuse_foreign(spec, name, source, identify(sha256=hashlib.sha256(payload).hexdigest()))
    if not packed:
        raise DataError(
            f"{source}: {spec.title}'s files are pinned by the MD5 of their published .gz "
            f"files, so an uncompressed {name} cannot be verified; give the mirror the four "
            f"original .gz files ({name}.gz, ...)"
        )
    raise DataError(
        f"{source}: wrong MD5 for {name}.gz (got {md5}, expected {pin.gz_md5}, the published "
        f"{spec.title} file); the file is damaged or not the original {spec.title}: "
        f"{_fix(spec)}"
    )


def _decompress(raw: bytes, source: str, name: str, spec: DatasetSpec | None = None) -> bytes:
    """The payload of a gzip file, stopped one byte past the pinned size: a gzip bomb (a few
    MB that inflate to gigabytes) is refused before it fills the memory."""
    spec = spec or DATASETS[DEFAULT_DATASET]
    limit = spec.files[name].n_bytes
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as packed:
            payload = packed.read(limit + 1)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{source}: not a complete gzip file ({exc}); it is truncated or damaged, "
            f"replace it with a good copy"
        ) from exc
    if len(payload) > limit:
        raise DataError(
            f"{source}: decompresses to more than the {limit} bytes of the original {name}; "
            f"it is not the original {spec.title} file: {_fix(spec)}"
        )
    return payload


def _too_large(source: str, limit: int) -> DataError:
    return DataError(
        f"{source}: more than {limit // 2**20} MB, far more than any MNIST file (at most "
        f"45 MB); the mirror serves something else or an endless stream: check it"
    )


def _read_capped(
    read: Callable[[int], bytes], source: str, limit: int, deadline: float | None = None
) -> bytes:
    """Everything ``read`` gives, chunk by chunk, refusing more than ``limit`` bytes or, with
    a ``deadline`` (a time.monotonic), a transfer that outlasts it."""
    chunks: list[bytes] = []
    total = 0
    while chunk := read(min(_CHUNK, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise _too_large(source, limit)
        if deadline is not None and time.monotonic() > deadline:
            raise DataError(
                f"{source}: still downloading after {DOWNLOAD_DEADLINE_S:.0f} s ({total} bytes "
                f"so far); the mirror is too slow or serves an endless stream: use another"
            )
    return b"".join(chunks)


# One file as read from a mirror: its bytes, whether they are gzip-compressed, where from.
Read = tuple[bytes, bool, str]


def _read_from_dir(mirror: Path, name: str, limit: int, title: str = "MNIST") -> Read:
    for candidate, packed in ((mirror / f"{name}.gz", True), (mirror / name, False)):
        if candidate.exists():
            with open(candidate, "rb") as fh:
                raw = _read_capped(fh.read, str(candidate), limit)
            return raw, packed, str(candidate)
    raise DataError(
        f"{title} mirror {mirror} has no {name}.gz (nor {name}); point {MIRROR_ENV} or "
        f"--mnist-mirror at a folder holding the four {title} files"
    )


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow a mirror's redirects to http(s) URLs only (urllib would follow one to ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise DataError(
                f"{redact_url(req.full_url)} redirects to {redact_url(newurl)}: only http and "
                f"https redirects are followed; point --mnist-mirror or {MIRROR_ENV} at the "
                f"files themselves"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_Redirects)


def _request(url: str) -> urllib.request.Request:
    """A GET of ``url``, its user and password (if any) sent as HTTP basic authentication
    (urllib would take them for part of the host name), and not on to a redirect's host."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return urllib.request.Request(url)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(bare)
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    token = base64.b64encode(credentials.encode()).decode("ascii")
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def _is_transient(reason: object) -> bool:
    """Whether a network error is worth a retry. A refused connection (nothing listens
    there), an unknown host or a certificate that does not verify will be the same in a
    minute; a timeout, a reset connection or a name server's hiccup may not."""
    if isinstance(reason, (ConnectionRefusedError, ssl.SSLCertVerificationError)):
        return False
    if isinstance(reason, socket.gaierror):
        return reason.errno == socket.EAI_AGAIN
    return isinstance(reason, (OSError, http.client.HTTPException))


def _describe(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _fetch_url(url: str, shown: str, timeout: float, limit: int) -> bytes:
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    with _OPENER.open(_request(url), timeout=timeout) as response:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(shown, limit)
        # read1: whatever has arrived, so that the deadline holds against a trickle.
        return _read_capped(response.read1, shown, limit, deadline)


def _file_url(base: str, name: str) -> str:
    """``name`` in the mirror's folder, keeping its query string (a signed URL's)."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}", fragment=""))


def _read_from_url(
    mirror: str,
    name: str,
    timeout: float = 60.0,
    limit: int = MAX_DOWNLOAD_BYTES,
    title: str = "MNIST",
) -> Read:
    """One file from a mirror URL, gzipped or raw. Raises MirrorUnreachable (retried) when
    a transient error stopped it, DataError when the mirror is wrong or refuses."""
    errors = []
    transient = False
    for url, packed in ((_file_url(mirror, f"{name}.gz"), True), (_file_url(mirror, name), False)):
        shown = redact_url(url)
        try:
            raw = _fetch_url(url, shown, timeout, limit)
        except urllib.error.HTTPError as exc:
            exc.close()
            transient |= exc.code in TRANSIENT_HTTP
            errors.append(f"{shown}: HTTP {exc.code} {exc.reason}")
            continue
        except urllib.error.URLError as exc:  # could not connect: the same for both names
            transient |= _is_transient(exc.reason)
            errors.append(f"{shown}: {_describe(exc.reason)}")
            break
        except (OSError, http.client.HTTPException) as exc:  # cut off while reading
            transient |= _is_transient(exc)
            errors.append(f"{shown}: {_describe(exc)}")
            continue
        return raw, packed, shown
    error = MirrorUnreachable if transient else DataError
    raise error(
        f"{title} mirror {redact_url(mirror)} did not serve {name} ({'; '.join(errors)}); "
        f"check the URL given by {MIRROR_ENV} or --mnist-mirror"
        + ("; retrying" if transient else "")
    )


def _read_with_torchvision(cache: Path, spec: DatasetSpec) -> dict[str, Read]:
    import torchvision.datasets

    downloader = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        downloader(root=str(cache), train=True, download=True)
        downloader(root=str(cache), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise MirrorUnreachable(
            f"could not download {spec.title} from torchvision's public mirrors ({exc}); "
            f"without internet, point {MIRROR_ENV} or --mnist-mirror at a folder holding the "
            f"four {spec.title} files"
            + (" (e.g. ../shared/data/mnist)" if spec.name == DEFAULT_DATASET else "")
        ) from exc
    raw_dir = cache / spec.torchvision_class / "raw"
    # torchvision keeps each .gz beside what it extracted: a dataset pinned by its .gz's
    # MD5 is checked on that, MNIST on the payload.
    packed = not spec.checked_by_payload
    return {
        name: (path.read_bytes(), packed, str(path))
        for name in spec.files
        for path in [raw_dir / (f"{name}.gz" if packed else name)]
    }


def fetch_payloads(
    mirror: str | Path | None,
    cache: Path,
    limit: int = MAX_DOWNLOAD_BYTES,
    dataset: str = DEFAULT_DATASET,
) -> dict[str, tuple[bytes, str]]:
    """The four decompressed, pin-checked payloads of ``dataset`` with where each came from
    (a URL redacted). A mirror is a folder or a file, http or https URL; each file is read in
    chunks and refused past ``limit`` bytes."""
    spec = dataset_spec(dataset)
    title = spec.title
    if mirror is None or str(mirror) == "":
        reads = _read_with_torchvision(cache, spec)
    else:
        text = str(mirror)
        check_mirror(text, title)
        if "://" in text and not text.lower().startswith("file://"):
            reads = {
                name: _read_from_url(text, name, limit=limit, title=title) for name in spec.files
            }
        else:
            if "://" in text:
                folder = Path(unquote(urlsplit(text).path))
            else:
                folder = Path(text).expanduser()
            if not folder.is_dir():
                raise DataError(
                    f"{title} mirror {folder} does not exist or is not a folder; point "
                    f"{MIRROR_ENV} or --mnist-mirror at the folder holding the four {title} "
                    f"files"
                )
            reads = {name: _read_from_dir(folder, name, limit, title) for name in spec.files}
    return {
        name: (verified_payload(spec, name, raw, packed, source), source)
        for name, (raw, packed, source) in reads.items()
    }


def mnist_frame(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    n = images.shape[0]
    if labels.shape[0] != n:
        raise DataError(f"image and label counts differ ({n} against {labels.shape[0]})")
    flat = pa.array(images.reshape(-1), type=pa.uint8())
    pixels = pa.FixedSizeListArray.from_arrays(flat, N_PIXELS)
    return pa.table(
        {
            "idx": pa.array(np.arange(n, dtype=np.int32)),
            "label": pa.array(labels.astype(np.uint8)),
            "pixels": pixels,
        }
    )


def mnist_paths(data_dir: Path, dataset: str = DEFAULT_DATASET) -> dict[str, Path]:
    """The tables of ``dataset`` in ``data_dir``: ``mnist_train.parquet``, ...,
    ``fashion-mnist_train.parquet``: each named after its dataset, in MLflow too."""
    return {split: data_dir / f"{dataset}_{split}.parquet" for split in SPLITS}


def verified_tables(data_dir: Path, dataset: str = DEFAULT_DATASET) -> dict[str, TableRef] | None:
    """The existing tables of ``dataset`` if both are intact (their SHA-256 matches the record
    written beside them), have the mnist schema and the dataset's row count, and were built
    from its pinned files.

    Only the parquet footer is read: decoding 55 MB of pixels on every run cost a cached
    re-run about 1.5 s, and the recorded SHA-256 already catches any changed byte."""
    spec = dataset_spec(dataset)
    refs = {}
    for split, path in mnist_paths(data_dir, dataset).items():
        ref = recorded_ref(path)
        if ref is None:
            return None
        try:
            rows, meta = table_footer(path, "mnist")
        except TableError:
            return None
        pins = spec.table_metadata(split)
        if rows != spec.rows[split] or any(meta.get(k) != v for k, v in pins.items()):
            return None
        refs[split] = TableRef(ref.path, ref.sha256, rows)
    return refs


def ensure_writable(folder: Path) -> None:
    try:
        # 0700 when created: a work dir's tables, checkpoints and cache are its user's alone.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise DataError(
            f"work dir {folder} is not writable ({exc.strerror}); choose another with "
            f"--workdir or fix its permissions"
        ) from exc


def download_mnist(
    data_dir: Path,
    mirror: str | Path | None,
    force: bool = False,
    dataset: str = DEFAULT_DATASET,
) -> tuple[dict[str, TableRef], bool]:
    """Write ``mnist_train.parquet`` and ``mnist_test.parquet`` (``<dataset>_train.parquet``,
    ...: MNIST, Fashion-MNIST or KMNIST); return them and whether anything was fetched. With
    verified tables already present nothing is downloaded, unless ``force``."""
    spec = dataset_spec(dataset)
    existing = None if force else verified_tables(data_dir, dataset)
    if existing is not None:
        return existing, False
    if is_remote(data_dir):
        # torchvision downloads to a folder on this disk; the tables go to the store.
        with tempfile.TemporaryDirectory(prefix="aemnist-download-") as folder:
            payloads = fetch_payloads(mirror, Path(folder) / "torchvision", dataset=dataset)
    else:
        ensure_writable(data_dir)
        cache = data_dir / "torchvision"
        payloads = fetch_payloads(mirror, cache, dataset=dataset)
    # Parse everything before writing anything: a bad file leaves earlier tables untouched.
    tables = {}
    for split, (images_name, labels_name) in SPLITS.items():
        images = parse_idx(payloads[images_name][0], payloads[images_name][1])
        labels = parse_idx(payloads[labels_name][0], payloads[labels_name][1])
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1:
            raise DataError(
                f"{payloads[images_name][1]}: expected 28x28 images and 1-d labels, found "
                f"{images.shape} and {labels.shape}"
            )
        tables[split] = mnist_frame(images, labels)
    refs = {}
    for split, path in mnist_paths(data_dir, dataset).items():
        meta = spec.table_metadata(split)
        refs[split] = write_table(tables[split], path, "mnist", metadata=meta)
    if not is_remote(data_dir) and cache.exists():
        shutil.rmtree(cache, ignore_errors=True)
    return refs, True


@dataclass
class ImageSet:
    """Images as float32 in [0, 1], shape (N, 1, 28, 28), with their labels and MNIST indices."""

    images: torch.Tensor
    labels: np.ndarray
    idx: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_images(path: Path | str, limit: int = 0) -> ImageSet:
    table = read_table(path, "mnist")
    if limit:
        table = table.slice(0, limit)
    # torch and sklearn are imported where used: the command line imports this module and
    # should answer (an error, --help) in a second, not after loading both.
    import torch

    pixels = table.column("pixels").combine_chunks().values.to_numpy(zero_copy_only=False)
    images = torch.from_numpy(pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    return ImageSet(
        images=images,
        labels=table.column("label").to_numpy().astype(np.int64),
        idx=table.column("idx").to_numpy().astype(np.int64),
    )


def make_folds(idx: np.ndarray, labels: np.ndarray, k: int, seed: int) -> pd.DataFrame:
    """A seeded, stratified k-fold assignment: each image's validation fold."""
    from sklearn.model_selection import StratifiedKFold

    fold = np.empty(len(idx), dtype=np.int32)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, val) in enumerate(splitter.split(np.zeros(len(idx)), labels)):
        fold[val] = f
    return pd.DataFrame({"idx": idx.astype(np.int32), "fold": fold})


def holdout_mask(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded, stratified choice of ``n`` images to hold out for validation (True)."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    _, held = train_test_split(positions, test_size=n, stratify=labels, random_state=seed)
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask
