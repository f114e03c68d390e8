"""A Parquet or CSV file of the data contract (docs/data.md), held as column tensors.

Also :class:`CTRData`, the surface training code uses, which the streaming
:class:`~amtl_compress.data.stream.ParquetDataset` shares.

The whole file is read into memory. Batches are ``(features, labels)``: ``features`` maps every
column but the label to a tensor (categorical int64 (B,), dense float32 (B,), list int64 (B, L)
padded with 0 to the longest list in the file), ``labels`` is float32 (B,) in {0, 1}.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from amtl_compress.data.columns import (
    ColumnKind,
    FileFormat,
    bag_ids,
    categorical_ids,
    check_list_padding,
    dense_values,
    file_format,
    first_line,
    kind_of,
    label_values,
    names_list,
    pad_lists,
)
from amtl_compress.errors import DataError

_CSV_TYPES: dict[str, pa.DataType] = {
    "categorical": pa.int64(),
    "dense": pa.float64(),
    "list": pa.string(),
}


#: ``(features, labels)``: column -> categorical int64 (B,) / dense float32 (B,) / list int64
#: (B, L) padded with 0; labels float32 (B,) in {0, 1}.
Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


@runtime_checkable
class CTRData(Protocol):
    """What training reads from a data set: :class:`TabularData` (one file, in memory) and
    :class:`~amtl_compress.data.stream.ParquetDataset` (many Parquet files, streamed).

    Both give every rank of a ``world_size`` the same number of batches per epoch (their
    ``num_batches``), with disjoint shards; how rows are split differs (rows vs row groups).
    """

    path: Path
    label: str

    @property
    def columns(self) -> tuple[str, ...]:
        """Feature column names, in file order: the batch keys."""
        ...

    @property
    def categorical_columns(self) -> tuple[str, ...]:
        """Integer id columns, fed as int64 (B,)."""
        ...

    @property
    def dense_columns(self) -> tuple[str, ...]:
        """Float columns, fed as float32 (B,)."""
        ...

    @property
    def list_columns(self) -> tuple[str, ...]:
        """Multi-valued id columns, fed as int64 (B, L) padded with 0."""
        ...

    @property
    def num_rows(self) -> int:
        """Rows of the whole data set (all ranks together)."""
        ...

    def num_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
        """Batches one epoch of :meth:`batches` yields on rank ``rank``; equal on every rank."""
        ...

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """One epoch of rank ``rank``'s ``(features, labels)`` batches."""
        ...

    def validate_ids(self, column: str, num_embeddings: int) -> None:
        """Raise DataError unless ``column``'s ids fit a table of ``num_embeddings`` rows."""
        ...

    def max_id(self, column: str) -> int:
        """Largest id in id column ``column`` (0 for a list column of empty lists)."""
        ...

    def column(self, name: str) -> torch.Tensor:
        """All rows of feature column ``name`` in one tensor (the whole column in memory)."""
        ...


class ColumnKinds:
    """The columns of a data set by kind, shared by :class:`TabularData` and ParquetDataset.

    Subclasses set ``path`` (for messages) and ``_kinds``: feature column -> kind, in file order.
    """

    path: Path
    _kinds: dict[str, ColumnKind]

    @property
    def columns(self) -> tuple[str, ...]:
        """Feature column names (every column but the label), in file order: the batch keys."""
        return tuple(self._kinds)

    @property
    def categorical_columns(self) -> tuple[str, ...]:
        """Integer id columns, fed as int64 (B,)."""
        return self._of_kind("categorical")

    @property
    def dense_columns(self) -> tuple[str, ...]:
        """Float columns, fed as float32 (B,)."""
        return self._of_kind("dense")

    @property
    def list_columns(self) -> tuple[str, ...]:
        """Multi-valued id columns, fed as int64 (B, L) padded with 0."""
        return self._of_kind("list")

    def _of_kind(self, kind: ColumnKind) -> tuple[str, ...]:
        return tuple(name for name, k in self._kinds.items() if k == kind)

    def _check_column(self, name: str) -> None:
        if name not in self._kinds:
            raise DataError(
                f"`{self.path}` has no column `{name}` (columns: {names_list(self.columns)}): "
                "check the field name"
            )

    def _id_kind(self, column: str) -> ColumnKind:
        """The kind of id column ``column``; DataError if it is missing or holds floats."""
        self._check_column(column)
        kind = self._kinds[column]
        if kind == "dense":
            raise DataError(
                f"`{self.path}`, column `{column}` holds floats, not ids: "
                "map the embedding table to a categorical or list column"
            )
        return kind


