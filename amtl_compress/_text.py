"""Plain-text tables for the CLI and reports."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[Sequence[str]], rules_after: Sequence[int] = (0,)) -> str:
    """Align ``rows`` in columns: the first column left-aligned, the others right-aligned.

    Args:
        rows: the header row first; every row has the same number of cells.
        rules_after: indices of rows to draw a dashed rule under (the header by default).
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if j in rules_after:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
