"""Many Parquet files (a folder or a glob) streamed in batches, never read whole.

The read unit is a Parquet **row group** (data/parquet.py), in file-path order then row-group
order; it is also the unit of data-parallel sharding (rank r of W reads row groups i with
i % W == r). Memory holds at most one row group's pages (pyarrow decodes them ``read_rows`` rows at
a time) plus the batch or shuffle buffer (data/block.py), so it does not grow with the number of
files or rows.

:func:`open_data` picks :class:`~amtl_compress.data.dataset.TabularData` for one file and
:class:`ParquetDataset` for a folder or glob.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from amtl_compress.data.block import Block
from amtl_compress.data.columns import (
    ColumnKind,
    bag_ids,
    categorical_ids,
    check_list_padding,
    dense_values,
    first_true,
    kind_of,
    label_values,
    names_list,
)
from amtl_compress.data.dataset import (
    Batch,
    ColumnKinds,
    CTRData,
    TabularData,
    check_batch_size,
    check_rank,
)
from amtl_compress.data.parquet import (
    READ_ROWS,
    RowGroup,
    is_multi_file,
    parquet_files,
    parquet_row_groups,
    read_row_group,
)
from amtl_compress.errors import DataError

# The Parquet file helpers keep this module as a public home too.
__all__ = [
    "READ_ROWS",
    "SHUFFLE_BUFFER",
    "ParquetDataset",
    "RowGroup",
    "is_multi_file",
    "open_data",
    "parquet_files",
    "parquet_row_groups",
    "read_row_group",
]

#: Rows the shuffle buffer holds before it is permuted and cut into batches.
SHUFFLE_BUFFER = 1 << 16


class ParquetDataset(ColumnKinds):
    """Parquet files of the data contract (docs/data.md), streamed. Build it with :meth:`open`.

    Batches are those of :class:`~amtl_compress.data.dataset.TabularData` (same keys and dtypes:
    categorical int64 (B,), dense float32 (B,), list int64 (B, L), labels float32 (B,)) except
    that L is the longest list **of the batch** (0 = padding), not of the whole data.

    Attributes:
        path: the folder or glob given.
        label: name of the label column.
        row_groups: every row group in reading order (file path, then index in the file).
        read_rows: rows decoded from a row group at a time.
        shuffle_buffer: rows permuted together when shuffling (see :meth:`batches`).
    """

    def __init__(
        self,
        path: Path,
        label: str,
        kinds: dict[str, ColumnKind],
        row_groups: list[RowGroup],
        read_rows: int = READ_ROWS,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        list_padding: int = 0,
    ) -> None:
        check_list_padding(list_padding)
        if read_rows < 1 or shuffle_buffer < 1:
            raise ValueError(
                f"read_rows and shuffle_buffer must be >= 1, got {read_rows}, {shuffle_buffer}"
            )
        self.path = path
        self.label = label
        self.row_groups = row_groups
        self.read_rows = read_rows
        self.shuffle_buffer = shuffle_buffer
        self.list_padding = list_padding
        self._kinds = kinds

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        label: str = "label",
        read_rows: int = READ_ROWS,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        list_padding: int = 0,
    ) -> ParquetDataset:
        """Open a folder of Parquet files, a glob such as ``data/*.parquet``, or one Parquet file.

        Reads only the files' footers: schema, row counts. Cell values are checked as batches are
        read (labels 0/1, no nulls, finite dense values, ids >= 0, list ids >= 1 unless
        ``list_padding`` is -1), and errors name the file and its row. ``list_padding``: see
        :meth:`TabularData.open`.

        Raises:
            DataError: see :func:`parquet_row_groups`; also a missing label column or a column
                type the contract has no place for.
        """
        p = Path(path)
        schema, groups = parquet_row_groups(p)
        if label not in schema.names:
            raise DataError(
                f"`{p}` has no label column `{label}` (columns: {names_list(schema.names)}): "
                "add it or pass the label column's name as `label`"
            )
        kinds: dict[str, ColumnKind] = {}
        for field in schema:
            if field.name == label:
                continue
            kind = kind_of(field.type, "parquet")
            if kind is None:
                raise DataError(
                    f"`{groups[0].file}`, column `{field.name}` has type {field.type}, which no "
                    "model input takes: index-encode it to int64 ids in [0, N), or store floats "
                    "as float32"
                )
            kinds[field.name] = kind
        return cls(p, label, kinds, groups, read_rows, shuffle_buffer, list_padding)

    @property
    def num_rows(self) -> int:
        """Rows of all files together, from their footers."""
        return sum(g.rows for g in self.row_groups)

    def shard_rows(self, world_size: int) -> list[int]:
        """Rows of each rank's shard: rank r holds row groups i with i % world_size == r.

        Raises:
            DataError: fewer row groups than ``world_size``.
        """
        check_rank(0, world_size)
        if world_size > len(self.row_groups):
            raise DataError(
                f"`{self.path}` has {len(self.row_groups)} row groups, fewer than world_size "
                f"{world_size}: each rank reads whole row groups; write more, smaller row groups "
                "(pyarrow.parquet.write_table(..., row_group_size=...)) or use fewer processes"
            )
        return [sum(g.rows for g in self.row_groups[r::world_size]) for r in range(world_size)]

    def num_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
        """Batches :meth:`batches` yields: ceil(smallest shard's rows / ``batch_size``).

        The same on every rank, computed from footers alone.
        """
        check_batch_size(batch_size)
        check_rank(rank, world_size)
        return -(-min(self.shard_rows(world_size)) // batch_size)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Yield rank ``rank``'s ``(features, labels)`` batches, reading one row group at a time.

        Without ``shuffle`` and with ``world_size`` 1 these are the batches of the files
        concatenated in path order (B rows each, the last one smaller). With ``world_size`` W,
        rank r reads row groups i with i % W == r and stops after as many rows as the smallest
        shard holds, so every rank yields :meth:`num_batches` batches of the same sizes; the
        rows of larger shards past that point are dropped this epoch (with ``shuffle``, different
        rows each epoch).

        ``shuffle`` permutes the order of the rank's row groups, then permutes rows within a
        buffer of ``shuffle_buffer`` rows (default 65,536) that fills as row groups are read;
        rows further apart than that are never swapped, which bounds memory. Both permutations
        come from ``numpy.random.default_rng`` seeded by ``(seed, rank)``, so the same seed gives
        the same batches on every machine; pass a new seed each epoch.

        Raises:
            ValueError: ``batch_size`` < 1 or a bad ``rank``/``world_size``.
            DataError: fewer row groups than ``world_size``; a bad cell (naming file and row).
        """
        check_batch_size(batch_size)
        check_rank(rank, world_size)
        remaining = min(self.shard_rows(world_size))
        groups = self.row_groups[rank::world_size]
        rng = np.random.default_rng([rank, seed % (1 << 64)]) if shuffle else None
        if rng is not None:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        capacity = max(self.shuffle_buffer, batch_size) if shuffle else batch_size
        blocks = self._blocks(groups, self.columns, with_labels=True)
        pending: list[Block] = []
        pending_rows = 0
        try:
            while remaining > 0:
                block = next(blocks, None)
                if block is not None:
                    pending.append(block)
                    pending_rows += block.num_rows
                    if pending_rows < capacity:
                        continue
                elif pending_rows == 0:
                    raise DataError(
                        f"`{self.path}` ended before the rows its footers promised: a file "
                        "changed while it was read; open the data again"
                    )
                buffer = Block.concat(pending)
                n = buffer.num_rows
                order = rng.permutation(n) if rng is not None else np.arange(n)
                # Emit whole batches only; the rest waits for more rows unless the data ended.
                stop = min(n if block is None else n - n % batch_size, remaining)
                for start in range(0, stop, batch_size):
                    rows = order[start : min(start + batch_size, stop)]
                    yield buffer.take(rows).to_batch(self.columns, self.list_padding)
                remaining -= stop
                rest = buffer.take(order[stop:])
                pending, pending_rows = [rest], rest.num_rows
        finally:
            blocks.close()  # closes the open Parquet file now, also when the caller stops early

    def _blocks(
        self, groups: Iterable[RowGroup], columns: tuple[str, ...], with_labels: bool
    ) -> Iterator[Block]:
        """Decoded, validated ``columns`` (and labels) of ``groups``, <= read_rows rows a block."""
        names = [*columns, self.label] if with_labels else list(columns)
        for group in groups:
            src = str(group.file)
            for batch, row0 in read_row_group(group, names, self.read_rows):
                flat: dict[str, np.ndarray] = {}
                lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
                for name in columns:
                    arr = batch.column(name)
                    kind = self._kinds[name]
                    if kind == "categorical":
                        flat[name] = categorical_ids(arr, src, name, row0)
                    elif kind == "dense":
                        flat[name] = dense_values(arr, src, name, row0)
                    else:
                        rows, values = bag_ids(arr, src, name, row0, self.list_padding)
                        lists[name] = (np.bincount(rows, minlength=len(arr)), values)
                if with_labels:
                    labels = label_values(batch.column(self.label), src, self.label, row0)
                else:  # placeholders, so that the block still knows its row count
                    labels = np.zeros(batch.num_rows, dtype=np.float32)
                yield Block(flat, lists, labels)

    def _ids(self, column: str) -> Iterator[tuple[RowGroup, int, np.ndarray, np.ndarray]]:
        """``(row group, file row of the chunk, ids (k,), chunk row of each id (k,))`` chunks."""
        kind = self._id_kind(column)
        for group in self.row_groups:
            src = str(group.file)
            for batch, row0 in read_row_group(group, [column], self.read_rows):
                arr = batch.column(0)
                if kind == "categorical":
                    ids = categorical_ids(arr, src, column, row0)
                    yield group, row0, ids, np.arange(len(ids))
                else:
                    rows, ids = bag_ids(arr, src, column, row0, self.list_padding)
                    yield group, row0, ids, rows

    def max_id(self, column: str) -> int:
        """Largest id in categorical or list column ``column`` (0 if its lists are all empty).

        Streams the column once. Raises DataError for a missing or dense column or a bad cell.
        """
        largest = 0
        for _, _, ids, _ in self._ids(column):
            largest = max(largest, int(ids.max(initial=0)))
        return largest

    def validate_ids(self, column: str, num_embeddings: int) -> None:
        """Check, streaming, that ``column`` fits a table of ``num_embeddings`` rows.

        Categorical ids must lie in [0, N); list ids in [1, N) (0 is padding; [0, N) with
        ``list_padding`` -1), N = ``num_embeddings``. Raises DataError naming the file and file
        row of the first offending id and the table size that would fit (so after an offence the
        scan goes on for the max).
        """
        first_bad: tuple[Path, int, int] | None = None
        largest = 0
        for group, row0, ids, rows in self._ids(column):
            largest = max(largest, int(ids.max(initial=0)))
            if first_bad is None:
                too_big = ids >= num_embeddings
                if too_big.any():
                    i = first_true(too_big)
                    first_bad = (group.file, row0 + int(rows[i]), int(ids[i]))
        if first_bad is not None:
            file, row, bad = first_bad
            raise DataError(
                f"`{file}`, column `{column}`, row {row}: id {bad} is outside "
                f"[0, {num_embeddings}) of its embedding table: use a table of at least "
                f"{largest + 1} rows or re-encode the column"
            )

    def column(self, name: str) -> torch.Tensor:
        """All rows of feature column ``name`` in file order, as one tensor.

        This holds the whole column in memory (O(num_rows), a list column O(num_rows * L) with L
        its longest list): for inspecting data, not for training loops. Prefer :meth:`max_id`
        to size a table.
        """
        self._check_column(name)
        block = Block.concat(list(self._blocks(self.row_groups, (name,), with_labels=False)))
        return block.to_batch((name,), self.list_padding)[0][name]


def open_data(
    path: str | os.PathLike[str],
    label: str = "label",
    csv_kinds: Mapping[str, ColumnKind] | None = None,
    list_padding: int = 0,
) -> CTRData:
    """Open training data: one Parquet/CSV file in memory, or many Parquet files streamed.

    Args:
        path: a ``.parquet``/``.pq``/``.csv`` file (read whole into a
            :class:`~amtl_compress.data.dataset.TabularData`), or a folder of Parquet files or a
            glob such as ``data/part-*.parquet`` (a :class:`ParquetDataset`).
        label: the label column; its values must be 0 or 1.
        csv_kinds: CSV only, see :meth:`TabularData.open`.
        list_padding: 0 (id 0 pads the lists) or -1 (id 0 is a real row), see
            :meth:`TabularData.open`.

    Raises:
        DataError: see :meth:`TabularData.open` and :meth:`ParquetDataset.open`; ``csv_kinds``
            given for a folder or glob.
    """
    if not is_multi_file(path):
        return TabularData.open(path, label=label, csv_kinds=csv_kinds,
                                list_padding=list_padding)
    if csv_kinds:
        raise DataError(
            f"`{path}` is read as Parquet files, whose columns carry their types: drop `csv_kinds`"
        )
    return ParquetDataset.open(path, label=label, list_padding=list_padding)
