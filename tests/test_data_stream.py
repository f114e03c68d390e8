"""ParquetDataset: a folder or glob of Parquet files streamed in batches, and open_data.

The reference is TabularData over the same rows in one file: streamed batches must be the same
rows, dtypes and values (lists padded to the batch's longest list instead of the file's).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from amtl_compress.data import CTRData, ParquetDataset, TabularData, open_data
from amtl_compress.data import stream as stream_module
from amtl_compress.data.counts import count_frequencies
from amtl_compress.errors import DataError

ROWS = 1000
# (first row, stop row, row_group_size): a one-row file and uneven row groups, so batches
# straddle both file and row-group boundaries.
PARTS = [(0, 300, 64), (300, 301, 10), (301, 777, 100), (777, ROWS, 50)]
N_USER = 60


def _table() -> pa.Table:
    rng = np.random.default_rng(11)
    row = np.arange(ROWS)
    lists = [list(rng.integers(1, 9, size=rng.integers(0, 5))) for _ in range(ROWS)]
    return pa.table(
        {
            "row": row,  # the row's index in the whole data: tells where every row went
            "user": pa.array(np.minimum(rng.zipf(1.4, ROWS) - 1, N_USER - 1), pa.int32()),
            "price": row * 0.5,
            "tags": pa.array(lists, pa.list_(pa.int64())),
            "label": pa.array(row % 3 == 0, pa.bool_()),
        }
    )


def _write_parts(folder: Path, table: pa.Table, parts=PARTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (start, stop, group) in enumerate(parts):
        pq.write_table(
            table.slice(start, stop - start), folder / f"part-{i:02d}.parquet", row_group_size=group
        )
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(one file holding every row, a folder holding the same rows in 4 files)."""
    root = tmp_path_factory.mktemp("stream")
    table = _table()
    whole = root / "whole.parquet"
    pq.write_table(table, whole)
    folder = _write_parts(root / "parts", table)
    (folder / "_SUCCESS").write_text("")  # a Spark marker: skipped, like hidden files
    (folder / ".part-00.parquet.crc").write_text("x")
    return whole, folder


def _expected_row_groups() -> list[tuple[int, int]]:
    """(first row, rows) of every row group in reading order."""
    out = []
    for start, stop, group in PARTS:
        out += [(s, min(group, stop - s)) for s in range(start, stop, group)]
    return out


def _rows(batches) -> list[int]:
    return torch.cat([x["row"] for x, _ in batches]).tolist()


# ---- the same batches as the in-memory reader ----


@pytest.mark.parametrize("batch_size", [1, 64, 97, 5000])
def test_sequential_batches_equal_in_memory_batches(files, batch_size: int) -> None:
    whole, folder = files
    ref = TabularData.open(whole)
    data = ParquetDataset.open(folder, read_rows=40)
    got = list(data.batches(batch_size))
    want = list(ref.batches(batch_size))
    assert len(got) == len(want) == data.num_batches(batch_size) == ref.num_batches(batch_size)
    for (x, y), (rx, ry) in zip(got, want, strict=True):
        assert list(x) == list(rx) == ["row", "user", "price", "tags"]
        assert y.dtype == torch.float32 and torch.equal(y, ry)
        for name in ("row", "user", "price"):
            assert x[name].dtype == rx[name].dtype and torch.equal(x[name], rx[name])
        # Lists are padded to this batch's longest list (at least 1), not the file's.
        tags = x["tags"]
        longest = int((rx["tags"] != 0).sum(1).max())
        assert tags.dtype == torch.int64 and tags.shape == (len(y), max(longest, 1))
        assert torch.equal(tags, rx["tags"][:, : tags.shape[1]])


