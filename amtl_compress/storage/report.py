"""What :func:`~amtl_compress.storage.pack.pack` reports: sizes per table and in total."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from amtl_compress._text import format_table


@dataclass(frozen=True)
class TableReport:
    """What packing one table produced.

    Attributes:
        field: module path of the table.
        rows: N.
        embedding_dim: D.
        avg_kept: mean kept length sum(L_i) / N (values per row).
        bytes_before: N * D * 4, the dense float32 table.
        bytes_after: bytes of values + offsets (+ scale and bias for int8, + the D x D rotation
            of a version 2 table), header excluded.
        dtype: packed dtype name.
        file: the written file.
        sha256: hex SHA-256 of the written file.
        source_sha256: hex SHA-256 of the source table's bytes (docs/format.md).
    """

    field: str
    rows: int
    embedding_dim: int
    avg_kept: float
    bytes_before: int
    bytes_after: int
    dtype: str
    file: Path
    sha256: str
    source_sha256: str

    @property
    def ratio(self) -> float:
        """bytes_after / bytes_before (1.0 for an empty table)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


@dataclass(frozen=True)
class PackReport:
    """What :func:`pack` produced: one :class:`TableReport` per table plus totals."""

    out_dir: Path
    dtype: str
    tables: list[TableReport] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        """Sum of the tables' dense float32 bytes."""
        return sum(t.bytes_before for t in self.tables)

    @property
    def bytes_after(self) -> int:
        """Sum of the tables' packed bytes."""
        return sum(t.bytes_after for t in self.tables)

    @property
    def ratio(self) -> float:
        """bytes_after / bytes_before over all tables."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def format_table(self) -> str:
        """A plain-text table (one row per table, then the total) for printing."""
        rows = [["table", "rows", "D", "avg kept", "dense fp32", f"packed {self.dtype}", "ratio"]]
        for t in self.tables:
            rows.append([
                t.field, f"{t.rows:,}", str(t.embedding_dim), f"{t.avg_kept:.2f}",
                _human(t.bytes_before), _human(t.bytes_after), f"{t.ratio:.1%}",
            ])
        rows.append([
            "total", f"{sum(t.rows for t in self.tables):,}", "", "",
            _human(self.bytes_before), _human(self.bytes_after), f"{self.ratio:.1%}",
        ])
        return format_table(rows, rules_after=(0, len(rows) - 2))


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
