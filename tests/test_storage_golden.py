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
from amtl_compress.storage.header import read_header
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
    "table_v3_float32": "91892fe91bc9b680e9660ccc7a48702d1fb5c61b34d25c59bda7f71318dbf699",
    "table_v3_float16": "ed961cef9a8dcd20a5bf67903c2f5df88192e9a5392c28bf901f049bef751a64",
    "table_v3_bfloat16": "b17bef113fc81e3b3d1ec8aafb46cb03f1ec501d7b42b5e80d3beeee8bd3cf5d",
    "table_v3_int8": "09bddd7e7572f09036fefa2ff84db50465098de0d80ceba48342f40387276667",
    "table_v3_int4": "36f16e7ad0b8dfefc8481335947f904cf6e36867f032a1b9199f8a3a86ca2f9f",
    "table_v3_int4_rotated": "f2b6b275f557689c7e881b0886a2a861b86e9ebc67720e1566e8e7e2e8551a62",
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
    index = read_header(GOLDEN / f"{name}.safetensors").tensors.get(
        "offsets" if version < 3 else "lengths"
    )
    # The row index: int64 offsets in versions 1 and 2, uint8 lengths (D = 4) in version 3.
    assert (index.dtype if index else None) == (None if equal else "I64" if version < 3 else "U8")
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
