"""MNIST: fetch the four IDX files, check them against their SHA-256 pins, store them as parquet.

Sources, in order of preference: a mirror given by the caller (a directory or a URL holding
the four files, gzip-compressed or raw), else torchvision's downloader and its public mirrors.
The decompressed payload of every file is checked against its pin before anything is written,
so a damaged or foreign file never reaches a table.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from aemnist.config import MIRROR_ENV
from aemnist.schemas import (
    N_PIXELS,
    TableError,
    TableRef,
    read_table,
    recorded_ref,
    table_footer,
    write_table,
)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class IdxFile:
    name: str
    n_bytes: int
    sha256: str


# Pins of the decompressed payloads (../shared/data/mnist/README.md): byte-identical to the
# originals, whatever gzip wrapper a mirror uses.
PINS: dict[str, IdxFile] = {
    f.name: f
    for f in (
        IdxFile(
            "train-images-idx3-ubyte",
            47040016,
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        IdxFile(
            "train-labels-idx1-ubyte",
            60008,
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        IdxFile(
            "t10k-images-idx3-ubyte",
            7840016,
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        IdxFile(
            "t10k-labels-idx1-ubyte",
            10008,
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    )
}
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_ROWS = {"train": 60000, "test": 10000}


class DataError(RuntimeError):
    """A data file that is missing, damaged or not what it should be; says which and how to fix."""


class MirrorUnreachable(DataError):
    """A network error while fetching: worth retrying, unlike a wrong file."""


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


def check_pin(payload: bytes, name: str, source: str) -> None:
    pin = PINS[name]
    digest = hashlib.sha256(payload).hexdigest()
    if digest != pin.sha256:
        raise DataError(
            f"{source}: wrong SHA-256 for the decompressed {name} (got {digest}, expected "
            f"{pin.sha256}, {pin.n_bytes} bytes; this one has {len(payload)}); the file is "
            f"damaged or not the original MNIST: replace it or point {MIRROR_ENV} / "
            f"--mnist-mirror at a good copy"
        )


def _decompress(raw: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{source}: not a complete gzip file ({exc}); it is truncated or damaged, "
            f"replace it with a good copy"
        ) from exc


def _read_from_dir(mirror: Path, name: str) -> tuple[bytes, str]:
    for candidate, packed in ((mirror / f"{name}.gz", True), (mirror / name, False)):
        if candidate.exists():
            raw = candidate.read_bytes()
            return (_decompress(raw, str(candidate)) if packed else raw), str(candidate)
    raise DataError(
        f"MNIST mirror {mirror} has no {name}.gz (nor {name}); point {MIRROR_ENV} or "
        f"--mnist-mirror at a folder holding the four MNIST files"
    )


def _read_from_url(mirror: str, name: str, timeout: float = 60.0) -> tuple[bytes, str]:
    base = mirror.rstrip("/")
    errors = []
    for url, packed in ((f"{base}/{name}.gz", True), (f"{base}/{name}", False)):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                raw = response.read()
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        return (_decompress(raw, url) if packed else raw), url
    raise MirrorUnreachable(
        f"MNIST mirror {mirror} did not serve {name}: {'; '.join(errors)}; check the URL "
        f"given by {MIRROR_ENV} or --mnist-mirror"
    )


def _read_with_torchvision(cache: Path) -> dict[str, tuple[bytes, str]]:
    from torchvision.datasets import MNIST

    try:
        MNIST(root=str(cache), train=True, download=True)
        MNIST(root=str(cache), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise MirrorUnreachable(
            f"could not download MNIST from torchvision's public mirrors ({exc}); without "
            f"internet, point {MIRROR_ENV} or --mnist-mirror at a folder holding the four "
            f"MNIST files (e.g. ../shared/data/mnist)"
        ) from exc
    raw_dir = cache / "MNIST" / "raw"
    return {name: ((raw_dir / name).read_bytes(), str(raw_dir / name)) for name in PINS}


def fetch_payloads(mirror: str | Path | None, cache: Path) -> dict[str, tuple[bytes, str]]:
    """The four decompressed, pin-checked payloads with where each came from."""
    if mirror is None or str(mirror) == "":
        payloads = _read_with_torchvision(cache)
    else:
        text = str(mirror)
        if "://" in text and not text.startswith("file://"):
            payloads = {name: _read_from_url(text, name) for name in PINS}
        else:
            folder = Path(text.removeprefix("file://")).expanduser()
            if not folder.is_dir():
                raise DataError(
                    f"MNIST mirror {folder} does not exist or is not a folder; point "
                    f"{MIRROR_ENV} or --mnist-mirror at the folder holding the four MNIST files"
                )
            payloads = {name: _read_from_dir(folder, name) for name in PINS}
    for name, (payload, source) in payloads.items():
        check_pin(payload, name, source)
    return payloads


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


def mnist_paths(data_dir: Path) -> dict[str, Path]:
    return {split: data_dir / f"mnist_{split}.parquet" for split in SPLITS}


def verified_tables(data_dir: Path) -> dict[str, TableRef] | None:
    """The existing MNIST tables if both are intact (their SHA-256 matches the record written
    beside them), have the mnist schema and row count, and were built from pinned files.

    Only the parquet footer is read: decoding 55 MB of pixels on every run cost a cached
    re-run about 1.5 s, and the recorded SHA-256 already catches any changed byte."""
    refs = {}
    for split, path in mnist_paths(data_dir).items():
        ref = recorded_ref(path)
        if ref is None:
            return None
        try:
            rows, meta = table_footer(path, "mnist")
        except TableError:
            return None
        names = SPLITS[split]
        if rows != SPLIT_ROWS[split] or any(
            meta.get(f"sha256.{n}") != PINS[n].sha256 for n in names
        ):
            return None
        refs[split] = TableRef(ref.path, ref.sha256, rows)
    return refs


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise DataError(
            f"work dir {folder} is not writable ({exc.strerror}); choose another with "
            f"--workdir or fix its permissions"
        ) from exc


def download_mnist(
    data_dir: Path, mirror: str | Path | None, force: bool = False
) -> tuple[dict[str, TableRef], bool]:
    """Write ``mnist_train.parquet`` and ``mnist_test.parquet``; return them and whether
    anything was fetched. With verified tables already present nothing is downloaded,
    unless ``force``."""
    existing = None if force else verified_tables(data_dir)
    if existing is not None:
        return existing, False
    ensure_writable(data_dir)
    cache = data_dir / "torchvision"
    payloads = fetch_payloads(mirror, cache)
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
    for split, path in mnist_paths(data_dir).items():
        meta = {f"sha256.{n}": PINS[n].sha256 for n in SPLITS[split]}
        refs[split] = write_table(tables[split], path, "mnist", metadata=meta)
    if cache.exists():
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
