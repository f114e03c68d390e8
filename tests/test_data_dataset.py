"""TabularData: reading the data contract, batching, and every DataError it promises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from amtl_compress.data.dataset import TabularData
from amtl_compress.errors import DataError


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return write_parquet(
        tmp_path / "small.parquet",
        {
            "user": pa.array([0, 1, 2, 3, 4, 5, 6], pa.int32()),
            "price": pa.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5], pa.float64()),
            "tags": pa.array([[1, 2], [], [3], [1, 2, 3], [2], [], [4]], pa.list_(pa.int64())),
            "label": pa.array([0, 1, 0, 1, 1, 0, 1], pa.int8()),
        },
    )


def test_columns_and_kinds(small: Path) -> None:
    data = TabularData.open(small)
    assert data.columns == ("user", "price", "tags")
    assert data.categorical_columns == ("user",)
    assert data.dense_columns == ("price",)
    assert data.list_columns == ("tags",)
    assert data.num_rows == 7
    assert data.features["user"].dtype == torch.int64
    assert data.features["price"].dtype == torch.float32
    assert data.labels.dtype == torch.float32
    assert data.labels.tolist() == [0, 1, 0, 1, 1, 0, 1]


def test_lists_are_padded_with_zero_to_the_longest_list_in_the_file(small: Path) -> None:
    tags = TabularData.open(small).features["tags"]
    assert tags.dtype == torch.int64
    assert tags.tolist() == [
        [1, 2, 0],
        [0, 0, 0],
        [3, 0, 0],
        [1, 2, 3],
        [2, 0, 0],
        [0, 0, 0],
        [4, 0, 0],
    ]
    # The padding width is the file's, not the batch's: a batch of short lists keeps 3 columns.
    first, _ = next(TabularData.open(small).batches(2))
    assert first["tags"].shape == (2, 3)


def test_all_empty_lists_still_give_one_padding_column(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "e.parquet",
        {"tags": pa.array([[], []], pa.list_(pa.int64())), "label": [0, 1]},
    )
    assert TabularData.open(path).features["tags"].tolist() == [[0], [0]]


def test_sequential_batches_cover_rows_in_order(small: Path) -> None:
    data = TabularData.open(small)
    batches = list(data.batches(3))
    assert data.num_batches(3) == len(batches) == 3
    assert [len(y) for _, y in batches] == [3, 3, 1]
    users = torch.cat([x["user"] for x, _ in batches])
    assert users.tolist() == list(range(7))
    for x, y in batches:
        assert set(x) == {"user", "price", "tags"}
        # Features and labels stay aligned row by row.
        assert torch.equal(y, data.labels[x["user"]])
        assert torch.allclose(x["price"], 0.5 * (x["user"].float() + 1))


def test_shuffle_is_a_permutation_fixed_by_the_seed(small: Path) -> None:
    data = TabularData.open(small)

    def order(seed: int) -> list[int]:
        return torch.cat([x["user"] for x, _ in data.batches(2, shuffle=True, seed=seed)]).tolist()

    assert sorted(order(0)) == list(range(7))
    assert order(0) == order(0)
    assert order(0) == _order_again(small, 0)  # a fresh object, the same order
    assert any(order(s) != order(0) for s in range(1, 6))
    for x, y in data.batches(2, shuffle=True, seed=3):
        assert torch.equal(y, data.labels[x["user"]])


def _order_again(path: Path, seed: int) -> list[int]:
    data = TabularData.open(path)
    return torch.cat([x["user"] for x, _ in data.batches(2, shuffle=True, seed=seed)]).tolist()


def test_bad_batch_size_raises(small: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TabularData.open(small).num_batches(0)


def test_csv_with_list_column_and_custom_label(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("user,price,tags,clicked\n3,0.5,1|2,1\n0,1.5,,0\n2,2.0,7,1\n")
    data = TabularData.open(path, label="clicked")
    assert data.categorical_columns == ("user",)
    assert data.dense_columns == ("price",)
    assert data.list_columns == ("tags",)
    assert data.features["tags"].tolist() == [[1, 2], [0, 0], [7, 0]]
    assert data.labels.tolist() == [1.0, 0.0, 1.0]


def test_csv_kinds_resolve_ambiguous_text(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("age,tags,label\n30,4,1\n41,5,0\n")
    plain = TabularData.open(path)
    assert plain.categorical_columns == ("age", "tags")
    forced = TabularData.open(path, csv_kinds={"age": "dense", "tags": "list"})
    assert forced.dense_columns == ("age",)
    assert forced.features["age"].dtype == torch.float32
    assert forced.features["tags"].tolist() == [[4], [5]]
    with pytest.raises(DataError, match="`csv_kinds` gives column `age` the kind `float`"):
        TabularData.open(path, csv_kinds={"age": "float"})  # type: ignore[dict-item]
    with pytest.raises(DataError, match="names column `agee`, which .* lacks"):
        TabularData.open(path, csv_kinds={"agee": "dense"})


def test_validate_ids(small: Path) -> None:
    data = TabularData.open(small)
    data.validate_ids("user", 7)
    data.validate_ids("tags", 5)
    with pytest.raises(
        DataError, match=r"column `user`, row 6: id 6 is outside \[0, 6\).*at least 7"
    ):
        data.validate_ids("user", 6)
    with pytest.raises(DataError, match=r"column `tags`, row 6: id 4 is outside \[0, 4\)"):
        data.validate_ids("tags", 4)
    with pytest.raises(DataError, match="has no column `nope`"):
        data.validate_ids("nope", 3)
    with pytest.raises(DataError, match="column `price` holds floats"):
        data.validate_ids("price", 3)


# ---- every DataError case: one line, naming file, column and row where there is one ----


def one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        TabularData.open(tmp_path / "nope.parquet")
    assert "nope.parquet` does not exist" in one_line(exc)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("{}")
    with pytest.raises(DataError, match=r"unknown data format `\.json`.*Parquet or CSV"):
        TabularData.open(path)


def test_missing_label_column(small: Path) -> None:
    with pytest.raises(DataError) as exc:
        TabularData.open(small, label="click")
    msg = one_line(exc)
    assert "has no label column `click`" in msg and "`user`" in msg and str(small) in msg


def test_labels_outside_0_1(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "l.parquet", {"u": [0, 1, 2], "label": [0.0, 1.0, 4.0]})
    with pytest.raises(DataError) as exc:
        TabularData.open(path)
    assert "column `label`, row 2: label 4 is not 0 or 1" in one_line(exc)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e39])
def test_non_finite_dense_values(tmp_path: Path, bad: float) -> None:
    path = write_parquet(
        tmp_path / "f.parquet", {"x": pa.array([1.0, bad], pa.float64()), "label": [0, 1]}
    )
    with pytest.raises(DataError) as exc:
        TabularData.open(path)
    assert "column `x`, row 1" in one_line(exc) and "not finite" in one_line(exc)


def test_negative_categorical_id(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "n.parquet", {"u": [0, 3, -2], "label": [0, 1, 0]})
    with pytest.raises(DataError) as exc:
        TabularData.open(path)
    assert "column `u`, row 2: id -2 is negative" in one_line(exc)


def test_negative_list_id(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "n.parquet",
        {"t": pa.array([[1], [2, -1]], pa.list_(pa.int64())), "label": [0, 1]},
    )
    with pytest.raises(DataError, match="column `t`, row 1: id -1 is negative"):
        TabularData.open(path)


def test_list_id_zero_is_reserved_for_padding(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "z.parquet",
        {"t": pa.array([[1], [], [0, 2]], pa.list_(pa.int64())), "label": [0, 1, 1]},
    )
    with pytest.raises(DataError, match="column `t`, row 2: list id 0 is reserved for padding"):
        TabularData.open(path)


def test_unsupported_column_type(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "s.parquet", {"city": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError) as exc:
        TabularData.open(path)
    assert "column `city` has type string" in one_line(exc) and "index-encode" in one_line(exc)


def test_csv_text_column_is_not_ids(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("gender,label\nM,1\nF,0\n")
    with pytest.raises(DataError, match="column `gender`, row 0: `M` is text, not integer ids"):
        TabularData.open(path)


def test_null_cell(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "n.parquet", {"u": pa.array([1, None, 2]), "label": [0, 1, 0]})
    with pytest.raises(DataError, match="column `u`, row 1: the cell is empty"):
        TabularData.open(path)


def test_empty_files(tmp_path: Path) -> None:
    empty_csv = tmp_path / "e.csv"
    empty_csv.write_text("")
    with pytest.raises(DataError, match="e.csv` is empty"):
        TabularData.open(empty_csv)
    header_only = tmp_path / "h.csv"
    header_only.write_text("u,label\n")
    with pytest.raises(DataError, match="h.csv` has no rows"):
        TabularData.open(header_only)
    no_rows = write_parquet(
        tmp_path / "e.parquet",
        {"u": pa.array([], pa.int64()), "label": pa.array([], pa.int64())},
    )
    with pytest.raises(DataError, match="e.parquet` has no rows"):
        TabularData.open(no_rows)


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError) as exc:
        TabularData.open(path)
    assert "cannot read" in one_line(exc) and "c.parquet" in one_line(exc)


def test_large_file_round_trip_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=1000)
    path = write_parquet(tmp_path / "big.parquet", {"u": ids, "label": rng.integers(0, 2, 1000)})
    data = TabularData.open(path)
    assert torch.equal(data.features["u"], torch.from_numpy(ids))


def test_column_accessor(small: Path) -> None:
    data = TabularData.open(small)
    assert data.column("user").tolist() == list(range(7))
    assert data.column("tags").shape == (7, 3)
    with pytest.raises(DataError, match="has no column `label`"):
        data.column("label")  # the label is not a feature


def test_csv_list_cells_must_hold_ids(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("tags,label\n1|2,1\n4||5,0\n")
    with pytest.raises(DataError, match=r"column `tags`, row 1: `4\|\|5` is text"):
        TabularData.open(path)


def test_csv_kinds_are_refused_for_parquet(small: Path) -> None:
    with pytest.raises(DataError, match="is Parquet, whose columns carry their types"):
        TabularData.open(small, csv_kinds={"user": "dense"})
