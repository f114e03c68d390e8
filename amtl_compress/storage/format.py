"""One packed table per safetensors file: header, writer and validating reader (docs/format.md).

The tensors a table holds and their byte split are storage/layout.py's; this module re-exports
them, so ``amtl_compress.storage.format`` stays the one public home of the format.

Symbols: N rows, D dense width, L_i row i's kept length, S = sum(L_i) stored values.

A packed table stores row i's kept prefix (its first L_i values, Eq. 1) back to back in ``values``.
The file stores the row index as ``lengths`` (N,) in the smallest unsigned dtype that holds D
(format versions 3 and 4; nothing when every row has one length, ``row_length``); in memory it is
``offsets`` (N + 1,), where each row starts, torchrec-style, their cumulative sum (versions 1 and
2 stored these int64 offsets). Version 4 stores an optional rotation at the values' precision
and int4 rows with a ``scale`` only; the reader hands every version to the lookups in one
in-memory form (:class:`PackedTable`)::

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

import torch

from amtl_compress._io import atomic_path
from amtl_compress.errors import PackedFormatError
from amtl_compress.storage.header import (
    CODE_OF,
    DTYPES,
    encode_header,
    map_tensor,
    read_header,
    read_tensor,
)
from amtl_compress.storage.layout import (
    TableBytes,
    kept_values,
    prefix_mask,
    table_bytes,
    table_layout,
    uniform_length,
)
from amtl_compress.storage.offsets import FILE_MIN_LENGTH, offsets_problem
from amtl_compress.storage.quantize import PACKED_DTYPES, rotation_encode
from amtl_compress.storage.validate import (
    FIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    LEGACY_FORMAT_VERSION,
    LENGTHS_FORMAT_VERSION,
    MAX_EMBEDDING_DIM,
    REQUIRED_METADATA,
    ROTATED_FORMAT_VERSION,
    ROW_LENGTH_KEY,
    SOURCE_DTYPES,
    expected_tensors,
    lengths_code,
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
    "LEGACY_FORMAT_VERSION",
    "LENGTHS_FORMAT_VERSION",
    "MAX_EMBEDDING_DIM",
    "REQUIRED_METADATA",
    "ROTATED_FORMAT_VERSION",
    "SOURCE_DTYPES",
    "TableBytes",
    "PackedTable",
    "kept_values",
    "prefix_mask",
    "read_packed_table",
    "source_digest",
    "table_bytes",
    "table_header",
    "table_layout",
    "write_packed_table",
]

@dataclass
class PackedTable:
    """A packed table as read from disk (validated against docs/format.md), in the one in-memory
    form of every format version (what the lookup modules take).

    Attributes:
        values: (S,) float32/float16/bfloat16/int8; row i is ``values[offsets[i]:offsets[i+1]]``.
            For int4 (format versions 3, 4): (ceil(S / 2),) uint8, value j's 4-bit code in byte
            ``j // 2`` (low nibble for even j, high for odd j). Memory-mapped (copy-on-write)
            when read with ``mmap=True``.
        offsets: (N + 1,) int64, ``offsets[0] == 0``, ``offsets[N] == S``, steps in [1, D]
            (the cumulative sum of the file's ``lengths``, or ``arange(N + 1) * row_length``).
        scale: (N,) float32 for int8/int4 (``value = float32(q) * scale + bias``; widened from
            the file's float16 in versions 3 and 4), else None.
        bias: (N,) float32 for int8/int4 (version 4 int4: ``-8 * scale``, which the file does
            not store), else None.
        num_embeddings: N.
        embedding_dim: D, the dense width rows are zero-padded back to.
        dtype: ``float32``, ``float16``, ``bfloat16``, ``int8`` or ``int4``.
        field: the module path the table belongs to (e.g. ``embeddings.user_id``).
        metadata: the file's full ``__metadata__`` map.
        rotation: (D, D) float32 R applied to every zero-padded row (``row @ R``), or None
            (decoded from version 4's float16/bfloat16/int8 storage).
        stored: the file's bytes by part.
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
    stored: TableBytes | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64 kept lengths L_i = offsets[i + 1] - offsets[i]."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def format_version(self) -> int:
        """The file's format version (1 to 4)."""
        return int(self.metadata["format_version"])


def table_header(
    num_embeddings: int,
    embedding_dim: int,
    num_values: int,
    dtype: str,
    field: str,
    source_dtype: str,
    source_sha256: str,
    rotated: bool = False,
    row_length: int | None = None,
    rotation_code: str | None = None,
) -> tuple[bytes, dict[str, int]]:
    """The header bytes of a version 4 packed table and each tensor's absolute file offset.

    The layout is :func:`table_layout`'s; ``rotated`` adds a (D, D) ``rotation`` (and its
    ``rotation_scale`` for int8/int4; a float32 table's in ``rotation_code``, F32 or F16),
    ``row_length`` drops ``lengths`` (every row has that length).
    """
    entries = table_layout(
        num_embeddings, embedding_dim, num_values, dtype, rotated, row_length, rotation_code
    )
    metadata = _metadata(
        num_embeddings, embedding_dim, dtype, field, source_dtype, source_sha256, row_length
    )
    return encode_header(entries, metadata)


def _metadata(
    n: int,
    embedding_dim: int,
    dtype: str,
    field: str,
    source_dtype: str,
    source_sha256: str,
    row_length: int | None = None,
) -> dict[str, str]:
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "field": field,
        "num_embeddings": str(n),
        "embedding_dim": str(embedding_dim),
        "dtype": dtype,
        "source_dtype": source_dtype,
        "source_sha256": source_sha256,
    }
    if row_length is not None:
        meta[ROW_LENGTH_KEY] = str(row_length)
    return meta


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
) -> TableBytes:
    """Write an in-memory packed table to ``path`` atomically, as format version 4 (``pack``
    streams instead).

    Takes the in-memory form :func:`read_packed_table` returns, so a version 4 table read back
    writes the same bytes: the writer stores ``offsets`` as the row ``lengths`` (uint8 when
    D <= 255, uint16 when D <= 65535, else uint32) or, when every row has one length, as
    ``row_length`` metadata; ``scale``/``bias`` as float16 (int4: ``scale`` only, ``bias`` must
    be ``-8 * scale``); and ``rotation`` at the values' precision (``quantize.rotation_encode``:
    lossless for float32, as float16 when every entry is a float16 value; lossy for the other
    dtypes; the same bytes again for a rotation read from a version 4 file).

    Args:
        path: output ``.safetensors`` file.
        values: (S,) float32/float16/bfloat16/int8, the rows' kept prefixes back to back; or
            int4: (ceil(S / 2),) uint8 codes two a byte (``quantize.pack_nibbles``).
        offsets: (N + 1,) int64 row boundaries (see module docstring).
        embedding_dim: D.
        field: module path stored as ``field`` metadata.
        source_sha256: hex SHA-256 of the source table (:func:`source_digest`).
        source_dtype: dtype name of the source table.
        scale, bias: (N,) float16 (or float32 holding float16 values exactly), required for
            int8/int4 (int4: ``bias`` may be None, else it must be ``-8 * scale``, as
            ``int4_encode`` gives it) and forbidden otherwise.
        rotation: (D, D) float32 applied after re-padding.

    Returns:
        The written table's bytes by part.

    Raises:
        PackedFormatError: the tensors would violate docs/format.md.
    """
    path = Path(path)
    dtype = next((k for k, v in PACKED_DTYPES.items() if v == values.dtype), None)
    if dtype is None:
        raise PackedFormatError(
            f"`values` for `{path}` has dtype {values.dtype}; use one of "
            f"{sorted(str(v) for v in PACKED_DTYPES.values())}"
        )

    def fail(problem: str) -> PackedFormatError:
        return PackedFormatError(f"cannot write `{path}`: {problem}; fix the tensors passed in")

    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise fail(f"`offsets` is {offsets.dtype}{list(offsets.shape)}, expected int64 [N + 1]")
    n = offsets.numel() - 1
    num_values = int(offsets[-1])
    # The steps must be valid lengths before they are narrowed to the file's dtype (no
    # wrap-around); their sum against `values` is checked with the stored tensors below.
    problem = offsets_problem(offsets, num_values, embedding_dim, min_length=FILE_MIN_LENGTH)
    if problem is not None:
        raise fail(problem)
    lengths = offsets[1:] - offsets[:-1]
    length = uniform_length(lengths)
    tensors = {"values": values}
    if length is None:
        code = lengths_code(embedding_dim)
        tensors["lengths"] = lengths.to(DTYPES[code][0])
    for name, param in (("scale", scale), ("bias", bias)):
        if param is None:
            continue
        if dtype == "int4" and name == "bias":
            # Version 4 int4 codes are symmetric: the bias is -8 * scale and is not stored.
            if scale is None or param.shape != scale.shape or not torch.equal(
                param.to(torch.float32), scale.to(torch.float32) * -8
            ):
                raise fail("int4 `bias` is not -8 * `scale`; version 4 stores symmetric int4 "
                           "codes (encode with `quantize.int4_encode`)")
            continue
        half = param.to(torch.float16)
        if param.dtype != torch.float16 and not torch.equal(half.to(param.dtype), param):
            raise fail(f"`{name}` holds values that are not float16; version 4 stores it in "
                       "float16 (encode with `quantize.int8_encode` / `int4_encode`)")
        tensors[name] = half
    if rotation is not None:
        if rotation.dtype != torch.float32 or tuple(rotation.shape) != (embedding_dim,) * 2:
            raise fail(f"`rotation` is {rotation.dtype}{list(rotation.shape)}, expected "
                       f"float32 [{embedding_dim}, {embedding_dim}]")
        stored, rotation_scale = rotation_encode(rotation, dtype)
        tensors["rotation"] = stored
        if rotation_scale is not None:
            tensors["rotation_scale"] = rotation_scale
    metadata = _metadata(
        max(n, 0), embedding_dim, dtype, field, source_dtype, source_sha256, length
    )
    validate_tensors(tensors, metadata, fail)
    prefix, starts = table_header(
        n, embedding_dim, num_values, dtype, field, source_dtype, source_sha256,
        rotation is not None, length,
        CODE_OF[tensors["rotation"].dtype] if rotation is not None else None,
    )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(prefix)
        for name in sorted(starts, key=starts.__getitem__):
            tensor = tensors[name].detach().contiguous().cpu().reshape(-1)
            f.write(tensor.view(torch.uint8).numpy().tobytes())
    return table_bytes(
        {name: t.numel() * t.element_size() for name, t in tensors.items()}, n, embedding_dim
    )


def read_packed_table(path: str | os.PathLike[str], mmap: bool = True) -> PackedTable:
    """Read and fully validate a packed table file before any lookup can touch it.

    Args:
        path: a ``.safetensors`` file written by ``pack`` / :func:`write_packed_table`.
        mmap: map ``values`` from the file (tables larger than RAM stay on disk until rows are
            looked up); ``False`` reads it into memory. ``offsets``/``scale``/``bias`` (O(N)) are
            always read into memory (and widened), since validating them touches every element
            anyway.

    Returns:
        The table in the in-memory form of every version (docs/format.md, "Reading"): ``values``
        as stored ((S,), or (ceil(S / 2),) uint8 for int4), ``offsets`` (N + 1,) int64,
        ``scale``/``bias`` (N,) float32 for int8/int4.

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
    expected = expected_tensors(meta, header.tensors.keys())
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
    tensors = validate_data(tensors, meta, fail)  # also widens them to the in-memory form
    n, d = int(meta["num_embeddings"]), int(meta["embedding_dim"])
    return PackedTable(
        values=tensors["values"],
        offsets=tensors["offsets"],
        scale=tensors.get("scale"),
        bias=tensors.get("bias"),
        num_embeddings=n,
        embedding_dim=d,
        dtype=meta["dtype"],
        field=meta["field"],
        metadata=meta,
        rotation=tensors.get("rotation"),
        stored=table_bytes({name: e.nbytes for name, e in header.tensors.items()}, n, d),
    )
