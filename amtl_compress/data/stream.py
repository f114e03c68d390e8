"""Many Parquet files (a folder or a glob) streamed in batches, never read whole.

The read unit is a Parquet **row group**, in file-path order then row-group order; it is also the
unit of data-parallel sharding (rank r of W reads row groups i with i % W == r). Memory holds at
most one row group's pages (pyarrow decodes them ``read_rows`` rows at a time) plus the batch or
shuffle buffer, so it does not grow with the number of files or rows.

:func:`open_data` picks :class:`~amtl_compress.data.dataset.TabularData` for one file and
:class:`ParquetDataset` for a folder or glob.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from amtl_compress.data.columns import (
    PARQUET_SUFFIXES,
    ColumnKind,
    bag_ids,
    categorical_ids,
    dense_values,
    first_line,
    first_true,
    kind_of,
    label_values,
    names_list,
    pad_lists,
)
from amtl_compress.data.dataset import (
    Batch,
    ColumnKinds,
    CTRData,
    TabularData,
    check_batch_size,
    check_rank,
)
from amtl_compress.errors import DataError

#: Rows decoded from a row group at a time.
READ_ROWS = 1 << 16
#: Rows the shuffle buffer holds before it is permuted and cut into batches.
SHUFFLE_BUFFER = 1 << 16

_GLOB_CHARS = ("*", "?", "[")


class RowGroup(NamedTuple):
    """One Parquet row group: the read and sharding unit.

    Attributes:
        file: the Parquet file.
        index: the row group's index in the file.
        rows: its number of rows (from the footer, no data read).
        row0: the file row of its first row (rows in error messages are file rows).
        metadata: the file's footer, shared by its row groups, so reopening skips re-reading it.
    """

    file: Path
    index: int
    rows: int
    row0: int
    metadata: pq.FileMetaData


def is_multi_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` names a folder, or is a glob pattern rather than an existing file."""
    p = Path(path)
    return p.is_dir() or (not p.exists() and any(c in str(path) for c in _GLOB_CHARS))


def parquet_files(path: str | os.PathLike[str]) -> list[Path]:
    """The Parquet files of a folder, a glob or a single file, sorted by path.

    In a folder, names starting with ``.`` or ``_`` are skipped (hidden files, Spark/Hive markers
    such as ``_SUCCESS``); every other entry must be a ``.parquet``/``.pq`` file.

    Raises:
        DataError: no such path, an empty folder, a glob matching nothing, a sub-folder, or a
            file that is not Parquet.
    """
    p = Path(path)
    text = str(path)
    if p.is_dir():
        files = []
        for entry in sorted(p.iterdir()):
            if entry.name.startswith((".", "_")):
                continue
            if entry.is_dir():
                raise DataError(
                    f"`{entry}` is a folder inside data folder `{p}`: sub-folders are not read; "
                    "move its Parquet files up or pass a glob such as `data/*/*.parquet`"
                )
            _check_parquet_suffix(entry, f"in data folder `{p}`")
            files.append(entry)
        if not files:
            raise DataError(
                f"data folder `{p}` holds no Parquet files: write `.parquet` files into it "
                "or check the path"
            )
        return files
    if p.is_file():
        _check_parquet_suffix(p, "")
        return [p]
    if any(c in text for c in _GLOB_CHARS):
        # Path.glob takes no absolute patterns; split off the longest literal folder first.
        root, pattern = _split_glob(p)
        matches = sorted(m for m in root.glob(pattern) if m.is_file())
        if not matches:
            raise DataError(f"`{text}` matches no files: check the pattern and the folder")
        for m in matches:
            _check_parquet_suffix(m, f"matched by `{text}`")
        return matches
    raise DataError(f"data path `{p}` does not exist: check the path")


def _split_glob(p: Path) -> tuple[Path, str]:
    parts = p.parts
    literal = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    root = Path(*parts[:literal]) if literal else Path(".")
    return root, str(Path(*parts[literal:]))


def _check_parquet_suffix(path: Path, where: str) -> None:
    if path.suffix.lower() not in PARQUET_SUFFIXES:
        where = f" {where}" if where else ""
        raise DataError(
            f"`{path}`{where} is not a Parquet file (`.parquet`/`.pq`): streaming reads Parquet "
            "only; remove or convert it, or pass a glob that skips it"
        )