def test_surface_matches_tabular_data_and_the_protocol(files) -> None:
    whole, folder = files
    ref, data = TabularData.open(whole), ParquetDataset.open(folder)
    assert isinstance(data, CTRData) and isinstance(ref, CTRData)
    assert data.path == folder and data.label == "label"
    assert data.columns == ref.columns
    assert data.categorical_columns == ref.categorical_columns == ("row", "user")
    assert data.dense_columns == ref.dense_columns == ("price",)
    assert data.list_columns == ref.list_columns == ("tags",)
    assert data.num_rows == ROWS
    assert [(g.row0 + _file_start(g.file), g.rows) for g in data.row_groups] == (
        _expected_row_groups()
    )
    for name in ("user", "tags"):
        assert data.max_id(name) == ref.max_id(name)
    for name in data.columns:
        assert torch.equal(data.column(name), ref.column(name))


def _file_of(row: int) -> int:
    return next(i for i, (start, stop, _) in enumerate(PARTS) if start <= row < stop)


def _file_start(path: Path) -> int:
    return PARTS[int(path.stem.split("-")[1])][0]


def test_glob_and_single_file_open_the_same_rows(files) -> None:
    whole, folder = files
    by_glob = ParquetDataset.open(str(folder / "part-*.parquet"))
    assert [g.file for g in by_glob.row_groups] == [
        g.file for g in ParquetDataset.open(folder).row_groups
    ]
    assert _rows(by_glob.batches(128)) == list(range(ROWS))
    one = ParquetDataset.open(whole)
    assert one.num_rows == ROWS and _rows(one.batches(300)) == list(range(ROWS))


def test_open_and_num_batches_read_footers_only(files, monkeypatch) -> None:
    _, folder = files

    def no_data(*args, **kwargs):
        raise AssertionError("a data page was read")

    monkeypatch.setattr(stream_module, "read_row_group", no_data)
    data = ParquetDataset.open(folder)
    assert data.num_rows == ROWS
    assert data.num_batches(64) == 16
    assert data.num_batches(64, rank=1, world_size=3) == data.num_batches(64, 0, 3)


def test_open_data_picks_the_reader(files, tmp_path: Path) -> None:
    whole, folder = files
    assert type(open_data(whole)) is TabularData
    assert type(open_data(folder)) is ParquetDataset
    assert type(open_data(str(folder / "*.parquet"), label="label")) is ParquetDataset
    csv = tmp_path / "d.csv"
    csv.write_text("age,label\n30,1\n41,0\n")
    assert open_data(csv, csv_kinds={"age": "dense"}).dense_columns == ("age",)
    with pytest.raises(DataError, match="drop `csv_kinds`"):
        open_data(folder, csv_kinds={"user": "dense"})


# ---- shuffle ----


def test_shuffle_is_a_seeded_permutation_with_aligned_rows(files) -> None:
    _, folder = files
    data = ParquetDataset.open(folder, shuffle_buffer=200)
    order = _rows(data.batches(64, shuffle=True, seed=4))
    assert sorted(order) == list(range(ROWS)) and order != list(range(ROWS))
    assert order == _rows(
        ParquetDataset.open(folder, shuffle_buffer=200).batches(64, shuffle=True, seed=4)
    )  # a fresh object: the same batches
    assert order != _rows(data.batches(64, shuffle=True, seed=5))
    sizes = [len(y) for _, y in data.batches(64, shuffle=True, seed=4)]
    assert sizes == [64] * 15 + [ROWS - 15 * 64]
    ref_tags = TabularData.open(files[0]).features["tags"]
    for x, y in data.batches(64, shuffle=True, seed=4):
        assert torch.equal(y, (x["row"] % 3 == 0).float())
        assert torch.equal(x["price"], x["row"].float() * 0.5)
        want = ref_tags[x["row"]]
        width = max(int((want != 0).sum(1).max()), 1)
        assert torch.equal(x["tags"], want[:, :width])


def test_shuffle_moves_row_groups_and_rows_within_the_buffer(files) -> None:
    _, folder = files
    data = ParquetDataset.open(folder, shuffle_buffer=200)
    # Row groups are read in a seeded order: the first rows out come from different files.
    firsts = {_rows(data.batches(50, shuffle=True, seed=s))[0] for s in range(6)}
    assert len({_file_of(r) for r in firsts}) > 1
    order = _rows(data.batches(50, shuffle=True, seed=0))
    # Rows of one buffer are permuted: consecutive outputs are rarely consecutive rows.
    steps = np.diff(order[:200])
    assert (steps == 1).mean() < 0.2


