"""Golden files: the exact bytes of a small packed table in each dtype and format version.

Version 3 files are what ``pack`` writes today: a change to their bytes is a change to the file
format. Versions 1 and 2 files were written by earlier releases and are never regenerated; they
must keep loading. To regenerate the version 3 files deliberately (after a format change that
bumps ``format_version``, or one you have checked is compatible):

    AMTL_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/test_storage_golden.py

then copy the printed hashes into ``V3_SHA256`` below.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from amtl_compress.storage.format import prefix_mask, read_packed_table
from amtl_compress.storage.pack import pack_table
from amtl_compress.storage.quantize import dequantize_values

GOLDEN = Path(__file__).parent / "golden"
#: Files of earlier releases (format versions 1 and 2): read, never written again.
LEGACY_SHA256 = {
    "table_float32": "8246de8cbfa89f321e9ae0e4be0f62f25c0ee006dade00c0a8a1c8ee11fbf230",
    "table_float16": "b8bda9d5aa92a89a98e4c74bc34d5b72b64e1a7638e0996c6ef68187311b50f8",
    "table_bfloat16": "2ad7736b82530cf973c52237d7a3c340dad7eb1690b8acf39979c7e74895724d",
    "table_int8": "04b0ce4aad5c339d5c1c9cbaf18b25ef7ea4e25e1b5aa00b7f548f022f116f88",
    "table_v2_float32": "a6f5316476c2663a0b6b381824ab5498d8dbdf1986929867c4b434575d9cbf27",
    "table_v2_int8": "dd662c6e3e4703afa9e9eb90c86146aa93e4c69dd2d1fd08c3974b45ef8cfe77",
}
#: Version 3, as ``pack_table`` writes it: (dtype, rotated, equal lengths) per file.
V3_CASES = {
    "table_v3_float32": ("float32", False, False),
    "table_v3_float16": ("float16", False, False),
    "table_v3_bfloat16": ("bfloat16", False, False),
    "table_v3_int8": ("int8", False, False),
    "table_v3_int4": ("int4", False, False),
    "table_v3_int4_rotated": ("int4", True, False),
    "table_v3_float32_equal": ("float32", False, True),
}
V3_SHA256 = {
    "table_v3_float32": "91cb5137a31d02c35afbc30b9d163d8a067026bf81bea56d9a0287da9e105923",
    "table_v3_float16": "af6b54c4e4520e235052ef3dbb01abaca02f2de756e145056bc8d9bdc48623b6",
    "table_v3_bfloat16": "f1a49b39cc800b0c226761eb3e1b10cf33f00c5d460d95823ea8e0c956255d8b",
    "table_v3_int8": "e17ca047e6a5f4239fe04965fd6cd114e37f090142c337b757ae093921147aec",
    "table_v3_int4": "301f77331e2ff57a80ef0c5eb7d68e1a34ba6f2eb9dbf98246ae3ae391b3abe1",
    "table_v3_int4_rotated": "0a04e550709a0dbd52c0ed2b1b11798465517e95f64780b0ca0e792dc1ac2112",
    "table_v3_float32_equal": "cb9bf9625b1d4d0ce095efed96b2d95b71b29833363bf444663ef2c1b1376167",
}
LENGTHS = torch.tensor([1, 4, 2, 3, 4])
EQUAL_LENGTHS = torch.tensor([3, 3, 3, 3, 3])
#: The rotation of the version 2 files and of ``table_v3_int4_rotated``.
ROTATION = torch.tensor([[0.6, 0.8, 0, 0], [-0.8, 0.6, 0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 0]])
TOLERANCE = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3, "int8": 6e-3, "int4": 0.1}


def golden_weight(lengths: torch.Tensor = LENGTHS) -> torch.Tensor:
    """5 x 4 rows from plain arithmetic (no RNG, so no torch version can change them)."""
    rows = [[((i * 7 + j * 3) % 11 - 5) / 4 + j / 10 for j in range(4)] for i in range(5)]
    weight = torch.tensor(rows, dtype=torch.float32)
    weight[~prefix_mask(lengths, 4)] = 0.0
    return weight


def generate(name: str, folder: Path) -> Path:
    dtype, rotated, equal = V3_CASES[name]
    lengths = EQUAL_LENGTHS if equal else LENGTHS
    source = folder / "source.safetensors"
    save_file({"emb.weight": golden_weight(lengths)}, str(source))
    out = folder / f"{name}.safetensors"
    pack_table(
        source, "emb.weight", lengths, out, dtype, "emb", chunk_bytes=32,
        rotation=ROTATION if rotated else None,
    )
    return out


@pytest.mark.parametrize("name", sorted(V3_CASES))
def test_packed_bytes_match_golden(tmp_path: Path, name: str) -> None:
    out = generate(name, tmp_path)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    if os.environ.get("AMTL_REGENERATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        shutil.copyfile(out, GOLDEN / out.name)
        pytest.skip(f"regenerated {out.name}: sha256 {digest}")
    assert digest == V3_SHA256[name]
    assert out.read_bytes() == (GOLDEN / out.name).read_bytes()


@pytest.mark.parametrize("name", sorted(LEGACY_SHA256))
def test_legacy_golden_files_are_unchanged(name: str) -> None:
    raw = (GOLDEN / f"{name}.safetensors").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == LEGACY_SHA256[name]


@pytest.mark.parametrize("name", sorted(LEGACY_SHA256) + sorted(V3_CASES))
def test_golden_files_still_read(name: str) -> None:
    table = read_packed_table(GOLDEN / f"{name}.safetensors")
    version = 3 if name.startswith("table_v3") else 2 if name.startswith("table_v2") else 1
    assert table.format_version == version
    equal = name.endswith("_equal")
    lengths = EQUAL_LENGTHS if equal else LENGTHS
    assert ("row_length" in table.metadata) == equal
    # Every version reads into the same in-memory form (docs/format.md, "Reading").
    assert table.offsets.dtype == torch.int64 and torch.equal(table.lengths, lengths)
    if table.scale is not None and table.bias is not None:
        assert table.scale.dtype == table.bias.dtype == torch.float32
    assert (table.rotation is not None) == ("rotated" in name or version == 2)
    if table.rotation is not None:
        assert torch.equal(table.rotation, ROTATION)
    decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
    expected = golden_weight(lengths)[prefix_mask(lengths, 4)]
    assert (decoded - expected).abs().max().item() <= TOLERANCE[table.dtype]
