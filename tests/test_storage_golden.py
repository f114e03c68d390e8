"""Golden files: the exact bytes of a small packed table in each dtype (docs/format.md, v1).

A change to these bytes is a change to the file format. To regenerate deliberately (after a
format change that bumps ``format_version``, or one you have checked is compatible):

    AMTL_REGENERATE_GOLDEN=1 .venv/bin/pytest tests/test_storage_golden.py

then copy the printed hashes into ``SHA256`` below.
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
SHA256 = {
    "float32": "8246de8cbfa89f321e9ae0e4be0f62f25c0ee006dade00c0a8a1c8ee11fbf230",
    "float16": "b8bda9d5aa92a89a98e4c74bc34d5b72b64e1a7638e0996c6ef68187311b50f8",
    "bfloat16": "2ad7736b82530cf973c52237d7a3c340dad7eb1690b8acf39979c7e74895724d",
    "int8": "04b0ce4aad5c339d5c1c9cbaf18b25ef7ea4e25e1b5aa00b7f548f022f116f88",
}
LENGTHS = torch.tensor([1, 4, 2, 3, 4])


def golden_weight() -> torch.Tensor:
    """5 x 4 rows from plain arithmetic (no RNG, so no torch version can change them)."""
    rows = [[((i * 7 + j * 3) % 11 - 5) / 4 + j / 10 for j in range(4)] for i in range(5)]
    weight = torch.tensor(rows, dtype=torch.float32)
    weight[~prefix_mask(LENGTHS, 4)] = 0.0
    return weight


def generate(dtype: str, folder: Path) -> Path:
    source = folder / "source.safetensors"
    save_file({"emb.weight": golden_weight()}, str(source))
    out = folder / f"table_{dtype}.safetensors"
    pack_table(source, "emb.weight", LENGTHS, out, dtype, "emb", chunk_bytes=32)
    return out


@pytest.mark.parametrize("dtype", sorted(SHA256))
def test_packed_bytes_match_golden(tmp_path: Path, dtype: str) -> None:
    out = generate(dtype, tmp_path)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    if os.environ.get("AMTL_REGENERATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        shutil.copyfile(out, GOLDEN / out.name)
        pytest.skip(f"regenerated {out.name}: sha256 {digest}")
    assert digest == SHA256[dtype]
    assert out.read_bytes() == (GOLDEN / out.name).read_bytes()


@pytest.mark.parametrize("dtype", sorted(SHA256))
def test_golden_files_still_read(dtype: str) -> None:
    table = read_packed_table(GOLDEN / f"table_{dtype}.safetensors")
    decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
    expected = golden_weight()[prefix_mask(LENGTHS, 4)]
    assert torch.equal(table.lengths, LENGTHS)
    tolerance = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3, "int8": 6e-3}[dtype]
    assert (decoded - expected).abs().max().item() <= tolerance