def parquet_row_groups(path: str | os.PathLike[str]) -> tuple[pa.Schema, list[RowGroup]]:
    """Read the footers of :func:`parquet_files` ``(path)``: the common schema and every row group.

    Row groups with no rows are left out. Only footers are read, no data pages.

    Raises:
        DataError: see :func:`parquet_files`; also an unreadable file, a file whose columns or
            types differ from the first file's, or a file with no rows.
    """
    files = parquet_files(path)
    schema = _footer(files[0])[1]
    groups: list[RowGroup] = []
    for f in files:
        meta, file_schema = _footer(f)
        _check_same_schema(f, file_schema, files[0], schema)
        if meta.num_rows == 0:
            raise DataError(f"`{f}` has no rows: remove it or write rows into it")
        row0 = 0
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            if rows:
                groups.append(RowGroup(f, i, rows, row0, meta))
            row0 += rows
    return schema, groups


def _footer(path: Path) -> tuple[pq.FileMetaData, pa.Schema]:
    try:
        with pq.ParquetFile(path) as pf:
            return pf.metadata, pf.schema_arrow
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"cannot read `{path}` as Parquet ({first_line(exc)}): write the file again"
        ) from None


def _check_same_schema(path: Path, schema: pa.Schema, first: Path, expected: pa.Schema) -> None:
    fix = "write every file with the same columns and types"
    got = {f.name: f.type for f in schema}
    want = {f.name: f.type for f in expected}
    for name, t in want.items():
        if name not in got:
            raise DataError(f"`{path}` lacks column `{name}` of `{first}`: {fix}")
        if got[name] != t:
            raise DataError(
                f"`{path}`, column `{name}` has type {got[name]} but {t} in `{first}`: {fix}"
            )
    for name in got:
        if name not in want:
            raise DataError(f"`{path}` has column `{name}`, which `{first}` lacks: {fix}")
    if schema.names != expected.names:
        raise DataError(f"`{path}` orders its columns unlike `{first}`: {fix}")


