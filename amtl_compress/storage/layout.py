"""What a packed table holds and how many bytes it takes: its tensors, their byte split, and the
row prefixes that go into ``values`` (docs/format.md, "Tensors" and "Byte accounting").

Symbols: N rows, D dense width, L_i row i's kept length, S = sum(L_i) stored values. The file
format itself (header, writer, validating reader) is storage/format.py, which re-exports these
names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from amtl_compress.storage.header import CODE_OF, DTYPES
from amtl_compress.storage.quantize import PACKED_DTYPES, QUANTIZED
from amtl_compress.storage.validate import ROTATION_CODES, lengths_code, stored_count


@dataclass(frozen=True)
class TableBytes:
    """A packed table's bytes by part (docs/format.md, "Byte accounting"); header excluded.

    Attributes:
        values: ``values`` (the kept values, or int4 codes two a byte).
        index: the row index: versions 3 and 4's ``lengths`` (0 with ``row_length``),
            versions 1 and 2's ``offsets``.
        row_metadata: int8 ``scale`` + ``bias``, int4 ``scale`` (version 3: + ``bias``).
        rotation: the (D, D) ``rotation`` (+ version 4's int8/int4 ``rotation_scale``).
        dense: N * D * 4, the dense float32 table the ratio is taken against.
    """

    values: int
    index: int
    row_metadata: int
    rotation: int
    dense: int

    @property
    def total(self) -> int:
        """values + index + row_metadata + rotation."""
        return self.values + self.index + self.row_metadata + self.rotation

    @property
    def ratio(self) -> float:
        """total / dense (1.0 for an empty table)."""
        return self.total / self.dense if self.dense else 1.0

    def __add__(self, other: TableBytes) -> TableBytes:
        return TableBytes(
            self.values + other.values, self.index + other.index,
            self.row_metadata + other.row_metadata, self.rotation + other.rotation,
            self.dense + other.dense,
        )

    def to_json(self) -> dict[str, int | float]:
        """The manifest's ``bytes`` entry."""
        return {
            "values": self.values, "index": self.index, "row_metadata": self.row_metadata,
            "rotation": self.rotation, "total": self.total, "dense": self.dense,
            "ratio": round(self.ratio, 4),
        }


def prefix_mask(lengths: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Eq. 1 as a boolean matrix: ``mask[i, j] = j < L_i`` (the paper's j <= k_i, L_i = k_i + 1).

    Args:
        lengths: (r,) int64 kept lengths L_i in [1, D].
        embedding_dim: D.

    Returns:
        (r, D) bool.
    """
    return torch.arange(embedding_dim, device=lengths.device) < lengths.unsqueeze(1)


def kept_values(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows' kept prefixes back to back, in row order: the content of ``values`` (Eq. 1).

    Args:
        rows: (r, D) CPU float32 (any dtype numpy shares).
        lengths: (r,) int64 L_i in [1, D].

    Returns:
        (S,) same dtype, ``cat([rows[i, :L_i] for i])``.
    """
    # numpy's boolean indexing is ~10x faster than torch's on CPU for this gather.
    mask = np.arange(rows.shape[1]) < lengths.numpy()[:, None]
    return torch.from_numpy(rows.numpy()[mask])


def table_layout(
    num_embeddings: int,
    embedding_dim: int,
    num_values: int,
    dtype: str,
    rotated: bool = False,
    row_length: int | None = None,
    rotation_code: str | None = None,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors of a version 4 table, ``(name, dtype code, shape)`` in data order.

    The tensors are ``rotation`` (by dtype: F32 or F16 (``rotation_code``, the one
    ``rotation_encode`` gives; default F32), F16, BF16, or I8 for int8/int4) and its
    ``rotation_scale`` (F16 (D,), int8/int4 only), ``lengths`` (U8/U16/U32 by D; none with
    ``row_length``), int8 ``bias`` and int8/int4 ``scale`` (F16) and ``values``, sorted by item
    size, largest first (ties in that order), so every tensor starts at a multiple of its item
    size (the header is padded to 8 bytes) and ``values`` can be memory-mapped in place.
    """
    n, d = num_embeddings, embedding_dim
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    if rotated:
        code = rotation_code or ROTATION_CODES[dtype][0]
        if code not in ROTATION_CODES[dtype]:
            raise ValueError(f"rotation_code {code!r} is not one of {ROTATION_CODES[dtype]} "
                             f"for dtype {dtype}")
        entries.append(("rotation", code, (d, d)))
        if dtype in QUANTIZED:
            entries.append(("rotation_scale", "F16", (d,)))
    if row_length is None:
        entries.append(("lengths", lengths_code(embedding_dim), (n,)))
    if dtype == "int8":
        entries.append(("bias", "F16", (n,)))
    if dtype in QUANTIZED:
        entries.append(("scale", "F16", (n,)))
    values_code = CODE_OF[PACKED_DTYPES[dtype]]
    entries.append(("values", values_code, (stored_count(num_values, dtype),)))
    # sorted() is stable: equal item sizes keep the order above.
    return sorted(entries, key=lambda e: -DTYPES[e[1]][1].itemsize)


def table_bytes(
    entries: list[tuple[str, str, tuple[int, ...]]] | dict[str, int],
    num_embeddings: int,
    embedding_dim: int,
) -> TableBytes:
    """The byte split of a table from its layout (:func:`table_layout`) or tensor sizes."""
    if isinstance(entries, dict):
        sizes = entries
    else:
        sizes = {name: math.prod(shape) * DTYPES[code][1].itemsize for name, code, shape in entries}
    return TableBytes(
        values=sizes.get("values", 0),
        index=sizes.get("lengths", 0) + sizes.get("offsets", 0),
        row_metadata=sizes.get("scale", 0) + sizes.get("bias", 0),
        rotation=sizes.get("rotation", 0) + sizes.get("rotation_scale", 0),
        dense=num_embeddings * embedding_dim * 4,
    )


def uniform_length(lengths: torch.Tensor) -> int | None:
    """The ``row_length`` of a version 3 or 4 table: L when N >= 1 and every L_i == L, else
    None."""
    if lengths.numel() == 0:
        return None
    first = int(lengths[0])
    return first if bool((lengths == first).all()) else None


