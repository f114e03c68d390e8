"""count_frequencies (streaming) against numpy, and read_counts for user-supplied counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from amtl_compress.data import counts as counts_module
from amtl_compress.data.counts import count_frequencies, read_counts
from amtl_compress.errors import DataError

N = 300
ROWS = 5_000


@pytest.fixture(scope="module")
def zipf_data() -> tuple[np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(7)
    ids = np.minimum(rng.zipf(1.3, size=ROWS) - 1, N - 2)  # N - 1 is never seen
    lists = [list(rng.integers(1, 40, size=rng.integers(0, 4))) for _ in range(ROWS)]
    return ids, lists


def _expected_lists(lists: list[list[int]], n: int) -> np.ndarray:
    flat = np.array([i for row in lists for i in row], dtype=np.int64)
    return np.bincount(flat, minlength=n)


def test_parquet_counts_equal_bincount_over_many_batches(tmp_path: Path, zipf_data) -> None:
    ids, lists = zipf_data
    path = tmp_path / "d.parquet"
    # Small row groups and batches: the count must add up across both boundaries.
    pq.write_table(
        pa.table({"u": ids, "tags": pa.array(lists, pa.list_(pa.int64())), "label": ids % 2}),
        path,
        row_group_size=700,
    )
    counts = count_frequencies(path, "u", N, batch_rows=333)
    assert counts.dtype == torch.int64 and counts.shape == (N,)
    assert np.array_equal(counts.numpy(), np.bincount(ids, minlength=N))
    assert counts[N - 1] == 0 and counts.max() > 100 * counts[counts > 0].min()
    tag_counts = count_frequencies(path, "tags", 40, batch_rows=333)
    assert np.array_equal(tag_counts.numpy(), _expected_lists(lists, 40))
    assert tag_counts[0] == 0  # list ids are 1-based


def test_csv_counts_equal_bincount_over_many_blocks(tmp_path: Path, zipf_data) -> None:
    ids, lists = zipf_data
    path = tmp_path / "d.csv"
    # The first 100 rows hold at most one tag, so a reader that infers types from the first
    # block would take `tags` for integers and fail on the first `a|b` further down.
    text = ["|".join(map(str, row[:1] if n < 100 else row)) for n, row in enumerate(lists)]
    pacsv.write_csv(pa.table({"u": ids, "tags": text, "label": ids % 2}), path)
    assert path.stat().st_size > 8 * 4096  # several CSV blocks at the smallest block size
    counts = count_frequencies(path, "u", N, batch_rows=50)
    assert np.array_equal(counts.numpy(), np.bincount(ids, minlength=N))
    expected = _expected_lists([row[:1] if n < 100 else row for n, row in enumerate(lists)], 40)
    assert np.array_equal(count_frequencies(path, "tags", 40, batch_rows=50).numpy(), expected)


def test_csv_row_longer_than_a_block_is_still_counted(tmp_path: Path, monkeypatch) -> None:
    # Size blocks from a 4 kB head, so the long row below is unseen and overflows its block.
    monkeypatch.setattr(counts_module, "_HEAD_BYTES", 4096)
    path = tmp_path / "long.csv"
    rows = ["1"] * 3000
    rows[2500] = "|".join(["2"] * 5000)  # ~10 kB row, far past the first block size
    path.write_text("tags,label\n" + "".join(f"{r},0\n" for r in rows))
    counts = count_frequencies(path, "tags", 3, batch_rows=10)
    assert counts.tolist() == [0, 2999, 5000]


def test_out_of_range_id_names_column_id_and_n(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"u": [0, 1, 2, 9, 1], "label": [0] * 5}), path)
    with pytest.raises(DataError) as exc:
        count_frequencies(path, "u", 5, batch_rows=2)
    msg = str(exc.value)
    assert "column `u`, row 3: id 9 is outside [0, 5)" in msg and "num_embeddings > 9" in msg
    assert "\n" not in msg


def test_out_of_range_list_id_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("tags,label\n1|2,0\n,1\n3|8,0\n")
    with pytest.raises(DataError, match=r"column `tags`, row 2: id 8 is outside \[0, 5\)"):
        count_frequencies(path, "tags", 5)


def test_count_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"u": [0, -1], "x": [0.5, 1.0], "label": [0, 1]}), path)
    with pytest.raises(DataError, match="has no column `v`"):
        count_frequencies(path, "v", 5)
    with pytest.raises(DataError, match="column `x` has type double, not ids"):
        count_frequencies(path, "x", 5)
    with pytest.raises(DataError, match="column `u`, row 1: id -1 is negative"):
        count_frequencies(path, "u", 5)
    with pytest.raises(DataError, match="does not exist"):
        count_frequencies(tmp_path / "missing.csv", "u", 5)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("u,label\n")
    with pytest.raises(DataError, match="has no rows"):
        count_frequencies(csv_path, "u", 5)
    with pytest.raises(DataError, match="has no column `v`"):
        count_frequencies(csv_path, "v", 5)


# ---- read_counts ----


def test_read_counts_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "counts.safetensors"
    save_file(
        {
            "user_id": torch.tensor([3, 0, 5], dtype=torch.int32),
            "item_id": torch.tensor([1, 2], dtype=torch.int64),
            "neg": torch.tensor([1, -2], dtype=torch.int64),
            "flt": torch.tensor([1.0, 2.0]),
        },
        str(path),
    )
    got = read_counts(path, "user_id", 3)
    assert got.dtype == torch.int64 and got.tolist() == [3, 0, 5]
    with pytest.raises(DataError, match=r"has shape \(2,\), expected \(3,\)"):
        read_counts(path, "item_id", 3)
    with pytest.raises(DataError, match="has no tensor `age`.*`user_id`"):
        read_counts(path, "age", 3)
    with pytest.raises(DataError, match="id 1 has negative count -2"):
        read_counts(path, "neg", 2)
    with pytest.raises(DataError, match="dtype torch.float32"):
        read_counts(path, "flt", 2)


def test_read_counts_csv(tmp_path: Path) -> None:
    path = tmp_path / "user_id.csv"
    path.write_text("id,count\n4,10\n0,2\n")
    assert read_counts(path, "user_id", 6).tolist() == [2, 0, 0, 0, 10, 0]
    path.write_text("id,count\n4,10\n4,2\n")
    with pytest.raises(DataError, match="row 1: id 4 is listed twice"):
        read_counts(path, "user_id", 6)
    path.write_text("id,count\n7,1\n")
    with pytest.raises(DataError, match=r"id 7 is outside \[0, 6\)"):
        read_counts(path, "user_id", 6)
    path.write_text("id,count\n1,-3\n")
    with pytest.raises(DataError, match="id 1 has negative count -3"):
        read_counts(path, "user_id", 6)
    path.write_text("user,n\n1,3\n")
    with pytest.raises(DataError, match="write exactly the header `id,count`"):
        read_counts(path, "user_id", 6)


def test_read_counts_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_counts(tmp_path / "c.safetensors", "u", 3)
    with pytest.raises(DataError, match=r"unknown format `\.npy`"):
        read_counts(tmp_path / "c.npy", "u", 3)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="cannot read counts file"):
        read_counts(bad, "u", 3)
