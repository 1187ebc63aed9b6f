"""aemnist.data: IDX parsing, SHA-256 pins, the parquet tables, folds."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from aemnist.data import (
    MIRROR_ENV,
    PINS,
    DataError,
    check_pin,
    download_mnist,
    load_images,
    make_folds,
    mnist_paths,
    parse_idx,
)
from aemnist.schemas import TableRef, file_sha256, hash_record, read_table

# --- helpers ------------------------------------------------------------------------------


def idx_payload(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes holding ``array``."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def good_data_dir(tmp_path: Path, refs: dict[str, TableRef], drop: str = "test") -> Path:
    """A data dir holding copies of the good tables, less ``drop`` so a download must fetch."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split, ref in refs.items():
        if split != drop:
            shutil.copy2(ref.path, mnist_paths(data_dir)[split])
    return data_dir


def mirror_copy(tmp_path: Path, mirror: Path) -> Path:
    """A mirror folder whose four files link to the real ones (replace one to damage it)."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    for name in PINS:
        (folder / f"{name}.gz").symlink_to(mirror / f"{name}.gz")
    return folder


def assert_failed_cleanly(data_dir: Path, before: dict[str, str]) -> None:
    assert snapshot(data_dir) == before, "earlier tables changed or a partial/temp file was left"


# --- IDX parsing --------------------------------------------------------------------------


def test_parse_idx_reads_synthetic_images_and_labels() -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    labels = np.array([7, 0, 9], dtype=np.uint8)

    parsed_images = parse_idx(idx_payload(images), "imgs")
    parsed_labels = parse_idx(idx_payload(labels), "lbls")

    assert parsed_images.shape == (3, 28, 28)
    assert parsed_images.dtype == np.uint8
    np.testing.assert_array_equal(parsed_images, images.astype(np.uint8))
    assert parsed_labels.shape == (3,)
    np.testing.assert_array_equal(parsed_labels, labels)


@pytest.mark.parametrize("magic", [b"\x00\x00\x08\x02", b"\x00\x00\x09\x01", b"\x01\x00\x08\x01"])
def test_parse_idx_rejects_wrong_magic_naming_the_file(magic: bytes) -> None:
    payload = magic + idx_payload(np.zeros(4, dtype=np.uint8))[4:]
    with pytest.raises(DataError, match="bad-labels-file"):
        parse_idx(payload, "bad-labels-file")


@pytest.mark.parametrize("cut", [1, 100, 3 * 784 - 1])
def test_parse_idx_rejects_truncated_payload_naming_the_file(cut: int) -> None:
    payload = idx_payload(np.ones((3, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="cut-images-file.*truncated"):
        parse_idx(payload[:-cut], "cut-images-file")


@pytest.mark.parametrize("size", [0, 3, 10])
def test_parse_idx_rejects_payload_cut_inside_its_header(size: int) -> None:
    payload = idx_payload(np.ones((3, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="short-file"):
        parse_idx(payload[:size], "short-file")


# --- SHA-256 pins -------------------------------------------------------------------------


def test_check_pin_accepts_the_original_and_rejects_a_payload_with_one_byte_changed(
    mnist_mirror: Path,
) -> None:
    name = "t10k-labels-idx1-ubyte"
    payload = gzip.decompress((mnist_mirror / f"{name}.gz").read_bytes())
    check_pin(payload, name, f"/somewhere/{name}.gz")  # the original passes

    damaged = bytearray(payload)
    damaged[5000] ^= 0x01
    with pytest.raises(DataError) as excinfo:
        check_pin(bytes(damaged), name, f"/somewhere/{name}.gz")
    message = str(excinfo.value)
    assert f"/somewhere/{name}.gz" in message
    assert "SHA-256" in message
    assert "replace it" in message and MIRROR_ENV in message


# --- the parquet tables from the real mirror ----------------------------------------------


def test_download_writes_tables_with_the_mnist_rows_and_labels(
    mnist_tables: dict[str, TableRef],
) -> None:
    train = read_table(mnist_tables["train"].path, "mnist")
    test = read_table(mnist_tables["test"].path, "mnist")

    assert train.num_rows == 60000 and mnist_tables["train"].rows == 60000
    assert test.num_rows == 10000 and mnist_tables["test"].rows == 10000
    assert train.column("label").to_pylist()[:10] == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.column("label").to_pylist()[:10] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train.column("idx").to_pylist()[:3] == [0, 1, 2]
    assert hashlib.sha256(Path(mnist_tables["train"].path).read_bytes()).hexdigest() == (
        mnist_tables["train"].sha256
    )


def test_load_images_gives_the_known_training_pixel_mean_and_std(
    mnist_tables: dict[str, TableRef],
) -> None:
    train = load_images(mnist_tables["train"].path)

    assert train.images.shape == (60000, 1, 28, 28)
    assert train.images.min() >= 0.0 and train.images.max() <= 1.0
    pixels = train.images.double()
    assert pixels.mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert pixels.std().item() == pytest.approx(0.3081, abs=1e-4)
    assert list(train.labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    np.testing.assert_array_equal(train.idx[:5], np.arange(5))


def test_load_images_with_a_limit_reads_the_first_rows(mnist_tables: dict[str, TableRef]) -> None:
    head = load_images(mnist_tables["test"].path, limit=10)

    assert len(head) == 10
    assert list(head.labels) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_second_download_with_verified_tables_fetches_nothing(
    mnist_tables: dict[str, TableRef], tmp_path: Path
) -> None:
    data_dir = Path(mnist_tables["train"].path).parent
    mtimes = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}

    refs, fetched = download_mnist(data_dir, tmp_path / "no-such-mirror")

    assert fetched is False
    assert refs == mnist_tables
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == mtimes


@pytest.mark.parametrize("damage", ["one byte changed", "hash record removed"])
def test_a_table_that_no_longer_matches_its_recorded_hash_is_fetched_again(
    mnist_tables: dict[str, TableRef], mnist_mirror: Path, tmp_path: Path, damage: str
) -> None:
    # Only the footer of a verified table is read: the recorded SHA-256 must catch the rest.
    data_dir = tmp_path / "data"
    shutil.copytree(Path(mnist_tables["train"].path).parent, data_dir)
    train = mnist_paths(data_dir)["train"]
    if damage == "one byte changed":
        raw = bytearray(train.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # inside a data page: the footer still reads
        train.write_bytes(bytes(raw))
    else:
        hash_record(train).unlink()

    refs, fetched = download_mnist(data_dir, mnist_mirror)

    assert fetched is True
    assert refs["train"].sha256 == mnist_tables["train"].sha256 == file_sha256(train)


# --- bad input leaves earlier tables alone ------------------------------------------------


def test_missing_mirror_folder_fails_naming_it_and_leaves_earlier_tables(
    mnist_tables: dict[str, TableRef], tmp_path: Path
) -> None:
    data_dir = good_data_dir(tmp_path, mnist_tables)
    before = snapshot(data_dir)
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError, match=f"{re.escape(str(missing))}.*{MIRROR_ENV}"):
        download_mnist(data_dir, missing)

    assert_failed_cleanly(data_dir, before)


def test_mirror_with_a_truncated_gz_fails_naming_it_and_leaves_earlier_tables(
    mnist_tables: dict[str, TableRef], mnist_mirror: Path, tmp_path: Path
) -> None:
    data_dir = good_data_dir(tmp_path, mnist_tables)
    before = snapshot(data_dir)
    mirror = mirror_copy(tmp_path, mnist_mirror)
    damaged = mirror / "t10k-images-idx3-ubyte.gz"
    raw = damaged.read_bytes()
    damaged.unlink()
    damaged.write_bytes(raw[: len(raw) // 2])

    with pytest.raises(DataError, match=f"{re.escape(str(damaged))}.*truncated"):
        download_mnist(data_dir, mirror)

    assert_failed_cleanly(data_dir, before)


def test_mirror_with_a_wrong_hash_file_fails_naming_it_and_leaves_earlier_tables(
    mnist_tables: dict[str, TableRef], mnist_mirror: Path, tmp_path: Path
) -> None:
    data_dir = good_data_dir(tmp_path, mnist_tables, drop="train")
    before = snapshot(data_dir)
    mirror = mirror_copy(tmp_path, mnist_mirror)
    damaged = mirror / "train-labels-idx1-ubyte.gz"
    payload = bytearray(gzip.decompress(damaged.read_bytes()))
    payload[1000] = (payload[1000] + 1) % 10  # a well-formed IDX file with one label changed
    damaged.unlink()
    damaged.write_bytes(gzip.compress(bytes(payload)))

    with pytest.raises(DataError, match=f"{re.escape(str(damaged))}.*SHA-256"):
        download_mnist(data_dir, mirror)

    assert_failed_cleanly(data_dir, before)


def test_unwritable_data_dir_under_a_regular_file_fails_with_a_data_error(
    mnist_mirror: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder\n")
    data_dir = blocker / "data"

    with pytest.raises(DataError, match=f"{re.escape(str(data_dir))}.*not writable"):
        download_mnist(data_dir, mnist_mirror)

    assert blocker.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_read_only_data_dir_fails_with_a_data_error_and_leaves_earlier_tables(
    mnist_tables: dict[str, TableRef], mnist_mirror: Path, tmp_path: Path
) -> None:
    # A read-only bind mount, not chmod: root (these tests' user here and in CI) writes
    # through permission bits but not onto a read-only file system. Mounting needs root.
    data_dir = good_data_dir(tmp_path, mnist_tables)
    before = snapshot(data_dir)
    subprocess.run(["mount", "--bind", str(data_dir), str(data_dir)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(data_dir)], check=True)
        with pytest.raises(
            DataError, match=f"{re.escape(str(data_dir))} is not writable \\(Read-only file"
        ):
            download_mnist(data_dir, mnist_mirror)
    finally:
        subprocess.run(["umount", str(data_dir)], check=True)

    assert_failed_cleanly(data_dir, before)


# --- folds --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_labels(mnist_tables: dict[str, TableRef]) -> tuple[np.ndarray, np.ndarray]:
    table = read_table(mnist_tables["train"].path, "mnist").select(["idx", "label"])
    return table.column("idx").to_numpy(), table.column("label").to_numpy().astype(np.int64)


def test_make_folds_assigns_every_idx_exactly_once(train_labels) -> None:
    idx, labels = train_labels
    folds = make_folds(idx, labels, k=3, seed=0)

    assert len(folds) == len(idx)
    assert sorted(folds["idx"]) == sorted(idx.tolist())
    assert folds["idx"].is_unique
    assert set(folds["fold"]) == {0, 1, 2}
    counts = folds["fold"].value_counts()
    assert counts.max() - counts.min() <= 10  # near-equal fold sizes


def test_make_folds_is_stratified_within_one_percent(train_labels) -> None:
    idx, labels = train_labels
    folds = make_folds(idx, labels, k=3, seed=0)
    whole = np.bincount(labels, minlength=10) / len(labels)

    label_of = dict(zip(idx.tolist(), labels.tolist(), strict=True))
    for f in range(3):
        fold_labels = np.array([label_of[i] for i in folds.loc[folds["fold"] == f, "idx"]])
        share = np.bincount(fold_labels, minlength=10) / len(fold_labels)
        assert np.abs(share - whole).max() < 0.01, f"fold {f} label shares {share} vs {whole}"


def test_make_folds_is_seeded(train_labels) -> None:
    idx, labels = train_labels

    first = make_folds(idx, labels, k=3, seed=7)
    again = make_folds(idx, labels, k=3, seed=7)
    other = make_folds(idx, labels, k=3, seed=8)

    assert first.equals(again)
    assert not first["fold"].equals(other["fold"])
