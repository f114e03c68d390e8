"""``manifest.json`` of a packed model directory (docs/format.md, "Packed model directory")."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amtl_compress._io import atomic_write_text
from amtl_compress.errors import PackedFormatError
from amtl_compress.storage.layout import TableBytes
from amtl_compress.storage.quantize import PACKED_DTYPES

MANIFEST_NAME = "manifest.json"
REST_NAME = "rest.safetensors"
MODEL_FORMAT_NAME = "amtl-packed-model"
#: The manifest version writers write: version 1 plus each table's ``bytes``.
MODEL_FORMAT_VERSION = 2
#: Manifest versions this reader accepts.
MODEL_FORMAT_VERSIONS = (1, 2)
KINDS = ("Embedding", "EmbeddingBag")
_FIX = "re-create the directory with `pack`"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: Names of the temporary siblings that ``_io.atomic_directory`` builds an output under.
_TEMPORARY = re.compile(r"\..+\.(tmp|old)")


@dataclass(frozen=True)
class ManifestTable:
    """One packed table as listed in the manifest.

    Attributes:
        file: file name inside the packed directory.
        kind: ``Embedding`` or ``EmbeddingBag``, the module class that was packed.
        num_embeddings: N.
        embedding_dim: D.
        dtype: packed dtype name.
        sha256: hex SHA-256 of the whole file.
        bytes: the table's bytes by part (docs/format.md, "Byte accounting"); None in a
            version 1 manifest.
    """

    file: str
    kind: str
    num_embeddings: int
    embedding_dim: int
    dtype: str
    sha256: str
    bytes: TableBytes | None = None


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``.

    Attributes:
        model: the model spec (docs/design.md) the weights belong to.
        tables: module path -> its packed table.
        rest_file: file name of the other weights (``rest.safetensors``).
        rest_sha256: hex SHA-256 of that file.
    """

    model: Any
    tables: dict[str, ManifestTable]
    rest_file: str
    rest_sha256: str

    def to_json(self) -> str:
        """The manifest as written to disk (indented, keys in a fixed order, trailing newline)."""
        doc = {
            "format": MODEL_FORMAT_NAME,
            "format_version": MODEL_FORMAT_VERSION,
            "model": self.model,
            "tables": {
                path: {
                    "file": t.file,
                    "kind": t.kind,
                    "num_embeddings": t.num_embeddings,
                    "embedding_dim": t.embedding_dim,
                    "dtype": t.dtype,
                    "sha256": t.sha256,
                    **({"bytes": t.bytes.to_json()} if t.bytes is not None else {}),
                }
                for path, t in sorted(self.tables.items())
            },
            "rest": {"file": self.rest_file, "sha256": self.rest_sha256},
        }
        return json.dumps(doc, indent=2) + "\n"


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 16 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk_bytes`` pieces (memory stays bounded)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write ``directory/manifest.json`` atomically; ``pack`` calls it last, after every file."""
    atomic_write_text(Path(directory) / MANIFEST_NAME, manifest.to_json())


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``directory/manifest.json``; every file it names must exist.

    Raises:
        PackedFormatError: (one line naming the directory or file) when the manifest is missing,
            not JSON, of another format or version, has a malformed entry, or names a file that is
            absent.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME

    def fail(problem: str) -> PackedFormatError:
        return PackedFormatError(f"`{path}`: {problem}; {_FIX}")

    if not directory.is_dir():
        raise PackedFormatError(
            f"packed directory `{directory}` does not exist; pass a directory written by `pack`"
        )
    if _TEMPORARY.fullmatch(directory.name):
        # A finished temporary (manifest written, rename not yet done) would look complete, but
        # its writer may still be running or may have died before checking everything.
        raise PackedFormatError(
            f"`{directory}` is the temporary directory of a `pack` that is running or was "
            "interrupted; load its final name, or delete it and pack again"
        )
    if not path.is_file():
        raise PackedFormatError(
            f"`{directory}` has no `{MANIFEST_NAME}` (an incomplete or foreign directory); {_FIX}"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise fail(f"not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise fail("not a JSON object")
    if doc.get("format") != MODEL_FORMAT_NAME:
        raise fail(f"`format` is {doc.get('format')!r}, expected `{MODEL_FORMAT_NAME}`")
    version = doc.get("format_version")
    if not _is_int(version) or version not in MODEL_FORMAT_VERSIONS:
        raise fail(
            f"`format_version` {version!r} is not supported (this amtl-compress reads "
            f"{', '.join(map(str, MODEL_FORMAT_VERSIONS))}; a later release wrote it)"
        )
    if "model" not in doc:
        raise fail("`model` (the model spec) is missing")
    tables = doc.get("tables")
    if not isinstance(tables, dict):
        raise fail("`tables` is missing or not an object")
    parsed: dict[str, ManifestTable] = {}
    for module_path, entry in tables.items():
        parsed[module_path] = _parse_table(module_path, entry, directory, fail, version)
    rest = doc.get("rest")
    if not isinstance(rest, dict):
        raise fail("`rest` is missing or not an object")
    rest_file = _parse_file(rest.get("file"), "rest", directory, fail)
    rest_sha = rest.get("sha256")
    if not isinstance(rest_sha, str) or not _SHA256.fullmatch(rest_sha):
        raise fail("`rest.sha256` is not 64 lowercase hex digits")
    files = [t.file for t in parsed.values()] + [rest_file]
    if len(set(files)) != len(files):
        raise fail("two entries name the same file")
    return Manifest(model=doc["model"], tables=parsed, rest_file=rest_file, rest_sha256=rest_sha)


def _parse_table(
    module_path: str,
    entry: Any,
    directory: Path,
    fail: Callable[[str], PackedFormatError],
    version: int = MODEL_FORMAT_VERSION,
) -> ManifestTable:
    where = f"`tables.{module_path}`"
    if not module_path or not isinstance(entry, dict):
        raise fail(f"{where} is not an object with a module path")
    file = _parse_file(entry.get("file"), where, directory, fail)
    kind = entry.get("kind")
    if kind not in KINDS:
        raise fail(f"{where}.kind is {kind!r}, expected one of {list(KINDS)}")
    n, d = entry.get("num_embeddings"), entry.get("embedding_dim")
    if not _is_int(n) or n < 0 or not _is_int(d) or d < 1:
        raise fail(f"{where} needs integer num_embeddings >= 0 and embedding_dim >= 1")
    dtype = entry.get("dtype")
    if dtype not in PACKED_DTYPES:
        raise fail(f"{where}.dtype is {dtype!r}, expected one of {sorted(PACKED_DTYPES)}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise fail(f"{where}.sha256 is not 64 lowercase hex digits")
    stored = _parse_bytes(entry.get("bytes"), where, fail) if version >= 2 else None
    return ManifestTable(file, kind, n, d, dtype, sha, stored)


def _parse_bytes(raw: Any, where: str, fail: Callable[[str], PackedFormatError]) -> TableBytes:
    """A version 2 table's ``bytes``: non-negative integer parts, ``total`` their sum.

    N and D are checked against the table file by the directory reader, so ``dense`` is not
    checked against them here."""
    parts = ("values", "index", "row_metadata", "rotation", "total", "dense")
    if not isinstance(raw, dict) or not all(_is_int(raw.get(k)) and raw[k] >= 0 for k in parts):
        raise fail(f"{where}.bytes needs non-negative integers {', '.join(parts)}")
    stored = TableBytes(raw["values"], raw["index"], raw["row_metadata"], raw["rotation"],
                        raw["dense"])
    if raw["total"] != stored.total:
        raise fail(f"{where}.bytes does not add up (`total` must be the sum of the parts)")
    if not isinstance(raw.get("ratio"), (int, float)) or isinstance(raw.get("ratio"), bool):
        raise fail(f"{where}.bytes.ratio is not a number")
    return stored


def _parse_file(
    name: Any, where: str, directory: Path, fail: Callable[[str], PackedFormatError]
) -> str:
    # A plain name only: a manifest must never make the loader open files outside its directory.
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name == MANIFEST_NAME:
        raise fail(f"{where} names an invalid file {name!r}")
    if not (directory / name).is_file():
        raise fail(f"{where} names `{name}`, which is missing from the directory")
    return name


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
