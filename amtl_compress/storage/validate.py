"""The rules of docs/format.md a packed table must satisfy, and the checks that enforce them.

Both sides run the same checks: ``write_packed_table`` (storage/format.py) on the tensors it is
given (:func:`validate_tensors`); ``read_packed_table`` on a file's header
(:func:`validate_metadata`, :func:`validate_layout`) before reading any data, then on the O(N)
tensors (:func:`validate_data`, which also widens them to the in-memory form the lookups take).
Every check raises the error ``fail`` builds from a one-line
problem, so the caller decides the path and the fix in the message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection

import torch

from amtl_compress.errors import PackedFormatError
from amtl_compress.storage.header import CODE_OF
from amtl_compress.storage.offsets import FILE_MIN_LENGTH, lengths_problem, offsets_problem
from amtl_compress.storage.quantize import PACKED_DTYPES, QUANTIZED

FORMAT_NAME = "amtl-packed-table"
#: The version writers write (docs/format.md): version 3 with the rotation stored at the values'
#: precision (``ROTATION_CODES``) and int4 rows with a float16 ``scale`` only (symmetric codes).
FORMAT_VERSION = "4"
#: Version 1: int64 offsets, float32 int8 parameters, no rotation (read, never written).
LEGACY_FORMAT_VERSION = "1"
#: Version 2: version 1 plus a ``rotation`` (read, never written).
ROTATED_FORMAT_VERSION = "2"
#: Version 3: a row index of lengths in the smallest unsigned dtype that holds D (or none),
#: float16 int8/int4 ``scale`` and ``bias``, int4, an optional float32 rotation (read, never
#: written).
LENGTHS_FORMAT_VERSION = "3"
#: Versions this reader accepts.
FORMAT_VERSIONS = (
    LEGACY_FORMAT_VERSION, ROTATED_FORMAT_VERSION, LENGTHS_FORMAT_VERSION, FORMAT_VERSION
)
#: Versions whose row index is ``lengths`` (or ``row_length``) rather than int64 ``offsets``.
LENGTHS_VERSIONS = (LENGTHS_FORMAT_VERSION, FORMAT_VERSION)
#: Version 4's ``rotation`` dtype(s) for each packed dtype: the values' precision, the widest
#: first. float32 stores R as F16 when every entry is a float16 value (the rotation of
#: ``ordering="pca"`` is, so this is lossless), else F32; int8 and int4 store it as symmetric
#: int8 codes with a float16 ``rotation_scale`` per row of R.
ROTATION_CODES: dict[str, tuple[str, ...]] = {
    "float32": ("F32", "F16"), "float16": ("F16",), "bfloat16": ("BF16",), "int8": ("I8",),
    "int4": ("I8",),
}
#: Version 4's int4 code of zero: a stored code u decodes to ``(u - 8) * scale``, so the
#: in-memory ``bias`` is ``-8 * scale``.
INT4_ZERO_CODE = 8
#: Metadata keys every packed table carries (all values are strings).
REQUIRED_METADATA = (
    "format",
    "format_version",
    "field",
    "num_embeddings",
    "embedding_dim",
    "dtype",
    "source_dtype",
    "source_sha256",
)
#: Version 3's optional metadata key: every row has this length and the file stores no index.
ROW_LENGTH_KEY = "row_length"
#: Version 3's row index dtype by D: the smallest unsigned integer that holds every L_i <= D.
LENGTH_CODES = ((255, "U8"), (65535, "U16"))
_DECIMAL = re.compile(r"(0|[1-9][0-9]*)")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Dtypes a source table may have (``source_dtype``); it is converted to float32 before encoding.
SOURCE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

#: Largest D a reader accepts (docs/format.md): a lookup allocates (B, D) outputs, so a tampered
#: header claiming a huge D must not get that far.
MAX_EMBEDDING_DIM = 65536
#: The fix named by every error about a packed table file.
FIX = "re-create it with `pack`"


def lengths_code(embedding_dim: int) -> str:
    """The dtype code of a version 3 or 4 ``lengths`` for width D: U8 up to 255, U16 up to 65535,
    else U32."""
    return next((code for limit, code in LENGTH_CODES if embedding_dim <= limit), "U32")


def row_length(meta: dict[str, str]) -> int | None:
    """A version 3 or 4 table's ``row_length`` (validated metadata), or None when it has an
    index."""
    if meta["format_version"] not in LENGTHS_VERSIONS or ROW_LENGTH_KEY not in meta:
        return None
    return int(meta[ROW_LENGTH_KEY])


def stored_count(num_values: int, dtype: str) -> int:
    """Elements of ``values`` holding S = ``num_values`` values (int4: two a byte)."""
    return (num_values + 1) // 2 if dtype == "int4" else num_values


def expected_tensors(meta: dict[str, str], present: Collection[str] = ()) -> set[str]:
    """Names of the tensors a table with metadata ``meta`` must hold.

    ``present`` (the names the file or the writer has) decides only the optional ``rotation`` of
    versions 3 and 4 (and with it version 4's ``rotation_scale`` of int8/int4).
    """
    version, dtype = meta["format_version"], meta["dtype"]
    expected = {"values"}
    if version not in LENGTHS_VERSIONS:
        expected.add("offsets")
    elif row_length(meta) is None:
        expected.add("lengths")
    if dtype in QUANTIZED:
        expected.add("scale")
        if not (dtype == "int4" and version == FORMAT_VERSION):  # v4 int4: scale only
            expected.add("bias")
    if version == ROTATED_FORMAT_VERSION or (version in LENGTHS_VERSIONS and "rotation" in present):
        expected.add("rotation")
        if version == FORMAT_VERSION and ROTATION_CODES[dtype] == ("I8",):
            expected.add("rotation_scale")
    return expected


def validate_tensors(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    fail: Callable[[str], PackedFormatError],
) -> None:
    """All checks of docs/format.md on in-memory tensors as they will be stored (the writer's
    side)."""
    validate_metadata(meta, fail)
    expected = expected_tensors(meta, tensors.keys())
    if tensors.keys() != expected:
        raise fail(f"tensors must be exactly {sorted(expected)}, got {sorted(tensors)}")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    codes = {name: CODE_OF.get(t.dtype, str(t.dtype)) for name, t in tensors.items()}
    validate_layout(shapes, codes, meta, fail)
    validate_data(tensors, meta, fail)


def validate_metadata(meta: dict[str, str], fail: Callable[[str], PackedFormatError]) -> None:
    """Every required key present, each value well formed and of a version this reader takes."""
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise fail(f"metadata key(s) {', '.join(f'`{k}`' for k in missing)} missing")
    if meta["format"] != FORMAT_NAME:
        raise fail(f"metadata `format` is `{meta['format']}`, expected `{FORMAT_NAME}`")
    version = meta["format_version"]
    if version not in FORMAT_VERSIONS:
        raise fail(
            f"format_version `{version}` is not supported (this amtl-compress "
            f"reads versions {', '.join(FORMAT_VERSIONS)}; a later release wrote it)"
        )
    for key in ("num_embeddings", "embedding_dim"):
        if not _DECIMAL.fullmatch(meta[key]):
            raise fail(f"metadata `{key}` is `{meta[key]}`, not a non-negative decimal integer")
    d = int(meta["embedding_dim"])
    if not 1 <= d <= MAX_EMBEDDING_DIM:
        raise fail(
            f"metadata `embedding_dim` is {meta['embedding_dim']}, must be in "
            f"[1, {MAX_EMBEDDING_DIM}]"
        )
    if meta["dtype"] not in PACKED_DTYPES:
        raise fail(
            f"metadata `dtype` is `{meta['dtype']}`, expected one of {sorted(PACKED_DTYPES)}"
        )
    if meta["dtype"] == "int4" and version not in LENGTHS_VERSIONS:
        raise fail(f"metadata `dtype` is `int4`, which format_version `{version}` does not have")
    if meta["source_dtype"] not in SOURCE_DTYPES:
        raise fail(
            f"metadata `source_dtype` is `{meta['source_dtype']}`, "
            f"expected one of {sorted(SOURCE_DTYPES)}"
        )
    if not meta["field"]:
        raise fail("metadata `field` is empty")
    if not _SHA256.fullmatch(meta["source_sha256"]):
        raise fail("metadata `source_sha256` is not 64 lowercase hex digits")
    if version in LENGTHS_VERSIONS and ROW_LENGTH_KEY in meta:
        raw = meta[ROW_LENGTH_KEY]
        if not _DECIMAL.fullmatch(raw) or not 1 <= int(raw) <= d:
            raise fail(
                f"metadata `{ROW_LENGTH_KEY}` is `{raw}`, must be a decimal integer in "
                f"[1, embedding_dim={d}]"
            )


def validate_layout(
    shapes: dict[str, tuple[int, ...]],
    codes: dict[str, str],
    meta: dict[str, str],
    fail: Callable[[str], PackedFormatError],
) -> None:
    """Dtypes and shapes of every tensor against the metadata (no data needed)."""
    n = int(meta["num_embeddings"])
    dtype = meta["dtype"]
    values_code = CODE_OF[PACKED_DTYPES[dtype]]
    if codes["values"] != values_code:
        raise fail(f"tensor `values` has dtype {codes['values']}, metadata says {values_code}")
    if len(shapes["values"]) != 1:
        raise fail(f"tensor `values` has shape {list(shapes['values'])}, must be 1-D")
    d = int(meta["embedding_dim"])
    version = meta["format_version"]
    param = "F16" if version in LENGTHS_VERSIONS else "F32"
    # Version 4 stores the rotation at the values' precision; earlier versions in float32.
    rotation = ROTATION_CODES[dtype] if version == FORMAT_VERSION else ("F32",)
    want: dict[str, tuple[tuple[str, ...], tuple[int, ...], str]] = {
        "offsets": (("I64",), (n + 1,), ""),
        "lengths": ((lengths_code(d),), (n,), f" for embedding_dim {d}"),
        "scale": ((param,), (n,), ""),
        "bias": ((param,), (n,), ""),
        "rotation": (rotation, (d, d), f" for dtype {dtype}" if version == FORMAT_VERSION else ""),
        "rotation_scale": (("F16",), (d,), ""),
    }
    for name, (allowed, shape, why) in want.items():
        if name not in shapes:
            continue
        if codes[name] not in allowed:
            raise fail(
                f"tensor `{name}` has dtype {codes[name]}, expected {' or '.join(allowed)}{why}"
            )
        if shapes[name] != shape:
            per = f"embedding_dim {d}" if name.startswith("rotation") else f"num_embeddings {n}"
            raise fail(
                f"tensor `{name}` has shape {list(shapes[name])}, expected {list(shape)} "
                f"for {per}"
            )
    length = row_length(meta)
    if length is not None:
        # No offsets to check later: N and the row length alone fix the size of `values`.
        want_count = stored_count(n * length, dtype)
        if shapes["values"] != (want_count,):
            raise fail(
                f"tensor `values` has shape {list(shapes['values'])}, expected [{want_count}] "
                f"for num_embeddings {n} x row_length {length}"
            )


def validate_data(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    fail: Callable[[str], PackedFormatError],
) -> dict[str, torch.Tensor]:
    """The O(N) content checks, on the tensors as stored; returns them in the in-memory form.

    Checks versions 3 and 4's ``lengths`` (every L_i in [1, D], their sum S against
    ``values``: S entries, or ``ceil(S / 2)`` bytes for int4) or versions 1 and 2's ``offsets``
    (the offsets rule of storage/offsets.py with lengths in [1, D]), finite affine parameters
    with ``scale >= 0``, and a finite rotation (version 4 int8/int4: codes in [-127, 127], a
    finite ``rotation_scale`` >= 0). ``values`` itself is never scanned (it may be larger than
    RAM).

    Returns:
        A new dict in the in-memory form: ``offsets`` int64 (N + 1,) (the cumulative sum of
        ``lengths``, or ``arange(N + 1) * row_length``, or versions 1 and 2's as stored) in
        place of ``lengths``; ``scale``/``bias`` float32 (widened from float16, exact; version 4
        int4: ``bias = -8 * scale``, exact); ``rotation`` float32 (D, D) (decoded, in place of
        ``rotation``/``rotation_scale``); ``values`` as given.
    """
    out = dict(tensors)
    n, d = int(meta["num_embeddings"]), int(meta["embedding_dim"])
    dtype = meta["dtype"]
    count = tensors["values"].numel()
    length = row_length(meta)
    if length is not None:
        out["offsets"] = torch.arange(n + 1, dtype=torch.int64) * length  # sizes checked by layout
    elif "lengths" in tensors:
        lengths = tensors["lengths"].to(torch.int64)
        problem = lengths_problem(lengths, d, min_length=FILE_MIN_LENGTH)
        if problem is not None:
            raise fail(problem)
        offsets = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        num_values = int(offsets[-1])
        if stored_count(num_values, dtype) != count:
            unit = "bytes of int4 `values`" if dtype == "int4" else "entries of `values`"
            raise fail(
                f"`lengths` sum to S = {num_values} values, which need "
                f"{stored_count(num_values, dtype)} {unit}; it holds {count}"
            )
        del out["lengths"]
        out["offsets"] = offsets
    else:
        # Versions 1 and 2: int64 offsets, no int4.
        offsets = tensors["offsets"]
        problem = offsets_problem(offsets, count, d, min_length=FILE_MIN_LENGTH)
        if problem is not None:
            raise fail(problem)
    if "scale" in tensors:
        scale = tensors["scale"]
        bias = tensors.get("bias")
        if not (torch.isfinite(scale).all() and (bias is None or torch.isfinite(bias).all())):
            raise fail(f"tensor `scale`{'' if bias is None else ' or `bias`'} holds a non-finite "
                       "value")
        if (scale < 0).any():
            raise fail("tensor `scale` holds a negative value")
        out["scale"] = scale.to(torch.float32)
        # Version 4 int4 codes are symmetric: u decodes to (u - 8) * scale = u * scale + bias
        # with bias = -8 * scale, exact in float32 (a float16 times a power of two).
        out["bias"] = (
            out["scale"] * -INT4_ZERO_CODE if bias is None else bias.to(torch.float32)
        )
    if "rotation" in tensors:
        out.pop("rotation_scale", None)
        out["rotation"] = _rotation(tensors["rotation"], tensors.get("rotation_scale"), fail)
    return out


def _rotation(
    stored: torch.Tensor,
    scale: torch.Tensor | None,
    fail: Callable[[str], PackedFormatError],
) -> torch.Tensor:
    """A stored rotation, checked, as float32 (D, D) (docs/format.md, "Rotation").

    float32/float16/bfloat16 (float16 also in a float32 table): finite, widened (exact). int8
    (``scale`` (D,) float16): codes in [-127, 127] and a finite ``scale`` >= 0; decoded
    ``float32(q) * float32(scale[row])``.
    """
    if scale is None:
        if not torch.isfinite(stored).all():
            raise fail("tensor `rotation` holds a non-finite value")
        return stored.to(torch.float32)
    if not torch.isfinite(scale).all():
        raise fail("tensor `rotation_scale` holds a non-finite value")
    if (scale < 0).any():
        raise fail("tensor `rotation_scale` holds a negative value")
    bad = (stored == -128).nonzero()
    if bad.numel():
        row, col = (int(v) for v in bad[0])
        raise fail(f"tensor `rotation` holds code -128 at [{row}, {col}], outside [-127, 127]")
    # An int8 code times a float16 is exact in float32 (8 + 11 significant bits).
    return stored.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)
