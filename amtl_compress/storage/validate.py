"""The rules of docs/format.md a packed table must satisfy, and the checks that enforce them.

Both sides run the same checks: ``write_packed_table`` (storage/format.py) on the tensors it is
given (:func:`validate_tensors`); ``read_packed_table`` on a file's header
(:func:`validate_metadata`, :func:`validate_layout`) before reading any data, then on the O(N)
tensors (:func:`validate_data`). Every check raises the error ``fail`` builds from a one-line
problem, so the caller decides the path and the fix in the message.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from amtl_compress.errors import PackedFormatError
from amtl_compress.storage.header import CODE_OF
from amtl_compress.storage.offsets import FILE_MIN_LENGTH, offsets_problem
from amtl_compress.storage.quantize import PACKED_DTYPES

FORMAT_NAME = "amtl-packed-table"
FORMAT_VERSION = "1"
#: Version of a table that carries a ``rotation`` (dimension ordering, docs/format.md).
ROTATED_FORMAT_VERSION = "2"
#: Versions this reader accepts.
FORMAT_VERSIONS = (FORMAT_VERSION, ROTATED_FORMAT_VERSION)
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


def expected_tensors(meta: dict[str, str]) -> set[str]:
    """Names of the tensors a table with metadata ``meta`` holds (int8 and version 2 add some)."""
    expected = {"values", "offsets"}
    if meta["dtype"] == "int8":
        expected |= {"scale", "bias"}
    if meta["format_version"] == ROTATED_FORMAT_VERSION:
        expected.add("rotation")
    return expected


def validate_tensors(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    fail: Callable[[str], PackedFormatError],
) -> None:
    """All checks of docs/format.md on in-memory tensors (the writer's side)."""
    validate_metadata(meta, fail)
    expected = expected_tensors(meta)
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
    if meta["format_version"] not in FORMAT_VERSIONS:
        raise fail(
            f"format_version `{meta['format_version']}` is not supported (this amtl-compress "
            f"reads versions {', '.join(FORMAT_VERSIONS)}; a later release wrote it)"
        )
    for key in ("num_embeddings", "embedding_dim"):
        if not _DECIMAL.fullmatch(meta[key]):
            raise fail(f"metadata `{key}` is `{meta[key]}`, not a non-negative decimal integer")
    if not 1 <= int(meta["embedding_dim"]) <= MAX_EMBEDDING_DIM:
        raise fail(
            f"metadata `embedding_dim` is {meta['embedding_dim']}, must be in "
            f"[1, {MAX_EMBEDDING_DIM}]"
        )
    if meta["dtype"] not in PACKED_DTYPES:
        raise fail(
            f"metadata `dtype` is `{meta['dtype']}`, expected one of {sorted(PACKED_DTYPES)}"
        )
    if meta["source_dtype"] not in SOURCE_DTYPES:
        raise fail(
            f"metadata `source_dtype` is `{meta['source_dtype']}`, "
            f"expected one of {sorted(SOURCE_DTYPES)}"
        )
    if not meta["field"]:
        raise fail("metadata `field` is empty")
    if not _SHA256.fullmatch(meta["source_sha256"]):
        raise fail("metadata `source_sha256` is not 64 lowercase hex digits")


def validate_layout(
    shapes: dict[str, tuple[int, ...]],
    codes: dict[str, str],
    meta: dict[str, str],
    fail: Callable[[str], PackedFormatError],
) -> None:
    """Dtypes and shapes of every tensor against the metadata (no data needed)."""
    n = int(meta["num_embeddings"])
    values_code = CODE_OF[PACKED_DTYPES[meta["dtype"]]]
    if codes["values"] != values_code:
        raise fail(f"tensor `values` has dtype {codes['values']}, metadata says {values_code}")
    if len(shapes["values"]) != 1:
        raise fail(f"tensor `values` has shape {list(shapes['values'])}, must be 1-D")
    d = int(meta["embedding_dim"])
    want = {
        "offsets": ("I64", (n + 1,)),
        "scale": ("F32", (n,)),
        "bias": ("F32", (n,)),
        "rotation": ("F32", (d, d)),
    }
    for name, (code, shape) in want.items():
        if name not in shapes:
            continue
        if codes[name] != code:
            raise fail(f"tensor `{name}` has dtype {codes[name]}, expected {code}")
        if shapes[name] != shape:
            raise fail(
                f"tensor `{name}` has shape {list(shapes[name])}, expected {list(shape)} "
                f"for num_embeddings {n}"
            )


def validate_data(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    fail: Callable[[str], PackedFormatError],
) -> None:
    """The O(N) content checks: the offsets rule with lengths in [1, D] (storage/offsets.py), int8
    affine parameters finite. ``values`` itself is never scanned (it may be larger than RAM)."""
    problem = offsets_problem(
        tensors["offsets"], tensors["values"].numel(), int(meta["embedding_dim"]),
        min_length=FILE_MIN_LENGTH,
    )
    if problem is not None:
        raise fail(problem)
    if "scale" in tensors:
        scale, bias = tensors["scale"], tensors["bias"]
        if not (torch.isfinite(scale).all() and torch.isfinite(bias).all()):
            raise fail("tensor `scale` or `bias` holds a non-finite value")
        if (scale < 0).any():
            raise fail("tensor `scale` holds a negative value")
    if "rotation" in tensors and not torch.isfinite(tensors["rotation"]).all():
        raise fail("tensor `rotation` holds a non-finite value")