class TabularData(ColumnKinds):
    """Column tensors of one data file. Build it with :meth:`TabularData.open`.

    Attributes:
        path: the file read.
        label: name of the label column.
        features: column name -> tensor over all rows: categorical int64 (num_rows,), dense
            float32 (num_rows,), list int64 (num_rows, L) with 0 = padding, L >= 1.
        labels: float32 (num_rows,), values in {0, 1}.
    """

    def __init__(
        self,
        path: Path,
        label: str,
        features: dict[str, torch.Tensor],
        kinds: dict[str, ColumnKind],
        labels: torch.Tensor,
        list_padding: int = 0,
    ) -> None:
        self.path = path
        self.label = label
        self.features = features
        self.labels = labels
        self.list_padding = list_padding
        self._kinds = kinds

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        label: str = "label",
        csv_kinds: Mapping[str, ColumnKind] | None = None,
        list_padding: int = 0,
    ) -> TabularData:
        """Read a Parquet (``.parquet``/``.pq``) or CSV (``.csv``) file whole into memory.

        Args:
            path: the data file.
            label: the label column; its values must be 0 or 1.
            csv_kinds: CSV only: force a column's kind (``"categorical"``, ``"dense"`` or
                ``"list"``) where the text is ambiguous, e.g. a dense column whose values all look
                like integers, or a list column whose rows all hold one id. Parquet columns carry
                their types, so this must be empty for Parquet.
            list_padding: what pads the lists of a batch: 0 (the default; list ids start at 1,
                ``nn.EmbeddingBag(padding_idx=0)``) or -1 (id 0 is a real row; for models that
                take lengths/offsets, e.g. ``adapter="dlrm"``, docs/dlrm.md).

        Raises:
            DataError: missing/unknown/empty file, missing label column, labels outside {0, 1},
                NaN/inf in a dense column, negative ids, id 0 in a list column (reserved for
                padding when ``list_padding`` is 0), empty cells, or a column type the contract
                has no place for.
        """
        check_list_padding(list_padding)
        p = Path(path)
        fmt = file_format(p)
        csv_kinds = dict(csv_kinds or {})
        if csv_kinds and fmt != "csv":
            raise DataError(f"`{p}` is Parquet, whose columns carry their types: drop `csv_kinds`")
        table = _read_table(p, fmt, csv_kinds)
        src = str(p)
        unknown = [k for k in csv_kinds if k not in table.column_names]
        if unknown:
            raise DataError(
                f"`csv_kinds` names column `{unknown[0]}`, which `{src}` lacks "
                f"(columns: {names_list(table.column_names)}): fix the name"
            )
        if table.num_rows == 0:
            raise DataError(f"`{src}` has no rows: write at least one row of data")
        if label not in table.column_names:
            raise DataError(
                f"`{src}` has no label column `{label}` "
                f"(columns: {names_list(table.column_names)}): "
                "add it or pass the label column's name as `label`"
            )
        labels = torch.from_numpy(label_values(table.column(label).combine_chunks(), src, label))
        features: dict[str, torch.Tensor] = {}
        kinds: dict[str, ColumnKind] = {}
        for name in table.column_names:
            if name == label:
                continue
            arr = table.column(name).combine_chunks()
            kind = kind_of(arr.type, fmt)
            if kind is None:
                raise DataError(
                    f"`{src}`, column `{name}` has type {arr.type}, which no model input takes: "
                    "index-encode it to int64 ids in [0, N), or store floats as float32"
                )
            kinds[name] = kind
            features[name] = _column_tensor(arr, kind, src, name, list_padding)
        return cls(p, label, features, kinds, labels, list_padding)

    @property
    def num_rows(self) -> int:
        """Number of rows in the file."""
        return int(self.labels.shape[0])

    def column(self, name: str) -> torch.Tensor:
        """All rows of feature column ``name``, as in :attr:`features`; DataError if absent."""
        self._check_column(name)
        return self.features[name]

    def num_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
        """Batches :meth:`batches` yields for these arguments (the last one may be smaller).

        The same on every rank: each rank reads ``num_rows // world_size`` rows.
        """
        check_batch_size(batch_size)
        return math.ceil(self._shard_rows(rank, world_size) / batch_size)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Yield ``(features, labels)`` batches covering rank ``rank``'s share of the rows once.

        ``features`` maps each column to a tensor of B rows (see the class docstring), ``labels``
        is float32 (B,). B is ``batch_size`` except for a smaller last batch. With ``shuffle`` the
        row order is a permutation drawn from ``seed`` alone, so the same seed gives the same
        batches on every machine; pass a different seed per epoch for fresh orders.

        Sharding (data-parallel training, e.g. torchrun): the row order above is the same on
        every rank; rank ``r`` of ``world_size`` W takes its positions r, r + W, r + 2W, ...,
        truncated to ``num_rows // W`` rows. Every rank thus gets the same number of rows and
        batches (DDP hangs if ranks run different step counts), the shards are disjoint, and the
        last ``num_rows % W`` positions of the order (fewer than W rows) are dropped that epoch;
        with ``shuffle`` they are different rows each epoch. W = 1 yields every row.

        Raises:
            ValueError: ``batch_size`` < 1, ``world_size`` < 1, or ``rank`` outside [0, W).
            DataError: the file has fewer rows than ``world_size``.
        """
        check_batch_size(batch_size)
        shard_rows = self._shard_rows(rank, world_size)
        if shuffle:
            gen = torch.Generator().manual_seed(seed)
            order: torch.Tensor | None = torch.randperm(self.num_rows, generator=gen)
        else:
            order = None
        if world_size > 1:
            # Index tensors, not strided slices, so every rank's batches are contiguous copies.
            positions = torch.arange(rank, shard_rows * world_size, world_size)
            order = positions if order is None else order[positions]
        for start in range(0, shard_rows, batch_size):
            if order is None:
                idx: slice | torch.Tensor = slice(start, start + batch_size)
            else:
                idx = order[start : start + batch_size]
            yield {k: v[idx] for k, v in self.features.items()}, self.labels[idx]

    def _shard_rows(self, rank: int, world_size: int) -> int:
        """Rows each of the ``world_size`` ranks reads per epoch: ``num_rows // world_size``."""
        check_rank(rank, world_size)
        if self.num_rows < world_size:
            raise DataError(
                f"`{self.path}` has {self.num_rows} rows, fewer than world_size {world_size}: "
                "give every rank at least one row (more data or fewer processes)"
            )
        return self.num_rows // world_size

    def max_id(self, column: str) -> int:
        """Largest id in categorical or list column ``column`` (0 for lists that are all empty).

        Raises:
            DataError: no such column, or a dense column.
        """
        self._id_kind(column)
        return int(self.features[column].max())

    def validate_ids(self, column: str, num_embeddings: int) -> None:
        """Check that ``column`` fits a table of ``num_embeddings`` rows.

        Categorical ids must lie in [0, N); list ids in [1, N) (0 is padding; [0, N) with
        ``list_padding`` -1), N = ``num_embeddings``. Raises DataError naming the first
        offending row.
        """
        self._id_kind(column)
        ids = self.features[column]
        too_big = ids >= num_embeddings
        if bool(too_big.any()):
            flat = int(torch.nonzero(too_big.reshape(-1))[0])
            row = flat // ids.shape[1] if ids.dim() == 2 else flat
            bad = int(ids.reshape(-1)[flat])
            raise DataError(
                f"`{self.path}`, column `{column}`, row {row}: id {bad} is outside "
                f"[0, {num_embeddings}) of its embedding table: use a table of at least "
                f"{int(ids.max()) + 1} rows or re-encode the column"
            )