# ---- sharding by row group ----


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_row_group_shards_are_disjoint_with_equal_batch_counts(
    files, world_size: int, shuffle: bool
) -> None:
    _, folder = files
    data = ParquetDataset.open(folder, read_rows=30, shuffle_buffer=120)
    groups = _expected_row_groups()
    shard_rows = [sum(n for _, n in groups[r::world_size]) for r in range(world_size)]
    assert data.shard_rows(world_size) == shard_rows
    expected_batches = -(-min(shard_rows) // 32)
    seen: set[int] = set()
    for rank in range(world_size):
        assert data.num_batches(32, rank, world_size) == expected_batches
        batches = list(data.batches(32, shuffle=shuffle, seed=9, rank=rank, world_size=world_size))
        assert len(batches) == expected_batches
        assert [len(y) for _, y in batches][:-1] == [32] * (expected_batches - 1)
        rows = _rows(batches)
        assert len(rows) == min(shard_rows)
        mine = {s + k for s, n in groups[rank::world_size] for k in range(n)}
        assert set(rows) <= mine and not seen & set(rows)
        seen |= set(rows)
        if not shuffle:  # the rank's row groups in order, cut where the smallest shard ends
            assert rows == sorted(mine)[: min(shard_rows)]


def test_more_ranks_than_row_groups_is_a_data_error(files) -> None:
    _, folder = files
    data = ParquetDataset.open(folder)
    groups = len(_expected_row_groups())
    assert data.num_batches(8, rank=groups - 1, world_size=groups) >= 1
    with pytest.raises(DataError) as exc:
        data.num_batches(8, rank=0, world_size=groups + 1)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"has {groups} row groups, fewer than world_size {groups + 1}" in msg
    assert "row_group_size" in msg
    with pytest.raises(DataError, match="fewer than world_size"):
        next(data.batches(8, rank=0, world_size=groups + 1))
    with pytest.raises(ValueError, match="rank must be in"):
        data.num_batches(8, rank=3, world_size=3)


# ---- memory stays bounded: no read or buffer ever holds more than its cap ----


@pytest.mark.parametrize("shuffle", [False, True])
def test_reads_and_buffers_hold_a_bounded_number_of_rows(files, monkeypatch, shuffle) -> None:
    _, folder = files
    read_sizes: list[int] = []
    buffer_sizes: list[int] = []
    real_read, real_concat = stream_module.read_row_group, stream_module.Block.concat

    def spy_read(group, columns, read_rows):
        for batch, row0 in real_read(group, columns, read_rows):
            read_sizes.append(batch.num_rows)
            yield batch, row0

    def spy_concat(blocks):
        out = real_concat(blocks)
        buffer_sizes.append(out.num_rows)
        return out

    monkeypatch.setattr(stream_module, "read_row_group", spy_read)
    monkeypatch.setattr(stream_module.Block, "concat", staticmethod(spy_concat))
    read_rows, capacity, batch = 16, 100, 24
    data = ParquetDataset.open(folder, read_rows=read_rows, shuffle_buffer=capacity)
    assert sum(len(y) for _, y in data.batches(batch, shuffle=shuffle, seed=1)) == ROWS
    assert sum(read_sizes) == ROWS and max(read_sizes) == read_rows
    cap = (capacity if shuffle else batch) + read_rows - 1
    assert len(buffer_sizes) > ROWS // cap and max(buffer_sizes) <= cap


# ---- streaming validation: errors name the file and the file row ----


def _bad_folder(tmp_path: Path, column: str, values: pa.Array) -> Path:
    table = _table()
    bad = table.set_column(table.schema.get_field_index(column), column, values)
    return _write_parts(tmp_path / "bad", bad)


@pytest.mark.parametrize(
    ("column", "bad", "message"),
    [
        ("label", None, "row 49: the cell is empty"),
        ("price", float("nan"), "row 49: value nan is not finite"),
        ("user", -3, "row 49: id -3 is negative"),
        ("tags", [2, 0], "row 49: list id 0 is reserved for padding"),
    ],
)
def test_bad_cells_are_reported_as_batches_are_read(
    tmp_path: Path, column: str, bad, message: str
) -> None:
    table = _table()
    cells = table.column(column).to_pylist()
    cells[350] = bad  # file part-02 starts at row 301: its row 49
    folder = _bad_folder(tmp_path, column, pa.array(cells, table.schema.field(column).type))
    data = ParquetDataset.open(folder)  # footers only: opening succeeds
    batches = data.batches(100)
    for _ in range(3):
        next(batches)  # rows 0-299 of part-00 are clean
    with pytest.raises(DataError) as exc:
        list(batches)
    msg = str(exc.value)
    assert "\n" not in msg and "part-02.parquet`" in msg and f"column `{column}`, {message}" in msg


def test_label_other_than_0_1(tmp_path: Path) -> None:
    table = _table()
    labels = pa.array(np.where(np.arange(ROWS) == 900, 2, table.column("row").to_numpy() % 2))
    folder = _write_parts(tmp_path / "l", table.set_column(4, "label", labels))
    with pytest.raises(DataError, match=r"part-03\.parquet`, column `label`, row 123: label 2"):
        list(ParquetDataset.open(folder).batches(64))


def test_validate_ids_streams_and_names_file_and_row(files) -> None:
    _, folder = files
    data = ParquetDataset.open(folder)
    ref = _table()
    largest = int(pa.compute.max(ref.column("user")).as_py())
    data.validate_ids("user", largest + 1)
    data.validate_ids("tags", 9)
    first = int(np.flatnonzero(ref.column("user").to_numpy() >= largest)[0])
    part = _file_of(first)
    with pytest.raises(DataError) as exc:
        data.validate_ids("user", largest)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"part-{part:02d}.parquet`, column `user`, row {first - PARTS[part][0]}: id" in msg
    assert f"at least {largest + 1} rows" in msg
    with pytest.raises(DataError, match=r"column `tags`, row \d+: id 8 is outside \[0, 8\)"):
        data.validate_ids("tags", 8)
    with pytest.raises(DataError, match="has no column `nope`"):
        data.validate_ids("nope", 3)
    with pytest.raises(DataError, match="column `price` holds floats"):
        data.max_id("price")


# ---- bad file sets: one-line DataErrors naming the file and the fix ----


def _one_line_error(call) -> str:
    with pytest.raises(DataError) as exc:
        call()
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_empty_folder_and_glob_without_match(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_SUCCESS").write_text("")
    msg = _one_line_error(lambda: ParquetDataset.open(empty))
    assert f"data folder `{empty}` holds no Parquet files" in msg
    msg = _one_line_error(lambda: open_data(str(tmp_path / "*.parquet")))
    assert "*.parquet` matches no files: check the pattern" in msg
    msg = _one_line_error(lambda: count_frequencies(str(tmp_path / "x-*.pq"), "u", 3))
    assert "matches no files" in msg
    assert "does not exist" in _one_line_error(lambda: ParquetDataset.open(tmp_path / "missing"))


def test_non_parquet_file_or_sub_folder_in_the_folder(tmp_path: Path) -> None:
    folder = _write_parts(tmp_path / "d", _table())
    (folder / "notes.txt").write_text("hi")
    msg = _one_line_error(lambda: ParquetDataset.open(folder))
    assert "notes.txt` in data folder" in msg and "is not a Parquet file" in msg
    (folder / "notes.txt").unlink()
    (folder / "sub").mkdir()
    assert "sub-folders are not read" in _one_line_error(lambda: ParquetDataset.open(folder))
    (folder / "sub").rmdir()
    (folder / "part-09.parquet").write_bytes(b"PAR1 not really")
    assert "cannot read `" in _one_line_error(lambda: ParquetDataset.open(folder))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.set_column(1, "user", pa.array(t.column("user").to_numpy(), pa.int64())),
         "column `user` has type int64 but int32 in"),
        (lambda t: t.drop_columns(["price"]), "lacks column `price` of"),
        (lambda t: t.append_column("extra", pa.array([1.0] * t.num_rows)),
         "has column `extra`, which"),
        (lambda t: t.select(["user", "row", "price", "tags", "label"]), "orders its columns"),
    ],
)  # fmt: skip
def test_schema_mismatch_names_both_files(tmp_path: Path, change, message: str) -> None:
    folder = _write_parts(tmp_path / "d", _table())
    odd = folder / "part-02.parquet"
    pq.write_table(change(pq.read_table(odd)), odd)
    msg = _one_line_error(lambda: ParquetDataset.open(folder))
    assert f"`{odd}`" in msg and message in msg and "part-00.parquet`" in msg
    assert "write every file with the same columns and types" in msg


