"""Id frequencies of one column: the q_i the AMTL layer is fed (paper Sec. 2.2.1).

:func:`count_frequencies` streams the data (one file, or a folder or glob of Parquet files), so
it never has to fit in memory, and can count one rank's shard for data-parallel training;
:func:`read_counts` reads counts the user computed elsewhere.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from safetensors import safe_open
from tqdm import tqdm

from amtl_compress.data.columns import (
    FileFormat,
    categorical_ids,
    file_format,
    first_line,
    first_true,
    kind_of,
    list_ids,
    names_list,
)
from amtl_compress.data.dataset import check_rank
from amtl_compress.data.parquet import is_multi_file, parquet_row_groups, read_row_group
from amtl_compress.errors import DataError

# A CSV block must hold at least one whole row; the first try sizes blocks from the rows of the
# file's head, and a row longer than that makes pyarrow ask for a bigger block.
_MIN_CSV_BLOCK = 1 << 12
_HEAD_BYTES = 1 << 20

#: ``(cells of the counted column, file named in errors, file row of the first cell)``
_Chunk = tuple[pa.Array, str, int]


def count_frequencies(
    path: str | os.PathLike[str],
    column: str,
    num_embeddings: int,
    batch_rows: int = 1 << 16,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> torch.Tensor:
    """Count how often each id occurs in ``column``, streaming ``batch_rows`` rows at a time.

    Sharded counting for data-parallel training: with ``world_size`` W > 1 only rank ``rank``'s
    share is counted, so the sum of the W results (``all_reduce`` SUM) is the full count. Parquet
    is split by row group (file path order, then row-group order; rank r takes row groups i
    with i % W == r, the rule of :class:`~amtl_compress.data.stream.ParquetDataset`; a rank with
    no row group counts zeros). CSV cannot be split cheaply: rank 0 counts the whole file and
    the other ranks return zeros after checking that the column exists.

    Args:
        path: a Parquet or CSV file of the contract (docs/data.md), or a folder or glob of
            Parquet files.
        column: a categorical column (one id per row) or a list column (every element counts;
            list ids are 1-based, so row 0 of a list table stays 0).
        num_embeddings: N, the rows of the column's embedding table.
        batch_rows: rows read at a time (approximate for CSV, which is read in byte blocks).
        rank: this process's rank in [0, world_size).
        world_size: W, the number of processes sharing the data.
        progress: show a tqdm bar of rows on stderr (its total, for Parquet, is the shard's rows
            from the file footers).

    Returns:
        int64 (N,): occurrences of each id in this rank's share; ids never seen count 0.

    Raises:
        ValueError: ``num_embeddings`` or ``batch_rows`` < 1, or a bad ``rank``/``world_size``.
        DataError: missing/unknown file, no such column, a column that does not hold ids,
            empty cells, negative ids, an id >= N, or (folder/glob) a bad file set as in
            :func:`~amtl_compress.data.parquet.parquet_row_groups`.
    """
    if num_embeddings < 1:
        raise ValueError(f"num_embeddings must be >= 1, got {num_embeddings}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    check_rank(rank, world_size)
    p = Path(path)
    if is_multi_file(p) or file_format(p) == "parquet":
        counts = _count_parquet(p, column, num_embeddings, batch_rows, rank, world_size, progress)
    else:
        counts = _count_csv(p, column, num_embeddings, batch_rows, rank, progress)
    return torch.from_numpy(counts)


def _count_parquet(
    path: Path,
    column: str,
    num_embeddings: int,
    batch_rows: int,
    rank: int,
    world_size: int,
    progress: bool,
) -> np.ndarray:
    schema, groups = parquet_row_groups(path)
    if column not in schema.names:
        raise DataError(
            f"`{path}` has no column `{column}` (columns: {names_list(schema.names)}): "
            "check the field name"
        )
    if kind_of(schema.field(column).type, "parquet") not in ("categorical", "list"):
        raise DataError(
            f"`{path}`, column `{column}` has type {schema.field(column).type}, not ids: count a "
            "categorical (integer) or list column"
        )
    mine = groups[rank::world_size]

    def chunks() -> Iterator[_Chunk]:
        for group in mine:
            for batch, row0 in read_row_group(group, [column], batch_rows):
                yield batch.column(0), str(group.file), row0

    with _bar(column, sum(g.rows for g in mine), progress) as bar:
        counts, _ = _accumulate(chunks(), column, num_embeddings, "parquet", bar)
    return counts


def _count_csv(
    path: Path, column: str, num_embeddings: int, batch_rows: int, rank: int, progress: bool
) -> np.ndarray:
    header = _csv_header(path)
    if column not in header:
        raise DataError(
            f"`{path}` has no column `{column}` (columns: {names_list(header)}): "
            "check the field name"
        )
    if rank != 0:  # rank 0 counts the whole file; the sum over ranks must count it once
        return np.zeros(num_embeddings, dtype=np.int64)
    block = _csv_block_size(path, batch_rows)
    with _bar(column, None, progress) as bar:
        while True:
            try:
                counts, num_rows = _accumulate(
                    _csv_batches(path, column, block), column, num_embeddings, "csv", bar
                )
                break
            except _RowTooLong:
                if block >= path.stat().st_size:
                    raise DataError(
                        f"cannot read `{path}` as CSV: a row is unterminated "
                        "(unbalanced quotes?); fix the file"
                    ) from None
                block *= 4  # restart from the top: counts of a partial pass are discarded
                bar.reset()
    if num_rows == 0:
        raise DataError(f"`{path}` has no rows: count frequencies on the training data file")
    return counts


def _bar(column: str, total: int | None, progress: bool) -> tqdm:
    return tqdm(
        total=total, desc=f"count {column}", unit="row", unit_scale=True, file=sys.stderr,
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip


class _RowTooLong(Exception):
    """A CSV row did not fit in one read block."""


def _accumulate(
    chunks: Iterator[_Chunk], column: str, num_embeddings: int, fmt: FileFormat, bar: tqdm
) -> tuple[np.ndarray, int]:
    counts = np.zeros(num_embeddings, dtype=np.int64)
    num_rows = 0
    for arr, src, row0 in chunks:
        kind = kind_of(arr.type, fmt)
        if kind not in ("categorical", "list"):
            raise DataError(
                f"`{src}`, column `{column}` has type {arr.type}, not ids: count a categorical "
                "(integer) or list column"
            )
        if kind == "categorical":
            ids = categorical_ids(arr, src, column, row0)
            rows = np.arange(len(ids))
        else:
            rows, ids = list_ids(arr, src, column, row0)
        too_big = ids >= num_embeddings
        if too_big.any():
            i = first_true(too_big)
            raise DataError(
                f"`{src}`, column `{column}`, row {row0 + int(rows[i])}: id {ids[i]} is "
                f"outside [0, {num_embeddings}): pass num_embeddings > {ids.max()} "
                "(the table's row count) or re-encode the column"
            )
        counts += np.bincount(ids, minlength=num_embeddings)
        num_rows += len(arr)
        bar.update(len(arr))
    return counts, num_rows


def _csv_batches(path: Path, column: str, block_size: int) -> Iterator[_Chunk]:
    # Read as text: a list column's first block may hold only single ids, which type inference
    # would take for integers and then fail on the first `a|b` further down.
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block_size),
            convert_options=pacsv.ConvertOptions(
                include_columns=[column], column_types={column: pa.string()}
            ),
        )
        row0 = 0
        for batch in reader:
            yield batch.column(0), str(path), row0
            row0 += batch.num_rows
    except pa.ArrowInvalid as exc:
        if "straddl" in str(exc):
            raise _RowTooLong() from None
        raise DataError(f"cannot read `{path}` as CSV: {first_line(exc)}") from None


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"`{path}` is empty: write a header line and rows")
    return header


def _csv_block_size(path: Path, batch_rows: int) -> int:
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    lines = head.splitlines()
    longest = max((len(line) for line in lines), default=0) + 1
    per_row = len(head) / max(len(lines), 1)
    return int(max(batch_rows * per_row, 2 * longest, _MIN_CSV_BLOCK))


def read_counts(path: str | os.PathLike[str], column: str, num_embeddings: int) -> torch.Tensor:
    """Read user-supplied id counts for ``column``.

    Two formats (docs/data.md): a ``.safetensors`` file with one 1-D integer tensor (N,) per
    column name, or a ``.csv`` file for one column with a header ``id,count`` (ids not listed
    count 0).

    Returns:
        int64 (N,), N = ``num_embeddings``.

    Raises:
        DataError: missing file or tensor, wrong length/shape/dtype, bad or duplicate ids,
            negative counts.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".safetensors", ".csv"):
        raise DataError(
            f"counts file `{p}` has an unknown format `{suffix}`: use `.safetensors` "
            "(one int64 tensor per column) or `.csv` (header `id,count`)"
        )
    if not p.is_file():
        raise DataError(f"counts file `{p}` does not exist: check the path")
    counts = (
        _read_safetensors_counts(p, column, num_embeddings)
        if suffix == ".safetensors"
        else (_read_csv_counts(p, num_embeddings))
    )
    negative = counts < 0
    if bool(negative.any()):
        i = int(torch.nonzero(negative)[0])
        raise DataError(
            f"counts file `{p}`, column `{column}`: id {i} has negative count {int(counts[i])}; "
            "counts are occurrences, >= 0"
        )
    return counts


