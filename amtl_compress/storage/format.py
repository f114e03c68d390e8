"""One packed table per safetensors file: layout, writer and validating reader (docs/format.md).

Symbols: N rows, D dense width, L_i row i's kept length, S = sum(L_i) stored values.

A packed table stores row i's kept prefix (its first L_i values, Eq. 1) back to back in ``values``;
``offsets`` (N + 1, int64) marks where each row starts, torchrec-style::

    rows (D = 4, tails zeroed)     lengths   offsets      values
    [a0 a1 0  0 ]                  2         [0,          [a0 a1
    [b0 0  0  0 ]                  1          2,           b0
    [c0 c1 c2 c3]                  4          3,           c0 c1 c2 c3]
                                              7]
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amtl_compress._io import atomic_path
from amtl_compress.errors import PackedFormatError
from amtl_compress.storage.header import (
    CODE_OF,
    encode_header,
    map_tensor,
    read_header,
    read_tensor,
)
from amtl_compress.storage.quantize import PACKED_DTYPES
from amtl_compress.storage.validate import (
    FIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    MAX_EMBEDDING_DIM,
    REQUIRED_METADATA,
    ROTATED_FORMAT_VERSION,
    SOURCE_DTYPES,
    expected_tensors,
    validate_data,
    validate_layout,
    validate_metadata,
    validate_tensors,
)

# The format's constants are defined beside the checks (storage/validate.py); this module stays
# their public home.
__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "MAX_EMBEDDING_DIM",
    "REQUIRED_METADATA",
    "ROTATED_FORMAT_VERSION",
    "SOURCE_DTYPES",
    "PackedTable",
    "kept_values",
    "prefix_mask",
    "read_packed_table",
    "source_digest",
    "table_header",
    "write_packed_table",
]

@dataclass
class PackedTable:
    """A packed table as read from disk (validated against docs/format.md).

    Attributes:
        values: (S,) float32/float16/bfloat16/int8; row i is ``values[offsets[i]:offsets[i+1]]``.
            Memory-mapped (copy-on-write) when read with ``mmap=True``.
        offsets: (N + 1,) int64, ``offsets[0] == 0``, ``offsets[N] == S``, steps in [1, D].
        scale: (N,) float32 for int8 (``value = float32(q) * scale + bias``), else None.
        bias: (N,) float32 for int8, else None.
        num_embeddings: N.
        embedding_dim: D, the dense width rows are zero-padded back to.
        dtype: name of ``values``' dtype (``float32``, ``float16``, ``bfloat16``, ``int8``).
        field: the module path the table belongs to (e.g. ``embeddings.user_id``).
        metadata: the file's full ``__metadata__`` map.
        rotation: (D, D) float32 R applied to every zero-padded row (``row @ R``), version 2
            files only; None in version 1.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    scale: torch.Tensor | None
    bias: torch.Tensor | None
    num_embeddings: int
    embedding_dim: int
    dtype: str
    field: str
    metadata: dict[str, str]
    rotation: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64 kept lengths L_i = offsets[i + 1] - offsets[i]."""
        return self.offsets[1:] - self.offsets[:-1]


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


def table_header(
    num_embeddings: int,
    embedding_dim: int,
    num_values: int,
    dtype: str,
    field: str,
    source_dtype: str,
    source_sha256: str,
    rotated: bool = False,
) -> tuple[bytes, dict[str, int]]:
    """The header bytes of a packed table and each tensor's absolute file offset.

    Data order is offsets, then (version 2) rotation, then (int8) bias and scale, then values:
    largest alignment first, so every tensor starts at a multiple of its itemsize (the header is
    padded to 8 bytes). ``rotated`` writes a version 2 header with a (D, D) ``rotation``.
    """
    n = num_embeddings
    entries: list[tuple[str, str, tuple[int, ...]]] = [("offsets", "I64", (n + 1,))]
    if rotated:
        entries.append(("rotation", "F32", (embedding_dim, embedding_dim)))
    if dtype == "int8":
        entries += [("bias", "F32", (n,)), ("scale", "F32", (n,))]
    entries.append(("values", CODE_OF[PACKED_DTYPES[dtype]], (num_values,)))
    metadata = _metadata(n, embedding_dim, dtype, field, source_dtype, source_sha256, rotated)
    return encode_header(entries, metadata)


def _metadata(
    n: int,
    embedding_dim: int,
    dtype: str,
    field: str,
    source_dtype: str,
    source_sha256: str,
    rotated: bool = False,
) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "format_version": ROTATED_FORMAT_VERSION if rotated else FORMAT_VERSION,
        "field": field,
        "num_embeddings": str(n),
        "embedding_dim": str(embedding_dim),
        "dtype": dtype,
        "source_dtype": source_dtype,
        "source_sha256": source_sha256,
    }


def source_digest(weight: torch.Tensor) -> str:
    """``source_sha256`` of an in-memory table: SHA-256 of its row-major bytes (N, D), hex.

    Equals the hash of the tensor's byte range in a little-endian safetensors file, which is how
    ``pack`` computes it while streaming.
    """
    raw = weight.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw).hexdigest()


def write_packed_table(
    path: str | os.PathLike[str],
    values: torch.Tensor,
    offsets: torch.Tensor,
    *,
    embedding_dim: int,
    field: str,
    source_sha256: str,
    source_dtype: str = "float32",
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> None:
    """Write an in-memory packed table to ``path`` atomically (``pack`` streams instead).

    Args:
        path: output ``.safetensors`` file.
        values: (S,) float32/float16/bfloat16/int8, the rows' kept prefixes back to back.
        offsets: (N + 1,) int64 row boundaries (see module docstring).
        embedding_dim: D.
        field: module path stored as ``field`` metadata.
        source_sha256: hex SHA-256 of the source table (:func:`source_digest`).
        source_dtype: dtype name of the source table.
        scale, bias: (N,) float32, required for int8 and forbidden otherwise.
        rotation: (D, D) float32 applied after re-padding; writes a version 2 file.

    Raises:
        PackedFormatError: the tensors would violate docs/format.md.
    """
    path = Path(path)
    dtype = next((k for k, v in PACKED_DTYPES.items() if v == values.dtype), None)
    if dtype is None:
        raise PackedFormatError(
            f"`values` for `{path}` has dtype {values.dtype}; use one of {sorted(PACKED_DTYPES)}"
        )
    n = offsets.numel() - 1
    tensors = {"values": values, "offsets": offsets}
    if scale is not None:
        tensors["scale"] = scale
    if bias is not None:
        tensors["bias"] = bias
    rotated = rotation is not None
    if rotation is not None:
        tensors["rotation"] = rotation
    metadata = _metadata(
        max(n, 0), embedding_dim, dtype, field, source_dtype, source_sha256, rotated
    )

    def fail(problem: str) -> PackedFormatError:
        return PackedFormatError(f"cannot write `{path}`: {problem}; fix the tensors passed in")

    validate_tensors(tensors, metadata, fail)
    prefix, starts = table_header(
        n, embedding_dim, values.numel(), dtype, field, source_dtype, source_sha256, rotated
    )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(prefix)
        for name in sorted(starts, key=starts.__getitem__):
            tensor = tensors[name].detach().contiguous().cpu().reshape(-1)
            f.write(tensor.view(torch.uint8).numpy().tobytes())


def read_packed_table(path: str | os.PathLike[str], mmap: bool = True) -> PackedTable:
    """Read and fully validate a packed table file before any lookup can touch it.

    Args:
        path: a ``.safetensors`` file written by ``pack`` / :func:`write_packed_table`.
        mmap: map ``values`` from the file (tables larger than RAM stay on disk until rows are
            looked up); ``False`` reads it into memory. ``offsets``/``scale``/``bias`` (O(N)) are
            always read into memory, since validating them touches every element anyway.

    Returns:
        The table; ``values`` (S,), ``offsets`` (N + 1,) int64, ``scale``/``bias`` (N,) float32
        for int8.

    Raises:
        PackedFormatError: (one line naming ``path``) on every violation listed in docs/format.md,
            "Reader validation".
    """
    path = Path(path)
    header = read_header(path, PackedFormatError, FIX)

    def fail(problem: str) -> PackedFormatError:
        return PackedFormatError(f"`{path}`: {problem}; {FIX}")

    meta = header.metadata
    validate_metadata(meta, fail)
    expected = expected_tensors(meta)
    missing = sorted(expected - header.tensors.keys())
    if missing:
        raise fail(f"missing tensor(s) {', '.join(f'`{m}`' for m in missing)}")
    extra = sorted(header.tensors.keys() - expected)
    if extra:
        raise fail(f"unexpected tensor(s) {', '.join(f'`{m}`' for m in extra)}")
    # Check dtypes and shapes from the header before reading any data.
    shapes = {name: entry.shape for name, entry in header.tensors.items()}
    codes = {name: entry.dtype for name, entry in header.tensors.items()}
    validate_layout(shapes, codes, meta, fail)

    tensors = {
        name: read_tensor(path, entry) for name, entry in header.tensors.items() if name != "values"
    }
    entry = header.tensors["values"]
    tensors["values"] = map_tensor(path, entry) if mmap else read_tensor(path, entry)
    validate_data(tensors, meta, fail)
    return PackedTable(
        values=tensors["values"],
        offsets=tensors["offsets"],
        scale=tensors.get("scale"),
        bias=tensors.get("bias"),
        num_embeddings=int(meta["num_embeddings"]),
        embedding_dim=int(meta["embedding_dim"]),
        dtype=meta["dtype"],
        field=meta["field"],
        metadata=meta,
        rotation=tensors.get("rotation"),
    )