def test_file_without_rows_and_missing_label(tmp_path: Path) -> None:
    table = _table()
    folder = _write_parts(tmp_path / "d", table)
    pq.write_table(table.slice(0, 0), folder / "part-05.parquet")
    msg = _one_line_error(lambda: ParquetDataset.open(folder))
    assert "part-05.parquet` has no rows: remove it" in msg
    (folder / "part-05.parquet").unlink()
    msg = _one_line_error(lambda: ParquetDataset.open(folder, label="click"))
    assert "has no label column `click`" in msg and "`user`" in msg
    assert msg.endswith("): add it or pass the label column's name as `label`")
    strings = _write_parts(tmp_path / "s", table.append_column("city", pa.array(["a"] * ROWS)))
    assert "column `city` has type string" in _one_line_error(lambda: ParquetDataset.open(strings))


# ---- counting a folder ----


def test_counts_over_a_folder_equal_counts_over_the_whole_file(files, capsys) -> None:
    whole, folder = files
    for column, n in (("user", N_USER), ("tags", 9)):
        want = count_frequencies(whole, column, n)
        got = count_frequencies(folder, column, n, batch_rows=37)
        assert got.dtype == torch.int64 and torch.equal(got, want)
        assert torch.equal(count_frequencies(str(folder / "*.parquet"), column, n), want)
    count_frequencies(folder, "user", N_USER, progress=True)
    err = capsys.readouterr().err
    assert "count user" in err and "1.00k/1.00k" in err


