"""aemnist.schemas: atomic, schema-checked parquet tables."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aemnist.schemas import (
    SCHEMAS,
    TableError,
    atomic_write_bytes,
    read_frame,
    read_table,
    table_footer,
    write_table,
)


def grid_history() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "lr": [0.01, 0.01],
            "weight_decay": [5e-6, 5e-6],
            "fold": [2, 2],
            "epoch": [1, 2],
            "train_loss": [0.05, 0.03],
            "val_loss": [0.06, 0.04],
            "output_spread": [0.4, 0.7],
            "black_ratio": [0.5, 0.3],
        }
    )


def test_write_then_read_round_trips_values_and_schema(tmp_path: Path) -> None:
    frame = grid_history()
    path = tmp_path / "history.parquet"

    ref = write_table(frame, path, "grid_history", metadata={"note": "x"})

    assert ref.path == str(path)
    assert ref.rows == 2
    assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    table = read_table(path, "grid_history")
    assert table.schema.remove_metadata().equals(SCHEMAS["grid_history"])
    pd.testing.assert_frame_equal(read_frame(path, "grid_history"), frame, check_dtype=False)
    assert table_footer(path, "grid_history")[1] == {"schema": "grid_history", "note": "x"}


def test_write_casts_columns_to_the_declared_types_and_order(tmp_path: Path) -> None:
    frame = pd.DataFrame({"fold": [0, 1, 2], "idx": [10, 11, 12], "extra": ["a", "b", "c"]})
    path = tmp_path / "folds.parquet"

    write_table(frame, path, "folds")

    table = read_table(path, "folds")
    assert table.column_names == ["idx", "fold"]
    assert table.schema.field("idx").type == pa.int32()


def test_write_with_a_missing_column_raises_table_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="fold"):
        write_table(pd.DataFrame({"idx": [1]}), tmp_path / "folds.parquet", "folds")
    assert list(tmp_path.iterdir()) == []


def test_reading_a_table_of_another_schema_raises_table_error_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "folds.parquet"
    write_table(pd.DataFrame({"idx": [1, 2], "fold": [0, 1]}), path, "folds")

    with pytest.raises(TableError, match=re.escape(str(path)) + ".*grid_history"):
        read_table(path, "grid_history")


def test_reading_a_table_with_a_wrong_column_type_raises_table_error_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "folds.parquet"
    wide_idx = pa.table({"idx": pa.array([1], pa.int64()), "fold": pa.array([0], pa.int32())})
    pq.write_table(wide_idx, path)

    with pytest.raises(TableError, match=re.escape(str(path))):
        read_table(path, "folds")


def test_reading_a_truncated_parquet_raises_table_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "history.parquet"
    write_table(grid_history(), path, "grid_history")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])

    with pytest.raises(TableError, match=re.escape(str(path)) + ".*damaged"):
        read_table(path, "grid_history")


def test_table_footer_gives_rows_and_metadata_of_a_table_checked_against_its_schema(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.parquet"
    write_table(grid_history(), path, "grid_history", metadata={"source": "test"})

    rows, meta = table_footer(path, "grid_history")

    assert rows == 2
    assert meta["source"] == "test" and meta["schema"] == "grid_history"
    with pytest.raises(TableError, match=re.escape(str(path)) + ".*folds schema"):
        table_footer(path, "folds")


def test_table_footer_of_a_truncated_parquet_raises_table_error_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.parquet"
    write_table(grid_history(), path, "grid_history")
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(TableError, match=re.escape(str(path)) + ".*damaged"):
        table_footer(path, "grid_history")


def test_reading_a_missing_table_raises_table_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.parquet"
    with pytest.raises(TableError, match=re.escape(str(path))):
        read_table(path, "folds")


def test_write_of_data_that_cannot_be_cast_leaves_no_file_and_no_temp_file(
    tmp_path: Path,
) -> None:
    bad = pd.DataFrame({"idx": [1, 2], "fold": ["zero", "one"]})

    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TableError)):
        write_table(bad, tmp_path / "folds.parquet", "folds")

    assert list(tmp_path.iterdir()) == []


def test_write_that_fails_half_way_leaves_the_earlier_table_and_no_temp_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.parquet"
    write_table(grid_history(), path, "grid_history")
    before = path.read_bytes()

    def write_half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, write_half_then_fail)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".history.parquet.sha256",
        "history.parquet",
    ]
    assert path.read_bytes() == before


def test_overwriting_a_table_replaces_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "history.parquet"
    write_table(grid_history(), path, "grid_history")
    longer = pd.concat([grid_history()] * 3, ignore_index=True)

    ref = write_table(longer, path, "grid_history")

    assert ref.rows == 6
    assert read_table(path, "grid_history").num_rows == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".history.parquet.sha256",
        "history.parquet",
    ]