def _read_table(path: Path, fmt: FileFormat, csv_kinds: dict[str, ColumnKind]) -> pa.Table:
    for name, kind in csv_kinds.items():
        if kind not in _CSV_TYPES:
            raise DataError(
                f"`csv_kinds` gives column `{name}` the kind `{kind}`: use one of "
                "`categorical`, `dense`, `list`"
            )
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        convert = pacsv.ConvertOptions(
            column_types={k: _CSV_TYPES[v] for k, v in csv_kinds.items()}
        )
        return pacsv.read_csv(path, convert_options=convert)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise DataError(f"`{path}` is empty: write a header line and rows") from None
        raise DataError(
            f"cannot read `{path}` as {fmt} ({first_line(exc)}); write the file again"
        ) from None
    except OSError as exc:
        raise DataError(
            f"cannot read `{path}` as {fmt} ({first_line(exc)}); write the file again"
        ) from None


def _column_tensor(
    arr: pa.Array, kind: ColumnKind, src: str, name: str, list_padding: int = 0
) -> torch.Tensor:
    if kind == "categorical":
        return torch.from_numpy(categorical_ids(arr, src, name))
    if kind == "dense":
        return torch.from_numpy(dense_values(arr, src, name))
    rows, values = bag_ids(arr, src, name, list_padding=list_padding)
    return torch.from_numpy(pad_lists(rows, values, len(arr), list_padding))


def check_rank(rank: int, world_size: int) -> None:
    """Raise ValueError unless ``world_size >= 1`` and ``0 <= rank < world_size``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def check_batch_size(batch_size: int) -> None:
    """Raise ValueError unless ``batch_size >= 1``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
