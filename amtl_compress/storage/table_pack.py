"""``pack_table``: stream one dense (N, D) table into a packed table file, out of core.

The table is read from a safetensors file in row chunks with plain file reads (no memory map, so
resident memory stays bounded however large the table), row i is cut to its first L_i values
(Eq. 1), encoded (storage/quantize.py) and appended to the output file, whose safetensors header
was computed up front from the lengths (storage/format.py). Peak memory is a few chunks
(``chunk_bytes`` each) plus O(N) for lengths and int8/int4 scale/bias. One helper
thread reads and hashes the source ahead of the encoder (``_ChunkReader``). The file is format
version 4: the row lengths as its index (uint8 when D <= 255; none when every row has one
length), float16 int8 scale and bias, symmetric int4 codes two a byte with a float16 scale, and
the rotation (if any) at the values' precision.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from amtl_compress._io import atomic_path
from amtl_compress.errors import PackedFormatError, RunDirError
from amtl_compress.storage.format import SOURCE_DTYPES, table_header
from amtl_compress.storage.header import CODE_OF, DTYPES, read_header
from amtl_compress.storage.layout import kept_values, table_bytes, table_layout, uniform_length
from amtl_compress.storage.manifest import file_sha256
from amtl_compress.storage.quantize import (
    FLOAT16_MAX,
    PACKED_DTYPES,
    QUANTIZED,
    cast_values,
    int4_encode,
    int8_encode,
    pack_nibbles,
    params_overflow,
    rotation_encode,
)
from amtl_compress.storage.report import TableReport
from amtl_compress.storage.source import RUN_FIX, check_lengths
from amtl_compress.storage.validate import lengths_code

#: Source bytes read per chunk. Working memory is a small multiple of this (float32 copy, mask,
#: encoded prefixes), so 32 MiB keeps the peak near 200 MB while amortising per-chunk overhead.
DEFAULT_CHUNK_BYTES = 32 << 20


def pack_table(
    source_path: str | os.PathLike[str],
    tensor_name: str,
    lengths: torch.Tensor,
    out_path: str | os.PathLike[str],
    dtype: str,
    field: str,
    *,
    chunk_bytes: int | None = None,
    progress: bool = False,
    rotation: torch.Tensor | None = None,
) -> TableReport:
    """Stream one (N, D) table from a safetensors file into a packed table file (atomically).

    Row i keeps exactly ``rows[i, :lengths[i]]`` (Eq. 1); its tail is dropped. Rows are read
    ``chunk_bytes`` at a time with plain reads. The output header (every size follows from
    ``lengths``) is written first with a placeholder ``source_sha256``, the values are appended
    chunk by chunk, then the header (and int8/int4 bias/scale) are filled in.

    Args:
        source_path: safetensors file holding the dense table.
        tensor_name: the table's key in it (``<module path>.weight``).
        lengths: (N,) int64 kept lengths in [1, D].
        out_path: packed table file to write.
        dtype: packed dtype name (``float32``, ``float16``, ``bfloat16``, ``int8``, ``int4``).
        field: module path stored in the file's metadata.
        chunk_bytes: source bytes per chunk (at least one row per chunk); default
            ``DEFAULT_CHUNK_BYTES``.
        progress: tqdm bar on stderr counting rows.
        rotation: float32 (D, D) the lookups apply after re-padding (dimension ordering); the
            file stores it as ``rotation`` at the values' precision (``rotation_encode``: D * D
            * 4 bytes for float32, * 2 for float16/bfloat16 and for a float32 table whose R
            holds float16 values only (as ``ordering="pca"`` makes it), D * D int8 codes + D
            float16 scales for int8/int4).

    Raises:
        RunDirError: the source tensor is missing, not a 2-D float table, does not match
            ``lengths``, holds a non-finite kept value, or does not fit ``dtype``.
        PackedFormatError: ``dtype`` is not a packed dtype.
    """
    source_path, out_path = Path(source_path), Path(out_path)
    check_dtype(dtype)
    header = read_header(source_path, RunDirError, RUN_FIX)
    entry = header.tensors.get(tensor_name)
    if entry is None:
        raise RunDirError(f"`{source_path}` has no tensor `{tensor_name}`; {RUN_FIX}")
    source_dtype = _source_dtype(entry.dtype)
    if source_dtype is None or len(entry.shape) != 2:
        raise RunDirError(
            f"`{source_path}` tensor `{tensor_name}` is {entry.dtype}{list(entry.shape)}, not a "
            f"2-D float table; pack only embedding weights"
        )
    n, d = entry.shape
    check_lengths(lengths, n, d, f"lengths of `{field}`")
    lengths = lengths.to("cpu", torch.int64)
    num_values = int(lengths.sum())
    row_length = uniform_length(lengths)
    rotated = rotation is not None
    if rotation is not None and (
        tuple(rotation.shape) != (d, d) or rotation.dtype != torch.float32
        or not bool(torch.isfinite(rotation).all())
    ):
        raise RunDirError(
            f"rotation of `{field}` is {rotation.dtype}{list(rotation.shape)}, expected finite "
            f"float32[{d}, {d}]; {RUN_FIX}"
        )
    stored_rotation = rotation_encode(rotation, dtype) if rotation is not None else None
    if stored_rotation is not None and not all(
        np.isfinite(t.to(torch.float32).numpy()).all() for t in stored_rotation if t is not None
    ):
        raise RunDirError(
            f"rotation of `{field}` holds values beyond {dtype}'s range; pack with "
            "`dtype=float32` or `dtype=bfloat16`"
        )
    rotation_code = CODE_OF[stored_rotation[0].dtype] if stored_rotation is not None else None
    prefix, starts = table_header(
        n, d, num_values, dtype, field, source_dtype, "0" * 64, rotated, row_length,
        rotation_code,
    )

    torch_src, np_src = DTYPES[entry.dtype]
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    chunk_rows = max(1, chunk_bytes // max(1, d * np_src.itemsize))
    digest = hashlib.sha256()
    # int8/int4 scale and int8 bias (N,) are filled in place: a list of chunks joined by
    # torch.cat would hold them twice at the end, and torch's small ops stall on a busy core.
    # int4's bias (-8 * scale) is not stored.
    quantized = dtype in QUANTIZED
    scales = np.empty(n if quantized else 0, dtype=np.float16)
    biases = np.empty(n if dtype == "int8" else 0, dtype=np.float16)
    nibbles = _NibbleWriter() if dtype == "int4" else None
    bar = tqdm(
        total=n, desc=field, unit="row", unit_scale=True, file=sys.stderr,
        disable=not progress, dynamic_ncols=True,
    )
    with (
        bar,
        atomic_path(out_path) as tmp,
        open(tmp, "w+b") as out,
        _ChunkReader(source_path, entry.offset, n, d, np_src, chunk_rows, digest) as chunks,
    ):
        out.write(prefix)
        if stored_rotation is not None:
            for name, tensor in zip(("rotation", "rotation_scale"), stored_rotation, strict=True):
                if tensor is not None:
                    out.seek(starts[name])
                    out.write(_as_bytes(tensor))
        # The values are appended in order; the tensors around them are written once they are
        # done (the lengths may lie after them), so the file grows with the rows encoded.
        out.seek(starts["values"])
        for start, view in chunks:
            stop = start + view.size // d
            rows = torch.from_numpy(view).view(torch_src).reshape(stop - start, d)
            encoded, scale, bias = _encode(rows, lengths[start:stop], dtype, start, field)
            if scale is not None:
                scales[start:stop] = scale.numpy()
            if biases.size and bias is not None:
                biases[start:stop] = bias.numpy()
            out.write(nibbles.add(encoded) if nibbles is not None else _as_bytes(encoded))
            bar.update(stop - start)
        if nibbles is not None:
            out.write(nibbles.finish())
        if row_length is None:
            out.seek(starts["lengths"])
            out.write(_as_bytes(lengths.to(DTYPES[lengths_code(d)][0])))
        if biases.size:
            out.seek(starts["bias"])
            out.write(biases)
        if quantized:
            out.seek(starts["scale"])
            out.write(scales)
        source_sha256 = digest.hexdigest()  # complete: the reader hashed every chunk it gave
        final_prefix, _ = table_header(
            n, d, num_values, dtype, field, source_dtype, source_sha256, rotated, row_length,
            rotation_code,
        )
        if len(final_prefix) != len(prefix):  # the digest has a fixed width; guard the invariant
            raise RuntimeError("packed header changed size after hashing")
        out.seek(0)
        out.write(final_prefix)
        out.flush()

    return TableReport(
        field=field,
        rows=n,
        embedding_dim=d,
        avg_kept=num_values / n if n else 0.0,
        stored=table_bytes(
            table_layout(n, d, num_values, dtype, rotated, row_length, rotation_code), n, d
        ),
        dtype=dtype,
        file=out_path,
        sha256=file_sha256(out_path),
        source_sha256=source_sha256,
    )


class _NibbleWriter:
    """int4 codes of successive chunks -> bytes, two codes a byte across chunk boundaries.

    A chunk with an odd number of codes leaves its last code pending; it becomes the low nibble
    of the next chunk's first byte (code j of the whole stream goes to byte ``j // 2``).
    """

    def __init__(self) -> None:
        self.pending = torch.zeros(0, dtype=torch.uint8)

    def add(self, codes: torch.Tensor) -> np.ndarray:
        """Bytes for the codes so far, all but a trailing odd one."""
        codes = torch.cat([self.pending, codes]) if self.pending.numel() else codes
        even = codes.numel() - codes.numel() % 2
        self.pending = codes[even:].clone()
        return pack_nibbles(codes[:even]).numpy()

    def finish(self) -> np.ndarray:
        """The last byte (code in the low nibble, high nibble 0) if a code is pending."""
        return pack_nibbles(self.pending).numpy()


class _ChunkReader:
    """The source table's rows, read and hashed ahead of the encoder by one helper thread.

    Iterating gives ``(first row, (r * D,) view)`` in row order. The helper reads chunk k + 2
    into its own buffer and feeds it to ``digest`` (both release the GIL) while the caller
    encodes chunk k, so reading and hashing the source (about half of the work for float32)
    overlap with encoding and writing (the gain on a float32 table is in docs/benchmarks.md,
    "Scale"). One worker runs the tasks in submission order, so ``digest`` sees the bytes in
    file order. A view stays valid until the next one is taken (three buffers: one being
    encoded, two in flight); ``_encode`` copies what it keeps.
    """

    _DEPTH = 2  # chunks in flight ahead of the one being encoded

    def __init__(
        self, path: Path, offset: int, n: int, d: int, np_dtype: np.dtype, chunk_rows: int,
        digest: Any,
    ) -> None:
        self.path, self.offset, self.n, self.d = path, offset, n, d
        self.chunk_rows, self.digest = chunk_rows, digest
        size = min(chunk_rows, max(n, 1)) * d
        self.buffers = [np.empty(size, dtype=np_dtype) for _ in range(self._DEPTH + 1)]

    def __enter__(self) -> _ChunkReader:
        self.file = open(self.path, "rb")  # noqa: SIM115 (closed in __exit__)
        self.file.seek(self.offset)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="amtl-pack-read")
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # no read may outlive the file
        self.file.close()

    def _read(self, k: int) -> np.ndarray:
        start = k * self.chunk_rows
        rows = min(self.chunk_rows, self.n - start)
        view = self.buffers[k % len(self.buffers)][: rows * self.d]
        _read_exactly(self.file, view, self.path)
        self.digest.update(view)
        return view

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        count = -(-self.n // self.chunk_rows)
        pending: deque[Future[np.ndarray]] = deque()
        for k in range(min(self._DEPTH, count)):
            pending.append(self.pool.submit(self._read, k))
        for k in range(count):
            view = pending.popleft().result()  # re-raises a read error here
            if k + self._DEPTH < count:
                # Its buffer held chunk k - 1, which the caller has finished with.
                pending.append(self.pool.submit(self._read, k + self._DEPTH))
            yield k * self.chunk_rows, view


def _encode(
    rows: torch.Tensor, lengths: torch.Tensor, dtype: str, start: int, field: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk: (r, D) source rows -> (encoded kept values, scale, bias); int4 gives one code
    a byte (``_NibbleWriter`` packs them), int8/int4 float16 scale, int8 float16 bias (int4:
    float32 ``-8 * scale``, not stored)."""
    kept = kept_values(rows.to(torch.float32), lengths)
    _check_finite(kept, lengths, start, field)
    if dtype in QUANTIZED:
        encode = int8_encode if dtype == "int8" else int4_encode
        encoded, scale, bias = encode(kept, lengths)
        _check_params(scale, bias, kept, lengths, start, field, dtype)
        return encoded, scale, bias
    encoded = cast_values(kept, dtype)
    if dtype == "float16" and np.isinf(encoded.numpy()).any():
        raise RunDirError(
            f"table `{field}` holds values beyond float16's range (max "
            f"{kept.abs().max().item():.4g} > 65504); pack with `dtype=float32` or `dtype=bfloat16`"
        )
    return encoded, None, None


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    """A zero-copy byte view of a contiguous CPU tensor, for ``file.write``."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _read_exactly(f: Any, view: np.ndarray, path: Path) -> None:
    target = memoryview(view).cast("B")
    done = 0
    while done < len(target):
        got = f.readinto(target[done:])
        if not got:
            raise RunDirError(f"`{path}` ended while reading a table (truncated?); {RUN_FIX}")
        done += got


def check_dtype(dtype: str) -> None:
    """Raise PackedFormatError unless ``dtype`` names a packed dtype."""
    if dtype not in PACKED_DTYPES:
        raise PackedFormatError(
            f"`dtype={dtype}` is not a packed dtype; pass one of {', '.join(PACKED_DTYPES)}"
        )


def _source_dtype(code: str) -> str | None:
    torch_dtype = DTYPES[code][0]
    return next((name for name, t in SOURCE_DTYPES.items() if t == torch_dtype), None)


def _check_finite(kept: torch.Tensor, lengths: torch.Tensor, start: int, field: str) -> None:
    if np.isfinite(kept.numpy()).all():  # the common case, ~10x faster than torch.isfinite here
        return
    bad = (~torch.isfinite(kept)).nonzero()
    if bad.numel():
        ends = torch.cumsum(lengths, 0)
        row = start + int(torch.searchsorted(ends, bad[0, 0], right=True))
        raise RunDirError(
            f"table `{field}` row {row} holds a non-finite value; the fine-tuned model is broken, "
            "re-run `finetune` (e.g. with a lower `lr`)"
        )


def _check_params(
    scale: torch.Tensor,
    bias: torch.Tensor,
    kept: torch.Tensor,
    lengths: torch.Tensor,
    start: int,
    field: str,
    dtype: str,
) -> None:
    bad = params_overflow(scale, bias).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        first = int(lengths[:row].sum())
        span = kept[first : first + int(lengths[row])]
        raise RunDirError(
            f"table `{field}` row {start + row} (values in [{span.min().item():.4g}, "
            f"{span.max().item():.4g}]) needs {dtype} parameters beyond float16's range "
            f"({FLOAT16_MAX:g}); pack with `dtype=float32` or `dtype=bfloat16`"
        )