def read_row_group(
    group: RowGroup, columns: list[str], read_rows: int = READ_ROWS
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Yield ``(record batch of <= read_rows rows, file row of its first row)`` of ``group``.

    Raises:
        DataError: the file cannot be read (changed or truncated since it was opened).
    """
    row0 = group.row0
    try:
        with pq.ParquetFile(group.file, metadata=group.metadata) as pf:
            for batch in pf.iter_batches(
                batch_size=read_rows, row_groups=[group.index], columns=columns, use_threads=False
            ):
                yield batch, row0
                row0 += batch.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"cannot read row group {group.index} of `{group.file}` ({first_line(exc)}): "
            "check that the file is complete and was not rewritten while reading"
        ) from None


@dataclass
class _Block:
    """Decoded, validated rows held by the reader.

    ``flat``: categorical int64 (n,) and dense float32 (n,) columns. ``lists``: a list column as
    ``(lengths (n,), values (nnz,))`` int64, unpadded, so a block costs O(nnz) not O(n * L).
    ``labels``: float32 (n,).
    """

    flat: dict[str, np.ndarray]
    lists: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(blocks: list[_Block]) -> _Block:
        if len(blocks) == 1:
            return blocks[0]
        first = blocks[0]
        return _Block(
            {k: np.concatenate([b.flat[k] for b in blocks]) for k in first.flat},
            {
                k: (
                    np.concatenate([b.lists[k][0] for b in blocks]),
                    np.concatenate([b.lists[k][1] for b in blocks]),
                )
                for k in first.lists
            },
            np.concatenate([b.labels for b in blocks]),
        )

    def take(self, idx: np.ndarray) -> _Block:
        """The rows ``idx`` (int64 (b,)), in that order."""
        lists = {}
        for k, (lengths, values) in self.lists.items():
            starts = np.cumsum(lengths) - lengths
            lens = lengths[idx]
            # Element j of taken row i sits at starts[idx[i]] + j.
            within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
            lists[k] = (lens, values[np.repeat(starts[idx], lens) + within])
        return _Block({k: v[idx] for k, v in self.flat.items()}, lists, self.labels[idx])

    def to_batch(self, columns: tuple[str, ...]) -> Batch:
        """``(features, labels)``; a list column is padded to the longest list of this batch."""
        n = self.num_rows
        features = {}
        for name in columns:
            if name in self.flat:
                features[name] = torch.from_numpy(self.flat[name])
            else:
                lengths, values = self.lists[name]
                rows = np.repeat(np.arange(n), lengths)
                features[name] = torch.from_numpy(pad_lists(rows, values, n))
        return features, torch.from_numpy(self.labels)


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
    ) -> None:
        if read_rows < 1 or shuffle_buffer < 1:
            raise ValueError(
                f"read_rows and shuffle_buffer must be >= 1, got {read_rows}, {shuffle_buffer}"
            )
        self.path = path
        self.label = label
        self.row_groups = row_groups
        self.read_rows = read_rows
        self.shuffle_buffer = shuffle_buffer
        self._kinds = kinds

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        label: str = "label",
        read_rows: int = READ_ROWS,
        shuffle_buffer: int = SHUFFLE_BUFFER,
    ) -> ParquetDataset:
        """Open a folder of Parquet files, a glob such as ``data/*.parquet``, or one Parquet file.

        Reads only the files' footers: schema, row counts. Cell values are checked as batches are
        read (labels 0/1, no nulls, finite dense values, ids >= 0, list ids >= 1), and errors name
        the file and its row.

        Raises:
            DataError: see :func:`parquet_row_groups`; also a missing label column or a column
                type the contract has no place for.
        """
        p = Path(path)
        schema, groups = parquet_row_groups(p)
        if label not in schema.names:
            raise DataError(
                f"`{p}` has no label column `{label}` (columns: {names_list(schema.names)}): "
                "add it or pass the label column's name"
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
        return cls(p, label, kinds, groups, read_rows, shuffle_buffer)

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
        pending: list[_Block] = []
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
                buffer = _Block.concat(pending)
                n = buffer.num_rows
                order = rng.permutation(n) if rng is not None else np.arange(n)
                # Emit whole batches only; the rest waits for more rows unless the data ended.
                stop = min(n if block is None else n - n % batch_size, remaining)
                for start in range(0, stop, batch_size):
                    rows = order[start : min(start + batch_size, stop)]
                    yield buffer.take(rows).to_batch(self.columns)
                remaining -= stop
                rest = buffer.take(order[stop:])
                pending, pending_rows = [rest], rest.num_rows
        finally:
            blocks.close()  # closes the open Parquet file now, also when the caller stops early

    def _blocks(
        self, groups: Iterable[RowGroup], columns: tuple[str, ...], with_labels: bool
    ) -> Iterator[_Block]:
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
                        rows, values = bag_ids(arr, src, name, row0)
                        lists[name] = (np.bincount(rows, minlength=len(arr)), values)
                if with_labels:
                    labels = label_values(batch.column(self.label), src, self.label, row0)
                else:  # placeholders, so that the block still knows its row count
                    labels = np.zeros(batch.num_rows, dtype=np.float32)
                yield _Block(flat, lists, labels)

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
                    rows, ids = bag_ids(arr, src, column, row0)
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

        Categorical ids must lie in [0, N); list ids in [1, N) (0 is padding), N =
        ``num_embeddings``. Raises DataError naming the file and file row of the first offending
        id and the table size that would fit (so after an offence the scan goes on for the max).
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
        block = _Block.concat(list(self._blocks(self.row_groups, (name,), with_labels=False)))
        return block.to_batch((name,))[0][name]


def open_data(
    path: str | os.PathLike[str],
    label: str = "label",
    csv_kinds: Mapping[str, ColumnKind] | None = None,
) -> CTRData:
    """Open training data: one Parquet/CSV file in memory, or many Parquet files streamed.

    Args:
        path: a ``.parquet``/``.pq``/``.csv`` file (read whole into a
            :class:`~amtl_compress.data.dataset.TabularData`), or a folder of Parquet files or a
            glob such as ``data/part-*.parquet`` (a :class:`ParquetDataset`).
        label: the label column; its values must be 0 or 1.
        csv_kinds: CSV only, see :meth:`TabularData.open`.

    Raises:
        DataError: see :meth:`TabularData.open` and :meth:`ParquetDataset.open`; ``csv_kinds``
            given for a folder or glob.
    """
    if not is_multi_file(path):
        return TabularData.open(path, label=label, csv_kinds=csv_kinds)
    if csv_kinds:
        raise DataError(
            f"`{path}` is read as Parquet files, whose columns carry their types: drop `csv_kinds`"
        )
    return ParquetDataset.open(path, label=label)