def _read_safetensors_counts(path: Path, column: str, num_embeddings: int) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if column not in keys:
                raise DataError(
                    f"counts file `{path}` has no tensor `{column}` (tensors: {names_list(keys)}): "
                    "save one int64 tensor per column name"
                )
            t = f.get_tensor(column)
    except DataError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise DataError(f"cannot read counts file `{path}`: {first_line(exc)}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DataError(
            f"counts file `{path}`, tensor `{column}` has dtype {t.dtype}: store counts as int64"
        )
    if t.shape != (num_embeddings,):
        raise DataError(
            f"counts file `{path}`, tensor `{column}` has shape {tuple(t.shape)}, expected "
            f"({num_embeddings},): one count per row of the embedding table"
        )
    return t.to(torch.int64)


def _read_csv_counts(path: Path, num_embeddings: int) -> torch.Tensor:
    try:
        table = pacsv.read_csv(path)
    except pa.ArrowInvalid as exc:
        raise DataError(f"cannot read counts file `{path}`: {first_line(exc)}") from None
    if table.column_names[:2] != ["id", "count"] or table.num_columns != 2:
        raise DataError(
            f"counts file `{path}` has columns {names_list(table.column_names)}: "
            "write exactly the header `id,count`"
        )
    src = str(path)
    ids = categorical_ids(table.column("id").combine_chunks(), src, "id")
    count_col = table.column("count").combine_chunks()
    if not pa.types.is_integer(count_col.type):
        raise DataError(
            f"counts file `{path}`, column `count` has type {count_col.type}: write integer counts"
        )
    values = _count_values(count_col, src)
    too_big = ids >= num_embeddings
    if too_big.any():
        i = first_true(too_big)
        raise DataError(
            f"counts file `{path}`, row {i}: id {ids[i]} is outside [0, {num_embeddings}): "
            "the counts must be for a table of that many rows"
        )
    uniq, first = np.unique(ids, return_index=True)
    if len(uniq) != len(ids):
        dup_mask = np.ones(len(ids), dtype=bool)
        dup_mask[first] = False
        i = first_true(dup_mask)
        raise DataError(
            f"counts file `{path}`, row {i}: id {ids[i]} is listed twice; give each id one row"
        )
    counts = np.zeros(num_embeddings, dtype=np.int64)
    counts[ids] = values
    return torch.from_numpy(counts)


def _count_values(arr: pa.Array, src: str) -> np.ndarray:
    # Negative counts are reported by the caller, with the id they belong to.
    if arr.null_count:
        row = first_true(~np.asarray(arr.is_valid()))
        raise DataError(
            f"counts file `{src}`, column `count`, row {row}: the cell is empty; "
            "write a count for every listed id"
        )
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)