def test_count_errors_name_the_file_and_its_row(files) -> None:
    _, folder = files
    ref = _table().column("user").to_numpy()
    first = int(np.flatnonzero(ref >= 5)[0])
    part = _file_of(first)
    msg = _one_line_error(lambda: count_frequencies(folder, "user", 5))
    assert f"part-{part:02d}.parquet`, column `user`, row {first - PARTS[part][0]}: id" in msg
    assert "has no column `nope`" in _one_line_error(lambda: count_frequencies(folder, "nope", 5))
    msg = _one_line_error(lambda: count_frequencies(folder, "price", 5))
    assert "column `price` has type double, not ids" in msg


def test_tabular_data_refuses_a_folder_and_missing_paths_say_so(files, tmp_path: Path) -> None:
    _, folder = files
    msg = _one_line_error(lambda: TabularData.open(folder))
    assert "is a folder, not a data file" in msg and "open_data" in msg
    msg = _one_line_error(lambda: open_data(tmp_path / "no_such_folder"))
    assert "no_such_folder` does not exist: check the path" in msg
    msg = _one_line_error(lambda: count_frequencies(tmp_path / "no_such_folder", "u", 3))
    assert "does not exist" in msg


@pytest.mark.slow
def test_stream_bench_runs_and_reads_every_row() -> None:
    """bench/stream.py end to end at tiny sizes (it exits non-zero if a row or batch is lost)."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "stream.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--sizes", "20000,60000", "--files", "3"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines[-2].split()[0] == "20,000" and lines[-1].split()[0] == "60,000"
