"""Parquet files of the data contract: finding them, reading their footers, reading a row group.

A folder, a glob or one file names a sorted list of Parquet files (:func:`parquet_files`); their
footers give the common schema and every row group (:func:`parquet_row_groups`) without reading
data pages. The **row group** is the read unit and the unit of data-parallel sharding (rank r of
W reads row groups i with i % W == r); :func:`read_row_group` decodes one ``read_rows`` rows at a
time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from amtl_compress.data.columns import PARQUET_SUFFIXES, first_line
from amtl_compress.errors import DataError

#: Rows decoded from a row group at a time.
READ_ROWS = 1 << 16

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
