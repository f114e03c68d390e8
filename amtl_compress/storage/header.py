"""The safetensors container, read and written by hand.

A safetensors file is 8 bytes (little-endian u64 ``n``), ``n`` bytes of UTF-8 JSON describing every
tensor (``dtype``, ``shape``, ``data_offsets`` relative to the data region) plus an optional
``__metadata__`` string map, then the data region. We parse and build the header ourselves so that
``pack`` can stream a table of any size into a file and ``read_packed_table`` can memory-map
``values`` at its exact byte offset, neither of which safetensors' Python API offers.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amtl_compress.errors import AmtlError, PackedFormatError

#: Same limit as the safetensors reference reader: a larger header is rejected unread.
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype code -> (torch dtype, numpy dtype with the same bytes, little-endian).
#: bfloat16 and the float8s have no numpy twin, so they travel as same-width ints and are viewed
#: back after conversion.
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "F64": (torch.float64, np.dtype("<f8")),
    "F32": (torch.float32, np.dtype("<f4")),
    "F16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<i2")),
    "I64": (torch.int64, np.dtype("<i8")),
    "I32": (torch.int32, np.dtype("<i4")),
    "I16": (torch.int16, np.dtype("<i2")),
    "I8": (torch.int8, np.dtype("i1")),
    "U8": (torch.uint8, np.dtype("u1")),
    "U16": (torch.uint16, np.dtype("<u2")),
    "U32": (torch.uint32, np.dtype("<u4")),
    "U64": (torch.uint64, np.dtype("<u8")),
    "BOOL": (torch.bool, np.dtype("?")),
    "F8_E4M3": (torch.float8_e4m3fn, np.dtype("u1")),
    "F8_E5M2": (torch.float8_e5m2, np.dtype("u1")),
}
CODE_OF: dict[torch.dtype, str] = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header.

    Attributes:
        name: the tensor's key.
        dtype: safetensors dtype code (``F32``, ``I64``, ...).
        shape: the tensor's shape.
        offset: absolute byte offset of its first byte in the file.
        nbytes: its size in bytes (numel * itemsize).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header.

    Attributes:
        data_start: byte offset of the data region (8 + header length).
        tensors: every tensor entry, by name.
        metadata: the ``__metadata__`` string map (empty if absent).
    """

    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(
    path: str | os.PathLike[str],
    error: type[AmtlError] = PackedFormatError,
    fix: str = "recreate the file",
) -> Header:
    """Parse and validate the safetensors header of ``path`` without reading any tensor data.

    Checks: the file holds at least 8 bytes; the header length is at most ``MAX_HEADER_BYTES`` and
    fits in the file; the header is a UTF-8 JSON object; ``__metadata__`` maps strings to strings;
    each tensor has a known dtype, a shape of non-negative ints and ``data_offsets`` whose span is
    numel * itemsize; the spans tile the data region exactly (no overlap, no hole, nothing past the
    end, no trailing bytes).

    Raises:
        error: (one line, naming ``path`` and ending with ``fix``) on any violation.
    """
    path = Path(path)

    def fail(problem: str) -> AmtlError:
        return error(f"`{path}`: {problem}; {fix}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise fail(f"truncated file ({size} bytes, a safetensors file needs at least 8)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise fail(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise fail(f"truncated file (header needs {8 + n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise fail(f"cannot read ({e.strerror})") from e
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"header is not valid UTF-8 JSON ({e})") from e
    if not isinstance(doc, dict):
        raise fail("header JSON is not an object")

    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise fail("`__metadata__` must map strings to strings")

    data_start = 8 + n
    tensors: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise fail(f"entry `{name}` is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in DTYPES:
            raise fail(f"tensor `{name}` has unknown dtype `{code}`")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise fail(f"tensor `{name}` has a malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_uint(o) for o in offsets)
            or offsets[1] < offsets[0]
        ):
            raise fail(f"tensor `{name}` has malformed data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[code][1].itemsize
        if end - begin != nbytes:
            raise fail(
                f"tensor `{name}` spans {end - begin} bytes but {code}{shape} needs {nbytes}"
            )
        tensors[name] = TensorEntry(name, code, tuple(shape), data_start + begin, nbytes)
        spans.append((begin, end, name))

    expected = 0
    for begin, end, name in sorted(spans):
        if begin < expected:
            raise fail(f"tensor `{name}` overlaps the previous tensor's data")
        if begin > expected:
            raise fail(f"hole in the data region before tensor `{name}`")
        expected = end
    data_size = size - data_start
    if expected > data_size:
        raise fail(f"truncated file (data region needs {expected} bytes, file has {data_size})")
    if expected < data_size:
        raise fail(f"{data_size - expected} trailing bytes after the last tensor")
    return Header(data_start=data_start, tensors=tensors, metadata=dict(metadata))


def _is_uint(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
    """Build the first bytes of a safetensors file whose data region holds ``entries`` in order.

    Args:
        entries: ``(name, dtype code, shape)`` in the order their data will follow the header.
        metadata: the ``__metadata__`` string map (written first, keys sorted).

    Returns:
        ``(prefix, offsets)``: the 8-byte length plus the JSON header, padded with spaces so the
        data region starts at a multiple of 8 (as safetensors' own writer does); and each
        tensor's absolute byte offset in the file. Deterministic: same input, same bytes.
    """
    doc: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    begin = 0
    relative: dict[str, int] = {}
    for name, code, shape in entries:
        end = begin + math.prod(shape) * DTYPES[code][1].itemsize
        doc[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
        relative[name] = begin
        begin = end
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    data_start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: data_start + v for k, v in relative.items()}


def read_tensor(path: str | os.PathLike[str], entry: TensorEntry) -> torch.Tensor:
    """Read one tensor fully into memory (for small tensors: offsets, scale, bias)."""
    torch_dtype, np_dtype = DTYPES[entry.dtype]
    with open(path, "rb") as f:
        f.seek(entry.offset)
        raw = f.read(entry.nbytes)
    array = np.frombuffer(raw, dtype=np_dtype).copy().reshape(entry.shape)
    return torch.from_numpy(array).view(torch_dtype)


def map_tensor(path: str | os.PathLike[str], entry: TensorEntry) -> torch.Tensor:
    """Memory-map one tensor read-only-on-disk: pages are read lazily, writes stay private.

    Copy-on-write (``ACCESS_COPY``, what ``np.memmap`` mode ``"c"`` uses) gives torch a writable
    array (no warning) while the file is never modified. A tensor whose offset is not a multiple
    of its itemsize is read into memory instead, since unaligned access is slow or faulting on
    some CPUs; our writer always aligns.

    The mapping is advised ``MADV_RANDOM`` where the OS has it: lookups touch rows at random,
    and the default read-around pulls ~32 neighbouring pages into memory (and into the process's
    RSS, as RssFile) for every page a lookup faults in, so random lookups into a large table
    keep a fraction of it resident instead of most of it. The price is one small read per first
    touch of a page, which makes a cold first pass several times slower (figures in
    docs/benchmarks.md, "Scale"). Pages already in the page cache are still mapped in batches
    (fault-around).
    """
    torch_dtype, np_dtype = DTYPES[entry.dtype]
    if entry.numel == 0 or entry.offset % np_dtype.itemsize:
        return read_tensor(path, entry)
    # mmap offsets must be multiples of the allocation granularity: map from the boundary below.
    start = entry.offset - entry.offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        mapped = mmap.mmap(
            f.fileno(), entry.offset + entry.nbytes - start, access=mmap.ACCESS_COPY, offset=start
        )
    if hasattr(mmap, "MADV_RANDOM"):  # Linux and other Unixes; not Windows
        mapped.madvise(mmap.MADV_RANDOM)
    array = np.frombuffer(mapped, dtype=np_dtype, count=entry.numel, offset=entry.offset - start)
    return torch.from_numpy(array.reshape(entry.shape)).view(torch_dtype)
