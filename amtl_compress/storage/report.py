"""What :func:`~amtl_compress.storage.pack.pack` reports: bytes per table, by part, and in total."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from amtl_compress._text import format_table
from amtl_compress.storage.layout import TableBytes


class _Totals:
    """``bytes_before`` / ``bytes_after`` / ``ratio`` of a report, read from its ``stored``."""

    stored: TableBytes

    @property
    def bytes_before(self) -> int:
        """The dense float32 bytes, N * D * 4 (summed over the tables of a pack)."""
        return self.stored.dense

    @property
    def bytes_after(self) -> int:
        """The packed bytes: values + index + per-row metadata + rotation."""
        return self.stored.total

    @property
    def ratio(self) -> float:
        """bytes_after / bytes_before (1.0 for an empty table)."""
        return self.stored.ratio


@dataclass(frozen=True)
class TableReport(_Totals):
    """What packing one table produced.

    Attributes:
        field: module path of the table.
        rows: N.
        embedding_dim: D.
        avg_kept: mean kept length sum(L_i) / N (values per row).
        stored: the file's bytes by part (values / index, i.e. the ``lengths`` tensor, 0 with
            ``row_length`` / per-row metadata / rotation; header excluded) and the dense float32
            bytes N * D * 4 (docs/format.md, "Byte accounting").
        dtype: packed dtype name.
        file: the written file.
        sha256: hex SHA-256 of the written file.
        source_sha256: hex SHA-256 of the source table's bytes (docs/format.md).
    """

    field: str
    rows: int
    embedding_dim: int
    avg_kept: float
    stored: TableBytes
    dtype: str
    file: Path
    sha256: str
    source_sha256: str


@dataclass(frozen=True)
class PackReport(_Totals):
    """What :func:`pack` produced: one :class:`TableReport` per table plus totals."""

    out_dir: Path
    dtype: str
    tables: list[TableReport] = field(default_factory=list)

    @property
    def stored(self) -> TableBytes:
        """The tables' bytes by part, summed."""
        return sum((t.stored for t in self.tables), TableBytes(0, 0, 0, 0, 0))

    def format_table(self) -> str:
        """A plain-text table (one row per table, then the total) for printing; "index" is the
        row lengths tensor."""
        rows = [["table", "rows", "D", "avg kept", "dense fp32", "values", "index", "row meta",
                 "rotation", f"packed {self.dtype}", "ratio"]]
        for t in self.tables:
            rows.append([t.field, f"{t.rows:,}", str(t.embedding_dim), f"{t.avg_kept:.2f}",
                         *_parts(t.stored)])
        rows.append(["total", f"{sum(t.rows for t in self.tables):,}", "", "",
                     *_parts(self.stored)])
        return format_table(rows, rules_after=(0, len(rows) - 2))


def _parts(b: TableBytes) -> list[str]:
    return [_human(b.dense), _human(b.values), _human(b.index), _human(b.row_metadata),
            _human(b.rotation), _human(b.total), f"{b.ratio:.1%}"]


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
