"""Turning Arrow columns into id and value arrays, with the data contract's checks.

Shared by :mod:`amtl_compress.data.dataset` (whole file in memory) and
:mod:`amtl_compress.data.counts` (streamed batches). Rows in error messages are 0-based data rows
(a CSV header is not counted), offset by ``row0`` when the array is one batch of a larger file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from amtl_compress.errors import DataError

ColumnKind = Literal["categorical", "dense", "list"]
FileFormat = Literal["parquet", "csv"]

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)


def file_format(path: str | os.PathLike[str]) -> FileFormat:
    """Return the format of a data file from its suffix; raise DataError if missing or unknown."""
    p = Path(path)
    # Existence first: a missing folder has no suffix, and "unknown format" would mislead.
    if p.is_dir():
        raise DataError(
            f"`{p}` is a folder, not a data file: open a folder of Parquet files with "
            "`open_data` (streamed), or name one file"
        )
    if not p.is_file():
        raise DataError(f"data file `{p}` does not exist: check the path")
    suffix = p.suffix.lower()
    if suffix not in PARQUET_SUFFIXES + CSV_SUFFIXES:
        accepted = ", ".join(f"`{s}`" for s in PARQUET_SUFFIXES + CSV_SUFFIXES)
        raise DataError(
            f"`{p}` has an unknown data format `{suffix or '(no suffix)'}`: "
            f"write it as Parquet or CSV with one of the suffixes {accepted}"
        )
    return "parquet" if suffix in PARQUET_SUFFIXES else "csv"


def kind_of(arrow_type: pa.DataType, file_fmt: FileFormat) -> ColumnKind | None:
    """The contract kind of an Arrow column type, or None if the contract has no place for it.

    In CSV a list column is text holding ``|``-separated ids, so strings count as lists there.
    """
    if pa.types.is_integer(arrow_type):
        return "categorical"
    if pa.types.is_floating(arrow_type):
        return "dense"
    if (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and (
        pa.types.is_integer(arrow_type.value_type)
    ):
        return "list"
    if file_fmt == "csv" and (
        pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
    ):
        return "list"
    return None


def first_true(mask: np.ndarray) -> int:
    """Index of the first true entry of a non-empty boolean mask that has one."""
    return int(np.flatnonzero(mask)[0])


def check_no_nulls(arr: pa.Array, source: str, column: str, row0: int = 0) -> None:
    """Raise DataError naming the first empty (null) cell of ``arr``."""
    if arr.null_count:
        row = row0 + first_true(~np.asarray(arr.is_valid()))
        raise DataError(
            f"`{source}`, column `{column}`, row {row}: the cell is empty (null); "
            "fill it or drop the row"
        )


def categorical_ids(arr: pa.Array, source: str, column: str, row0: int = 0) -> np.ndarray:
    """int64 ids (rows,) of an integer column; nulls and negative ids raise DataError."""
    check_no_nulls(arr, source, column, row0)
    try:
        ids = pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as exc:  # uint64 beyond int64
        raise DataError(
            f"`{source}`, column `{column}`: an id does not fit in int64 ({exc}); "
            "re-encode the column to ids in [0, N)"
        ) from None
    ids = np.array(ids, dtype=np.int64)  # a writable copy: torch.from_numpy shares it
    _check_non_negative(ids, None, source, column, row0)
    return ids


def list_ids(
    arr: pa.Array, source: str, column: str, row0: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten a list column into ``(rows, values)``, both int64 (nnz,), rows non-decreasing.

    ``arr`` is an Arrow list<int> array, or (CSV) a string array whose cells hold ids separated by
    ``|``; an empty cell is an empty list. ``rows`` are relative to ``arr`` (add ``row0`` for the
    file row). Null lists, null elements, text that is not an id, and negative ids raise
    DataError. Id 0 (padding) is not checked here: callers decide.
    """
    check_no_nulls(arr, source, column, row0)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return _split_id_strings(arr, source, column, row0)
    values = pc.list_flatten(arr)
    rows = np.asarray(pc.list_parent_indices(arr).to_numpy(zero_copy_only=False), dtype=np.int64)
    if values.null_count:
        row = row0 + int(rows[first_true(~np.asarray(values.is_valid()))])
        raise DataError(
            f"`{source}`, column `{column}`, row {row}: the list holds an empty (null) element; "
            "drop null elements from the lists"
        )
    ids = np.asarray(pc.cast(values, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    _check_non_negative(ids, rows, source, column, row0)
    return rows, ids


def _split_id_strings(
    arr: pa.Array, source: str, column: str, row0: int
) -> tuple[np.ndarray, np.ndarray]:
    parts = pc.split_pattern(arr, "|")
    pieces = pc.list_flatten(parts)
    rows = np.asarray(pc.list_parent_indices(parts).to_numpy(zero_copy_only=False), dtype=np.int64)
    # "" splits into [""]: that piece stands for an empty list, not for a missing id.
    empty_cell = np.asarray(pc.equal(arr, "").to_numpy(zero_copy_only=False), dtype=bool)
    keep = ~empty_cell[rows]
    pieces = pieces.filter(pa.array(keep))
    rows = rows[keep]
    pieces = pc.utf8_trim_whitespace(pieces)
    try:
        ids = pc.cast(pieces, pa.int64())
    except pa.ArrowInvalid:
        ok = np.asarray(
            pc.match_substring_regex(pieces, r"^[+-]?[0-9]+$").to_numpy(zero_copy_only=False),
            dtype=bool,
        )
        row = int(rows[first_true(~ok)]) if (~ok).any() else 0
        cell = arr[row].as_py()
        raise DataError(
            f"`{source}`, column `{column}`, row {row0 + row}: `{cell}` is text, not integer ids; "
            "index-encode the column to integer ids (a list column holds ids separated by `|`)"
        ) from None
    ids_np = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64)
    _check_non_negative(ids_np, rows, source, column, row0)
    return rows, ids_np


def _check_non_negative(
    ids: np.ndarray, rows: np.ndarray | None, source: str, column: str, row0: int
) -> None:
    """Raise DataError naming the first negative id; ``rows[i]`` is id i's row (None: i)."""
    negative = ids < 0
    if negative.any():
        i = first_true(negative)
        row = row0 + (i if rows is None else int(rows[i]))
        raise DataError(
            f"`{source}`, column `{column}`, row {row}: id {ids[i]} is negative; "
            "re-encode the column to ids in [0, N)"
        )


def label_values(arr: pa.Array, source: str, label: str, row0: int = 0) -> np.ndarray:
    """float32 (rows,) labels; nulls, non-numeric types and values other than 0/1 raise."""
    check_no_nulls(arr, source, label, row0)
    t = arr.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise DataError(
            f"`{source}`, column `{label}` has type {t}: the label must be 0 or 1 "
            "(int, float or bool)"
        )
    values = np.asarray(arr.to_numpy(zero_copy_only=False)).astype(np.float64)
    bad = (values != 0) & (values != 1)
    if bad.any():
        i = first_true(bad)
        raise DataError(
            f"`{source}`, column `{label}`, row {row0 + i}: label {values[i]:g} is not 0 or 1; "
            "binarize the label (e.g. rating >= 4)"
        )
    return values.astype(np.float32)


def dense_values(arr: pa.Array, source: str, column: str, row0: int = 0) -> np.ndarray:
    """float32 (rows,) values of a float column; nulls and values not finite as float32 raise."""
    check_no_nulls(arr, source, column, row0)
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
        values = np.asarray(arr.to_numpy(zero_copy_only=False)).astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        i = first_true(bad)
        raise DataError(
            f"`{source}`, column `{column}`, row {row0 + i}: value {arr[i].as_py()} is not "
            "finite (as float32); replace NaN/inf, e.g. by 0 plus a missing-indicator column"
        )
    return values


#: The list paddings a data set can use: 0 (``nn.EmbeddingBag(padding_idx=0)``, ids from 1) or
#: -1 (every id >= 0 is a real row; models read the lengths, docs/data.md).
LIST_PADDINGS = (0, -1)


def check_list_padding(list_padding: int) -> None:
    """Raise DataError unless ``list_padding`` is one of :data:`LIST_PADDINGS`."""
    if isinstance(list_padding, bool) or list_padding not in LIST_PADDINGS:
        raise DataError(
            f"`list_padding={list_padding!r}` is not supported: use 0 (id 0 pads, lists hold ids "
            "from 1) or -1 (-1 pads, id 0 is a real row)"
        )


def bag_ids(
    arr: pa.Array, source: str, column: str, row0: int = 0, list_padding: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`list_ids` for a model input; with ``list_padding`` 0 it also refuses id 0, the
    ``EmbeddingBag`` padding row (with -1 every id >= 0 is a real row)."""
    rows, values = list_ids(arr, source, column, row0)
    if list_padding != 0:
        return rows, values
    zero = values == 0
    if zero.any():
        raise DataError(
            f"`{source}`, column `{column}`, row {row0 + int(rows[first_true(zero)])}: list id 0 "
            "is reserved for padding; shift the column's ids to start at 1, or run a model that "
            "reads list lengths (`adapter=\"dlrm\"`, docs/dlrm.md), whose lists keep id 0"
        )
    return rows, values


def pad_lists(
    rows: np.ndarray, values: np.ndarray, num_rows: int, list_padding: int = 0
) -> np.ndarray:
    """Pack flattened lists into an int64 (num_rows, L) matrix padded with ``list_padding``.

    ``rows`` must be non-decreasing (as :func:`list_ids` returns them). ``L`` is the longest list,
    at least 1, so a column of empty lists is still a valid ``nn.EmbeddingBag`` input.

    Example: rows ``[0, 0, 2]``, values ``[4, 7, 5]``, num_rows 3 -> ``[[4, 7], [0, 0], [5, 0]]``.
    """
    lengths = np.bincount(rows, minlength=num_rows) if len(rows) else np.zeros(num_rows, np.int64)
    width = max(int(lengths.max(initial=0)), 1)
    out = np.full((num_rows, width), list_padding, dtype=np.int64)
    # rows is sorted, so an element's slot is its index minus the index of its row's first one.
    slot = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
    out[rows, slot] = values
    return out


def names_list(names: Iterable[str]) -> str:
    """Names for an error message: ```a`, `b```."""
    return ", ".join(f"`{n}`" for n in names)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
