"""Golden files: the exact bytes of a small packed table in each dtype and format version.

Version 4 files are what ``pack`` writes today: a change to their bytes is a change to the file
format. Versions 1, 2 and 3 files were written by earlier releases and are never regenerated;
they must keep loading. To regenerate the version 4 files deliberately (after a format change
that bumps ``format_version``, or one you have checked is compatible):

    AMTL_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/test_storage_golden.py

then copy the printed hashes into ``V4_SHA256`` below.
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
#: Files of earlier releases (format versions 1, 2 and 3): read, never written again.
LEGACY_SHA256 = {
    "table_float32": "8246de8cbfa89f321e9ae0e4be0f62f25c0ee006dade00c0a8a1c8ee11fbf230",
    "table_float16": "b8bda9d5aa92a89a98e4c74bc34d5b72b64e1a7638e0996c6ef68187311b50f8",
    "table_bfloat16": "2ad7736b82530cf973c52237d7a3c340dad7eb1690b8acf39979c7e74895724d",
    "table_int8": "04b0ce4aad5c339d5c1c9cbaf18b25ef7ea4e25e1b5aa00b7f548f022f116f88",
    "table_v2_float32": "a6f5316476c2663a0b6b381824ab5498d8dbdf1986929867c4b434575d9cbf27",
    "table_v2_int8": "dd662c6e3e4703afa9e9eb90c86146aa93e4c69dd2d1fd08c3974b45ef8cfe77",
    "table_v3_float32": "91892fe91bc9b680e9660ccc7a48702d1fb5c61b34d25c59bda7f71318dbf699",
    "table_v3_float16": "ed961cef9a8dcd20a5bf67903c2f5df88192e9a5392c28bf901f049bef751a64",
    "table_v3_bfloat16": "b17bef113fc81e3b3d1ec8aafb46cb03f1ec501d7b42b5e80d3beeee8bd3cf5d",
    "table_v3_int8": "09bddd7e7572f09036fefa2ff84db50465098de0d80ceba48342f40387276667",
    "table_v3_int4": "36f16e7ad0b8dfefc8481335947f904cf6e36867f032a1b9199f8a3a86ca2f9f",
    "table_v3_int4_rotated": "f2b6b275f557689c7e881b0886a2a861b86e9ebc67720e1566e8e7e2e8551a62",
    "table_v3_float32_equal": "cb9bf9625b1d4d0ce095efed96b2d95b71b29833363bf444663ef2c1b1376167",
}

#: Version 4, as ``pack_table`` writes it: (dtype, rotated, equal lengths) per file.
V4_CASES = {
    "table_v4_float32": ("float32", False, False),
    "table_v4_float16": ("float16", False, False),
    "table_v4_bfloat16": ("bfloat16", False, False),
    "table_v4_int8": ("int8", False, False),
    "table_v4_int4": ("int4", False, False),
    "table_v4_float32_equal": ("float32", False, True),
    "table_v4_float32_rotated": ("float32", True, False),
    "table_v4_float32_rotated_f16": ("float32", True, False),
    "table_v4_float16_rotated": ("float16", True, False),
    "table_v4_bfloat16_rotated": ("bfloat16", True, False),
    "table_v4_int8_rotated": ("int8", True, False),
    "table_v4_int4_rotated": ("int4", True, False),
}
V4_SHA256 = {
    "table_v4_bfloat16": "c3f854d617b99b6eb0e8a07b6ebf06823a9f4e7b550f9ecd3c63b61237a674ca",
    "table_v4_bfloat16_rotated": "5880dd3aa98c43e65e6d66e7bee601f007c0e7cbe59f70840f9e902235aaec8f",
    "table_v4_float16": "a391221536c58c1082305d4db0f550520242caa12334de46b3388aefe1613d06",
    "table_v4_float16_rotated": "721ab002c34114130ca7ca133a8e10a234d3c1069407de188b5851597e0e3961",
    "table_v4_float32": "fa7f52f30d944cad9b54931e59bc33fc5d115dc524ee0c4c34f92f0d67a999fc",
    "table_v4_float32_equal": "9ba46bdae46eb7100859a7deded8f1f2902595b7437e8d2635acd5646e44ed4b",
    "table_v4_float32_rotated": "562965e63980599e92db15cc7a743a337dd7a141b16b7265c1d029555f2b890b",
    "table_v4_float32_rotated_f16": (
        "eadcb2df80f263ccb58d2b951347fa540c1618a40263ad876c1ba24d955c62c0"
    ),
    "table_v4_int4": "444877836c29dcd7d4246f15a488b13c45e5e857516f0774ceee8b50cce12172",
    "table_v4_int4_rotated": "2a46cdf1f97e5b3dcd94b4a83e5a8e4fd0a4f1c87a751c4ecaa247a61e215217",
    "table_v4_int8": "1e1fc8231d3b72bcd28bf6181a43cc6e161725d6c8f8310d21a39484e4eb6309",
    "table_v4_int8_rotated": "ebf95314ae35be59c3324a709f0b2298a86c44784420e4e0fa48f4d4b9b12c66",
}
LENGTHS = torch.tensor([1, 4, 2, 3, 4])
EQUAL_LENGTHS = torch.tensor([3, 3, 3, 3, 3])
#: The rotation of the version 2 files and of the ``*_rotated`` files.
ROTATION = torch.tensor([[0.6, 0.8, 0, 0], [-0.8, 0.6, 0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 0]])
#: ``ROTATION`` rounded to float16 values, as ``ordering="pca"`` makes it: the ``*_f16`` file
#: (float32 values) stores it as F16, exactly.
ROTATION_F16 = ROTATION.half().float()
TOLERANCE = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3, "int8": 6e-3, "int4": 0.2}
#: How far version 4's stored rotation may be from ``ROTATION``, by dtype (float16 and bfloat16
#: round to nearest; int8 codes are within half of a row's step 0.8 / 127).
ROTATION_TOLERANCE = {"float32": 0.0, "float16": 2**-12, "bfloat16": 2**-9, "int8": 0.4 / 127,
                      "int4": 0.4 / 127}


def golden_weight(lengths: torch.Tensor = LENGTHS) -> torch.Tensor:
    """5 x 4 rows from plain arithmetic (no RNG, so no torch version can change them)."""
    rows = [[((i * 7 + j * 3) % 11 - 5) / 4 + j / 10 for j in range(4)] for i in range(5)]
    weight = torch.tensor(rows, dtype=torch.float32)
    weight[~prefix_mask(lengths, 4)] = 0.0
    return weight


def generate(name: str, folder: Path) -> Path:
    dtype, rotated, equal = V4_CASES[name]
    lengths = EQUAL_LENGTHS if equal else LENGTHS
    source = folder / "source.safetensors"
    save_file({"emb.weight": golden_weight(lengths)}, str(source))
    out = folder / f"{name}.safetensors"
    pack_table(
        source, "emb.weight", lengths, out, dtype, "emb", chunk_bytes=32,
        rotation=(ROTATION_F16 if name.endswith("_f16") else ROTATION) if rotated else None,
    )
    return out


@pytest.mark.parametrize("name", sorted(V4_CASES))
def test_packed_bytes_match_golden(tmp_path: Path, name: str) -> None:
    out = generate(name, tmp_path)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    if os.environ.get("AMTL_REGENERATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        shutil.copyfile(out, GOLDEN / out.name)
        pytest.skip(f"regenerated {out.name}: sha256 {digest}")
    assert digest == V4_SHA256[name]
    assert out.read_bytes() == (GOLDEN / out.name).read_bytes()


@pytest.mark.parametrize("name", sorted(LEGACY_SHA256))
def test_legacy_golden_files_are_unchanged(name: str) -> None:
    raw = (GOLDEN / f"{name}.safetensors").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == LEGACY_SHA256[name]


@pytest.mark.parametrize("name", sorted(LEGACY_SHA256) + sorted(V4_CASES))
def test_golden_files_still_read(name: str) -> None:
    table = read_packed_table(GOLDEN / f"{name}.safetensors")
    version = int(name[len("table_v")]) if name.startswith("table_v") else 1
    assert table.format_version == version
    equal = name.endswith("_equal")
    lengths = EQUAL_LENGTHS if equal else LENGTHS
    assert ("row_length" in table.metadata) == equal
    index = read_header(GOLDEN / f"{name}.safetensors").tensors.get(
        "offsets" if version < 3 else "lengths"
    )
    # The row index: int64 offsets in versions 1 and 2, uint8 lengths (D = 4) in 3 and 4.
    assert (index.dtype if index else None) == (None if equal else "I64" if version < 3 else "U8")
    # Every version reads into the same in-memory form (docs/format.md, "Reading").
    assert table.offsets.dtype == torch.int64 and torch.equal(table.lengths, lengths)
    if table.scale is not None and table.bias is not None:
        assert table.scale.dtype == table.bias.dtype == torch.float32
    assert (table.rotation is not None) == ("rotated" in name or version == 2)
    if table.rotation is not None:
        # float32 in versions 2 and 3; version 4 stores it at the values' precision.
        tolerance = ROTATION_TOLERANCE[table.dtype] if version == 4 else 0.0
        f16_exact = name.endswith("_f16")
        assert table.rotation.dtype == torch.float32
        expected_rotation = ROTATION_F16 if f16_exact else ROTATION
        assert (table.rotation - expected_rotation).abs().max().item() <= tolerance
        stored = read_header(GOLDEN / f"{name}.safetensors").tensors["rotation"].dtype
        code = {"float16": "F16", "bfloat16": "BF16", "int8": "I8", "int4": "I8"}
        if f16_exact:  # a float32 table's float16-exact rotation: F16, widened exactly
            code["float32"] = "F16"
        assert stored == (code.get(table.dtype, "F32") if version == 4 else "F32")
    # int4 stores a float16 bias in version 3 and none in version 4 (bias = -8 * scale).
    if table.dtype == "int4" and table.scale is not None and table.bias is not None:
        assert torch.equal(table.bias, table.scale * -8) == (version == 4)
    decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
    expected = golden_weight(lengths)[prefix_mask(lengths, 4)]
    assert (decoded - expected).abs().max().item() <= TOLERANCE[table.dtype]
