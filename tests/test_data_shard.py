"""Sharding for data-parallel training: every rank the same step count, disjoint shards.

Covers ``TabularData.batches/num_batches(rank, world_size)`` and the sharded frequency counts;
the streaming dataset's row-group shards are in test_data_stream.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from amtl_compress.data.counts import count_frequencies
from amtl_compress.data.dataset import TabularData
from amtl_compress.errors import DataError

ROWS = 23  # not a multiple of any world size below, so there is always a tail to drop


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> TabularData:
    path = tmp_path_factory.mktemp("shard") / "d.parquet"
    rng = np.random.default_rng(0)
    lists = [list(rng.integers(1, 9, size=rng.integers(0, 4))) for _ in range(ROWS)]
    pq.write_table(
        pa.table(
            {
                "row": np.arange(ROWS),
                "x": rng.random(ROWS),
                "tags": pa.array(lists, pa.list_(pa.int64())),
                "label": rng.integers(0, 2, ROWS),
            }
        ),
        path,
    )
    return TabularData.open(path)


def _rows(data: TabularData, batch_size: int, **kw) -> list[int]:
    return torch.cat([x["row"] for x, _ in data.batches(batch_size, **kw)]).tolist()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
def test_shards_have_equal_sizes_are_disjoint_and_cover_all_but_the_tail(
    data: TabularData, world_size: int, shuffle: bool
) -> None:
    per_rank = [
        _rows(data, 2, shuffle=shuffle, seed=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    sizes = {len(rows) for rows in per_rank}
    assert sizes == {ROWS // world_size}
    counts = {data.num_batches(2, rank=r, world_size=world_size) for r in range(world_size)}
    assert counts == {-(-(ROWS // world_size) // 2)}
    union = [row for rows in per_rank for row in rows]
    assert len(set(union)) == len(union)  # disjoint
    # Union = the shared order minus its last ROWS % W positions.
    full = _rows(data, 2, shuffle=shuffle, seed=5)
    kept = full[: (ROWS // world_size) * world_size]
    assert sorted(union) == sorted(kept)
    # Rank r holds positions r, r + W, ... of the shared order, in that order.
    for r, rows in enumerate(per_rank):
        assert rows == kept[r::world_size]


def test_world_size_one_is_the_unsharded_iteration(data: TabularData) -> None:
    for shuffle in (False, True):
        plain = list(data.batches(4, shuffle=shuffle, seed=2))
        sharded = list(data.batches(4, shuffle=shuffle, seed=2, rank=0, world_size=1))
        assert len(plain) == len(sharded) == data.num_batches(4, 0, 1) == data.num_batches(4)
        for (xa, ya), (xb, yb) in zip(plain, sharded, strict=True):
            assert torch.equal(ya, yb)
            assert all(torch.equal(xa[k], xb[k]) for k in xa)


def test_sharded_batches_keep_features_and_labels_aligned(data: TabularData) -> None:
    for x, y in data.batches(3, shuffle=True, seed=1, rank=1, world_size=3):
        assert torch.equal(y, data.labels[x["row"]])
        assert torch.equal(x["tags"], data.features["tags"][x["row"]])
        assert x["x"].dtype == torch.float32 and x["tags"].dtype == torch.int64
        assert all(v.is_contiguous() for v in x.values())


def test_bad_rank_or_world_size(data: TabularData) -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        data.num_batches(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got -1"):
        next(data.batches(4, rank=-1, world_size=2))
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        data.num_batches(4, rank=0, world_size=0)


def test_fewer_rows_than_ranks_is_a_data_error(data: TabularData) -> None:
    with pytest.raises(DataError) as exc:
        data.num_batches(4, rank=0, world_size=ROWS + 1)
    msg = str(exc.value)
    assert "\n" not in msg and f"has {ROWS} rows, fewer than world_size {ROWS + 1}" in msg
    assert str(data.path) in msg


# ---- sharded frequency counts: the sum over ranks is the full count ----

N = 50


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.minimum(np.random.default_rng(3).zipf(1.3, size=2000) - 1, N - 1)


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_sharded_parquet_counts_sum_to_the_full_counts(
    tmp_path: Path, ids: np.ndarray, world_size: int
) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"u": ids, "label": ids % 2}), path, row_group_size=300)  # 7 groups
    full = count_frequencies(path, "u", N)
    shards = [count_frequencies(path, "u", N, 128, r, world_size) for r in range(world_size)]
    assert torch.equal(torch.stack(shards).sum(0), full)
    assert all(s.sum() > 0 for s in shards)  # every rank counted a real share
    # Rank r counted exactly row groups r, r + W, ...
    mine = np.concatenate([ids[g * 300 : (g + 1) * 300] for g in range(1, 7, world_size)])
    assert np.array_equal(shards[1].numpy(), np.bincount(mine, minlength=N))


def test_sharded_counts_over_a_folder_and_ranks_without_row_groups(
    tmp_path: Path, ids: np.ndarray
) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, (start, stop) in enumerate([(0, 700), (700, 1000), (1000, 2000)]):
        chunk = pa.table({"u": ids[start:stop], "label": ids[start:stop] % 2})
        pq.write_table(chunk, folder / f"p{i}.parquet", row_group_size=500)  # 2 + 1 + 2 groups
    full = torch.from_numpy(np.bincount(ids, minlength=N))
    for world_size in (2, 5, 8):  # 8 > 5 row groups: ranks 5-7 count nothing
        shards = [count_frequencies(folder, "u", N, rank=r, world_size=world_size)
                  for r in range(world_size)]  # fmt: skip
        assert torch.equal(torch.stack(shards).sum(0), full)
    assert count_frequencies(folder, "u", N, rank=6, world_size=8).sum() == 0


def test_csv_is_counted_whole_by_rank_0(tmp_path: Path, ids: np.ndarray) -> None:
    path = tmp_path / "d.csv"
    path.write_text("u,label\n" + "".join(f"{i},0\n" for i in ids))
    full = count_frequencies(path, "u", N)
    assert torch.equal(count_frequencies(path, "u", N, rank=0, world_size=3), full)
    other = count_frequencies(path, "u", N, rank=2, world_size=3)
    assert other.dtype == torch.int64 and other.shape == (N,) and other.sum() == 0
    # Other ranks still refuse a column that does not exist, like rank 0 does.
    with pytest.raises(DataError, match="has no column `v`"):
        count_frequencies(path, "v", N, rank=1, world_size=3)


def test_sharded_count_progress_bar_totals_the_shard(tmp_path: Path, ids: np.ndarray, capsys):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"u": ids, "label": ids % 2}), path, row_group_size=500)
    count_frequencies(path, "u", N, rank=1, world_size=2, progress=True)  # groups 1, 3
    err = capsys.readouterr().err
    assert "count u" in err and "1.00k/1.00k" in err
    count_frequencies(path, "u", N)
    assert capsys.readouterr().err == ""  # no bar unless asked


def test_count_rejects_bad_rank(tmp_path: Path, ids: np.ndarray) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"u": ids, "label": ids % 2}), path)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        count_frequencies(path, "u", N, rank=2, world_size=2)
