"""``pack``: turn a run directory into a packed model directory, streaming, out of core.

Each AMTL table (a key of ``lengths.safetensors``) is streamed from ``model.safetensors`` into its
own packed table file by :func:`~amtl_compress.storage.table_pack.pack_table`; every other tensor
goes to ``rest.safetensors``; ``manifest.json`` is written last. The run directory is read and
checked by storage/source.py before anything is written; the sizes come back as a
:class:`PackReport` (storage/report.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from amtl_compress._io import atomic_directory, atomic_save_safetensors
from amtl_compress.errors import AmtlError, OutputExistsError, RunDirError
from amtl_compress.run_dir import LENGTHS_FILE, MODEL_FILE, RUN_FIX, RunDir
from amtl_compress.storage.header import read_header, read_tensor
from amtl_compress.storage.manifest import (
    MANIFEST_NAME,
    REST_NAME,
    Manifest,
    ManifestTable,
    file_sha256,
    write_manifest,
)
from amtl_compress.storage.report import PackReport, TableReport
from amtl_compress.storage.source import (
    model_spec,
    module_kinds,
    read_lengths,
    read_rotations,
)
from amtl_compress.storage.table_pack import DEFAULT_CHUNK_BYTES, check_dtype, pack_table

# pack_table, the reports and the chunk size keep this module as a public home.
__all__ = ["DEFAULT_CHUNK_BYTES", "PackReport", "TableReport", "pack", "pack_table"]


def pack(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> PackReport:
    """Pack every AMTL table of a run directory into ``out_dir`` (docs/format.md).

    Tables are the keys of ``run_dir/lengths.safetensors``; their ``<path>.weight`` tensors in
    ``model.safetensors`` become ``<path>.safetensors`` files of format version 4 (with
    ``<path>.rotation``, if the run used dimension ordering, as the file's ``rotation``); every
    other tensor goes to ``rest.safetensors``; ``manifest.json`` (with each table's bytes by
    part) is written last. The directory is
    built as a hidden temporary sibling and renamed into place only when complete.

    Args:
        run_dir: directory written by ``finetune`` (docs/design.md).
        out_dir: packed directory to create.
        dtype: ``float32`` (exact), ``float16``, ``bfloat16``, ``int8`` or ``int4`` (per-row
            affine codes with float16 scale and bias; int4 stores two values a byte).
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).
        progress: tqdm bar per table on stderr (rows).

    Returns:
        Per-table bytes by part (values / index / per-row metadata / rotation), ratios to the
        dense float32 tables, and totals.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
        RunDirError: the run directory is missing files, or a table/lengths tensor is malformed.
        PackedFormatError: ``dtype`` is not a packed dtype.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_dtype(dtype)
    if out_dir.exists() and not overwrite:
        raise _exists_error(out_dir)
    run = RunDir(run_dir).check(MODEL_FILE, LENGTHS_FILE)
    model_file, lengths_file = run.model_file, run.lengths_file
    if run_dir.resolve() == out_dir.resolve() or out_dir.resolve() in run_dir.resolve().parents:
        raise RunDirError(
            f"output directory `{out_dir}` would replace the run directory `{run_dir}`; choose "
            "another output directory"
        )

    model_header = read_header(model_file, RunDirError, RUN_FIX)
    spec = model_spec(model_header, model_file)
    lengths = read_lengths(lengths_file, model_header, model_file)
    shapes = {p: model_header.tensors[f"{p}.weight"].shape for p in lengths}
    kinds = module_kinds(spec, shapes, model_file)
    files = _file_names(sorted(lengths))

    reports: list[TableReport] = []
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            rotations = read_rotations(model_header, model_file, shapes)
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
                        bytes=r.stored,
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
        raise _exists_error(out_dir) from e  # created by someone else while we were packing
    final = [dataclasses.replace(r, file=out_dir / r.file.name) for r in reports]
    return PackReport(out_dir=out_dir, dtype=dtype, tables=final)


def _exists_error(out_dir: Path) -> OutputExistsError:
    """The error for an existing ``out_dir`` (raised before packing or when a racer made it)."""
    return OutputExistsError(
        f"output directory `{out_dir}` exists; pass `overwrite=True` to replace it"
    )


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

