"""``pack``: turn a run directory into a packed model directory, streaming, out of core.

Each AMTL table (a key of ``lengths.safetensors``) is read from ``model.safetensors`` in row chunks
with plain file reads (no memory map, so resident memory stays bounded however large the table),
row i is cut to its first L_i values (Eq. 1), encoded (storage/quantize.py) and appended to the
output file, whose safetensors header was computed up front from the lengths. Peak memory is a
few chunks (``chunk_bytes`` each) plus O(N) for lengths, offsets and int8 scale/bias. One helper
thread reads and hashes the source ahead of the encoder (``_ChunkReader``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from amtl_compress._io import atomic_directory, atomic_path, atomic_save_safetensors
from amtl_compress._text import format_table
from amtl_compress.errors import AmtlError, OutputExistsError, PackedFormatError, RunDirError
from amtl_compress.storage.format import SOURCE_DTYPES, kept_values, table_header
from amtl_compress.storage.header import DTYPES, Header, read_header, read_tensor
from amtl_compress.storage.manifest import (
    MANIFEST_NAME,
    REST_NAME,
    Manifest,
    ManifestTable,
    file_sha256,
    write_manifest,
)
from amtl_compress.storage.quantize import PACKED_DTYPES, cast_values, int8_encode

#: Source bytes read per chunk. Working memory is a small multiple of this (float32 copy, mask,
#: encoded prefixes), so 32 MiB keeps the peak near 200 MB while amortising per-chunk overhead.
DEFAULT_CHUNK_BYTES = 32 << 20
MODEL_FILE = "model.safetensors"
LENGTHS_FILE = "lengths.safetensors"
SPEC_KEY = "amtl_compress.model"
_RUN_FIX = "re-run `amtl-compress finetune` to write a complete run directory"


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


def pack(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> PackReport:
    """Pack every AMTL table of a run directory into ``out_dir`` (docs/format.md).

    Tables are the keys of ``run_dir/lengths.safetensors``; their ``<path>.weight`` tensors in
    ``model.safetensors`` become ``<path>.safetensors`` files (with ``<path>.rotation``, if the
    run used dimension ordering, as the file's ``rotation``: format version 2); every other
    tensor goes to ``rest.safetensors``; ``manifest.json`` is written last. The directory is
    built as a hidden temporary sibling and renamed into place only when complete.

    Args:
        run_dir: directory written by ``finetune`` (docs/design.md).
        out_dir: packed directory to create.
        dtype: ``float32`` (exact), ``float16``, ``bfloat16`` or ``int8`` (per-row affine).
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).
        progress: tqdm bar per table on stderr (rows).

    Returns:
        Per-table sizes and ratios plus totals.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
        RunDirError: the run directory is missing files, or a table/lengths tensor is malformed.
        PackedFormatError: ``dtype`` is not a packed dtype.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_dtype(dtype)
    if out_dir.exists() and not overwrite:
        raise _exists(out_dir)
    model_file, lengths_file = run_dir / MODEL_FILE, run_dir / LENGTHS_FILE
    if not run_dir.is_dir():
        raise RunDirError(f"run directory `{run_dir}` does not exist; pass the `--out` of finetune")
    for required in (model_file, lengths_file):
        if not required.is_file():
            raise RunDirError(f"`{run_dir}` has no `{required.name}`; {_RUN_FIX}")
    if run_dir.resolve() == out_dir.resolve() or out_dir.resolve() in run_dir.resolve().parents:
        raise RunDirError(
            f"output directory `{out_dir}` would replace the run directory `{run_dir}`; choose "
            "another output directory"
        )

    model_header = read_header(model_file, RunDirError, _RUN_FIX)
    spec = _model_spec(model_header, model_file)
    lengths = _read_lengths(lengths_file, model_header, model_file)
    shapes = {p: model_header.tensors[f"{p}.weight"].shape for p in lengths}
    kinds = _module_kinds(spec, shapes, model_file)
    files = _file_names(sorted(lengths))

    reports: list[TableReport] = []
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            rotations = _read_rotations(model_header, model_file, shapes)
            for path in sorted(lengths):
                reports.append(
                    pack_table(
                        model_file, f"{path}.weight", lengths[path], tmp / files[path], dtype,
                        path, progress=progress, rotation=rotations.get(path),
                    )
                )
            packed = {f"{p}.weight" for p in lengths} | {f"{p}.rotation" for p in rotations}
            rest = {
                name: read_tensor(model_file, entry)
                for name, entry in model_header.tensors.items()
                if name not in packed
            }
            atomic_save_safetensors(rest, tmp / REST_NAME)
            manifest = Manifest(
                model=spec,
                tables={
                    r.field: ManifestTable(
                        file=files[r.field], kind=kinds[r.field], num_embeddings=r.rows,
                        embedding_dim=r.embedding_dim, dtype=dtype, sha256=r.sha256,
                    )
                    for r in reports
                },
                rest_file=REST_NAME,
                rest_sha256=file_sha256(tmp / REST_NAME),
            )
            write_manifest(tmp, manifest)  # last: its presence marks the directory complete
    except FileExistsError as e:
        if isinstance(e, AmtlError):
            raise
        raise _exists(out_dir) from e  # created by someone else while we were packing
    final = [dataclasses.replace(r, file=out_dir / r.file.name) for r in reports]
    return PackReport(out_dir=out_dir, dtype=dtype, tables=final)


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
    chunk by chunk, then the header (and int8 bias/scale) are filled in.

    Args:
        source_path: safetensors file holding the dense table.
        tensor_name: the table's key in it (``<module path>.weight``).
        lengths: (N,) int64 kept lengths in [1, D].
        out_path: packed table file to write.
        dtype: packed dtype name (``float32``, ``float16``, ``bfloat16``, ``int8``).
        field: module path stored in the file's metadata.
        chunk_bytes: source bytes per chunk (at least one row per chunk); default
            ``DEFAULT_CHUNK_BYTES``.
        progress: tqdm bar on stderr counting rows.
        rotation: float32 (D, D) the lookups apply after re-padding (dimension ordering); the
            file becomes format version 2 and its size grows by D * D * 4 bytes.

    Raises:
        RunDirError: the source tensor is missing, not a 2-D float table, does not match
            ``lengths``, holds a non-finite kept value, or does not fit ``dtype``.
        PackedFormatError: ``dtype`` is not a packed dtype.
    """
    source_path, out_path = Path(source_path), Path(out_path)
    _check_dtype(dtype)
    header = read_header(source_path, RunDirError, _RUN_FIX)
    entry = header.tensors.get(tensor_name)
    if entry is None:
        raise RunDirError(f"`{source_path}` has no tensor `{tensor_name}`; {_RUN_FIX}")
    source_dtype = _source_dtype(entry.dtype)
    if source_dtype is None or len(entry.shape) != 2:
        raise RunDirError(
            f"`{source_path}` tensor `{tensor_name}` is {entry.dtype}{list(entry.shape)}, not a "
            f"2-D float table; pack only embedding weights"
        )
    n, d = entry.shape
    _check_lengths(lengths, n, d, f"lengths of `{field}`")
    lengths = lengths.to("cpu", torch.int64)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    num_values = int(offsets[-1])
    rotated = rotation is not None
    if rotation is not None and (
        tuple(rotation.shape) != (d, d) or rotation.dtype != torch.float32
        or not bool(torch.isfinite(rotation).all())
    ):
        raise RunDirError(
            f"rotation of `{field}` is {rotation.dtype}{list(rotation.shape)}, expected finite "
            f"float32[{d}, {d}]; {_RUN_FIX}"
        )
    prefix, starts = table_header(
        n, d, num_values, dtype, field, source_dtype, "0" * 64, rotated
    )

    torch_src, np_src = DTYPES[entry.dtype]
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    chunk_rows = max(1, chunk_bytes // max(1, d * np_src.itemsize))
    digest = hashlib.sha256()
    # int8 scale/bias (N,) are filled in place: a list of chunks joined by torch.cat would hold
    # them twice at the end, and torch's small ops stall on a busy core (see _check_int8_range).
    quantized = dtype == "int8"
    scales = np.empty(n if quantized else 0, dtype=np.float32)
    biases = np.empty_like(scales)
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
        out.write(_as_bytes(offsets))
        if rotation is not None:
            out.seek(starts["rotation"])
            out.write(_as_bytes(rotation.contiguous()))
        out.seek(starts["values"])  # int8 bias/scale go in this gap once every row is encoded
        for start, view in chunks:
            stop = start + view.size // d
            rows = torch.from_numpy(view).view(torch_src).reshape(stop - start, d)
            encoded, scale, bias = _encode(rows, lengths[start:stop], dtype, start, field)
            if scale is not None and bias is not None:
                scales[start:stop] = scale.numpy()
                biases[start:stop] = bias.numpy()
            out.write(_as_bytes(encoded))
            bar.update(stop - start)
        if quantized:
            out.seek(starts["bias"])
            out.write(biases)
            out.seek(starts["scale"])
            out.write(scales)
        source_sha256 = digest.hexdigest()  # complete: the reader hashed every chunk it gave
        final_prefix, _ = table_header(
            n, d, num_values, dtype, field, source_dtype, source_sha256, rotated
        )
        if len(final_prefix) != len(prefix):  # the digest has a fixed width; guard the invariant
            raise RuntimeError("packed header changed size after hashing")
        out.seek(0)
        out.write(final_prefix)
        out.flush()

    values_bytes = num_values * PACKED_DTYPES[dtype].itemsize
    side_bytes = (8 * n if dtype == "int8" else 0) + (4 * d * d if rotated else 0)
    return TableReport(
        field=field,
        rows=n,
        embedding_dim=d,
        avg_kept=num_values / n if n else 0.0,
        bytes_before=n * d * 4,
        bytes_after=values_bytes + 8 * (n + 1) + side_bytes,
        dtype=dtype,
        file=out_path,
        sha256=file_sha256(out_path),
        source_sha256=source_sha256,
    )


class _ChunkReader:
    """The source table's rows, read and hashed ahead of the encoder by one helper thread.

    Iterating gives ``(first row, (r * D,) view)`` in row order. The helper reads chunk k + 2
    into its own buffer and feeds it to ``digest`` (both release the GIL) while the caller
    encodes chunk k, so reading and hashing the source (about half of the work for float32)
    overlap with encoding and writing. On the 2-core development VM this cut the time of a
    float32 ``pack_table`` of a 2 GiB table by 10-40 %, depending on the load from other
    processes (docs/benchmarks.md, "Scale"). One worker runs the tasks in submission order, so
    ``digest`` sees the bytes in file order. A view stays valid until the next one is taken
    (three buffers: one being encoded, two in flight); ``_encode`` copies what it keeps.
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
    """One chunk: (r, D) source rows -> (encoded kept values, int8 scale, int8 bias)."""
    kept = kept_values(rows.to(torch.float32), lengths)
    _check_finite(kept, lengths, start, field)
    if dtype == "int8":
        encoded, scale, bias = int8_encode(kept, lengths)
        _check_int8_range(scale, start, field)
        return encoded, scale, bias
    encoded = cast_values(kept, dtype)
    if dtype == "float16" and np.isinf(encoded.numpy()).any():
        raise RunDirError(
            f"table `{field}` holds values beyond float16's range (max "
            f"{kept.abs().max().item():.4g} > 65504); pack with dtype float32 or bfloat16"
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
            raise RunDirError(f"`{path}` ended while reading a table (truncated?); {_RUN_FIX}")
        done += got


def _check_dtype(dtype: str) -> None:
    if dtype not in PACKED_DTYPES:
        raise PackedFormatError(
            f"dtype `{dtype}` is not a packed dtype; choose one of {', '.join(PACKED_DTYPES)}"
        )


def _exists(out_dir: Path) -> OutputExistsError:
    return OutputExistsError(
        f"output directory `{out_dir}` exists; pass --overwrite (overwrite=True) to replace it"
    )


def _source_dtype(code: str) -> str | None:
    torch_dtype = DTYPES[code][0]
    return next((name for name, t in SOURCE_DTYPES.items() if t == torch_dtype), None)


def _check_lengths(lengths: torch.Tensor, n: int, d: int, what: str) -> None:
    if lengths.dtype not in (torch.int64, torch.int32) or tuple(lengths.shape) != (n,):
        raise RunDirError(
            f"{what} is {lengths.dtype}{list(lengths.shape)}, expected int64 [{n}] to match the "
            f"table; {_RUN_FIX}"
        )
    if n and (int(lengths.min()) < 1 or int(lengths.max()) > d):
        bad = int(((lengths < 1) | (lengths > d)).nonzero()[0, 0])
        raise RunDirError(
            f"{what}: row {bad} has length {int(lengths[bad])}, outside [1, D={d}]; {_RUN_FIX}"
        )


def _check_finite(kept: torch.Tensor, lengths: torch.Tensor, start: int, field: str) -> None:
    if np.isfinite(kept.numpy()).all():  # the common case, ~10x faster than torch.isfinite here
        return
    bad = (~torch.isfinite(kept)).nonzero()
    if bad.numel():
        ends = torch.cumsum(lengths, 0)
        row = start + int(torch.searchsorted(ends, bad[0, 0], right=True))
        raise RunDirError(
            f"table `{field}` row {row} holds a non-finite value; the fine-tuned model is broken, "
            "re-run finetune (e.g. with a lower learning rate)"
        )


def _check_int8_range(scale: torch.Tensor, start: int, field: str) -> None:
    # numpy first: torch.isfinite on a chunk's (r,) scales measured 10-30 ms instead of ~0.1 ms
    # when the other core is busy (its thread pool waits for a second thread).
    if np.isfinite(scale.numpy()).all():
        return
    bad = (~torch.isfinite(scale)).nonzero()
    if bad.numel():
        raise RunDirError(
            f"table `{field}` row {start + int(bad[0, 0])} spans more than float32 can hold in an "
            "int8 scale; pack with dtype float32 or bfloat16"
        )


def _model_spec(header: Header, model_file: Path) -> Any:
    raw = header.metadata.get(SPEC_KEY)
    if raw is None:
        raise RunDirError(f"`{model_file}` has no `{SPEC_KEY}` metadata (model spec); {_RUN_FIX}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RunDirError(
            f"`{model_file}` metadata `{SPEC_KEY}` is not JSON ({e}); {_RUN_FIX}"
        ) from e


def _read_lengths(
    lengths_file: Path, model_header: Header, model_file: Path
) -> dict[str, torch.Tensor]:
    header = read_header(lengths_file, RunDirError, _RUN_FIX)
    if not header.tensors:
        raise RunDirError(f"`{lengths_file}` lists no tables; {_RUN_FIX}")
    lengths: dict[str, torch.Tensor] = {}
    for path, entry in header.tensors.items():
        weight = model_header.tensors.get(f"{path}.weight")
        if weight is None:
            raise RunDirError(
                f"`{lengths_file}` names table `{path}` but `{model_file}` has no "
                f"`{path}.weight`; {_RUN_FIX}"
            )
        if len(weight.shape) != 2:
            raise RunDirError(
                f"`{model_file}` tensor `{path}.weight` has shape {list(weight.shape)}, not (N, D)"
            )
        if entry.dtype not in ("I64", "I32"):
            raise RunDirError(f"`{lengths_file}` tensor `{path}` is {entry.dtype}, expected I64")
        tensor = read_tensor(lengths_file, entry)
        _check_lengths(tensor, *weight.shape, f"`{lengths_file}` tensor `{path}`")
        lengths[path] = tensor.to(torch.int64)
    return lengths


def _module_kinds(
    spec: Any, shapes: dict[str, tuple[int, ...]], model_file: Path
) -> dict[str, str]:
    """Module class name per table path, from the model spec built on the meta device.

    The state_dict alone cannot tell an Embedding from an EmbeddingBag. Building on ``meta``
    allocates no storage, so this stays cheap for tables larger than RAM.
    """
    from amtl_compress.models.factory import build_model  # imports user code: only when packing

    try:
        with torch.device("meta"):
            skeleton = build_model(spec)
    except AmtlError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise RunDirError(
            f"`{model_file}`: cannot build its model spec to check the tables "
            f"({type(e).__name__}: {reason}); make the model's factory importable"
        ) from e
    kinds: dict[str, str] = {}
    for path, shape in shapes.items():
        try:
            module = skeleton.get_submodule(path)
        except AttributeError:
            module = None
        if isinstance(module, nn.EmbeddingBag):
            kinds[path] = "EmbeddingBag"
        elif isinstance(module, nn.Embedding):
            kinds[path] = "Embedding"
        else:
            raise RunDirError(
                f"`{model_file}`: the model spec has no Embedding/EmbeddingBag at `{path}`; "
                f"{_RUN_FIX}"
            )
        dims = (module.num_embeddings, module.embedding_dim)
        if dims != tuple(shape):
            raise RunDirError(
                f"`{model_file}` tensor `{path}.weight` is {list(shape)} but the model spec "
                f"builds {list(dims)}; {_RUN_FIX}"
            )
    return kinds


def _read_rotations(
    header: Header, model_file: Path, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Table path -> its ``<path>.rotation`` tensor in the run's model file, if it has one."""
    return {
        path: read_tensor(model_file, header.tensors[f"{path}.rotation"])
        for path in shapes
        if f"{path}.rotation" in header.tensors
    }


def _file_names(paths: list[str]) -> dict[str, str]:
    """``<module path>.safetensors`` per table, made a safe, unique plain file name."""
    taken = {REST_NAME, MANIFEST_NAME}
    names: dict[str, str] = {}
    for path in paths:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", path).lstrip(".-") or "table"
        name, k = f"{base}.safetensors", 2
        while name in taken:
            name, k = f"{base}-{k}.safetensors", k + 1
        taken.add(name)
        names[path] = name
    return names

