"""The read-ahead helper of ``pack_table``: order, hashing, errors and thread cleanup."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from amtl_compress.errors import RunDirError
from amtl_compress.storage.format import prefix_mask, read_packed_table
from amtl_compress.storage.pack import pack_table
from amtl_compress.storage.quantize import dequantize_values
from amtl_compress.storage.table_pack import _ChunkReader


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("amtl-pack-read")]


def raw_file(tmp_path: Path, n: int, d: int, offset: int = 13) -> tuple[Path, np.ndarray]:
    """``offset`` junk bytes, then an (n, d) float32 table; returns the path and the table."""
    table = np.arange(n * d, dtype=np.float32).reshape(n, d) * np.float32(0.5)
    path = tmp_path / "raw.bin"
    path.write_bytes(b"x" * offset + table.tobytes() + b"tail")
    return path, table


@pytest.mark.parametrize("n,chunk_rows", [(10, 3), (9, 3), (1, 4), (7, 100), (0, 3)])
def test_chunks_come_in_row_order_and_are_hashed_in_file_order(
    tmp_path: Path, n: int, chunk_rows: int
) -> None:
    d = 4
    path, table = raw_file(tmp_path, n, d)
    digest = hashlib.sha256()
    starts, rows = [], []
    with _ChunkReader(path, 13, n, d, np.dtype("<f4"), chunk_rows, digest) as chunks:
        for start, view in chunks:
            starts.append(start)
            rows.append(view.reshape(-1, d).copy())  # the buffer is reused two chunks later
    assert starts == list(range(0, n, chunk_rows))
    assert all(len(r) == min(chunk_rows, n - s) for s, r in zip(starts, rows, strict=True))
    got = np.concatenate(rows) if rows else np.empty((0, d), dtype=np.float32)
    assert np.array_equal(got, table)
    assert digest.hexdigest() == hashlib.sha256(table.tobytes()).hexdigest()
    assert not reader_threads()


def test_a_read_error_in_the_helper_reaches_the_caller(tmp_path: Path) -> None:
    path, _ = raw_file(tmp_path, 10, 4, offset=0)
    # Claim 40 rows where the file holds 10 (and 4 bytes): the 4th chunk comes up short.
    with (
        pytest.raises(RunDirError, match=r"`.*raw.bin` ended while reading a table"),
        _ChunkReader(path, 0, 40, 4, np.dtype("<f4"), 3, hashlib.sha256()) as chunks,
    ):
        for _ in chunks:
            pass
    assert not reader_threads()


def test_leaving_early_stops_the_helper(tmp_path: Path) -> None:
    path, _ = raw_file(tmp_path, 100, 4)
    with _ChunkReader(path, 13, 100, 4, np.dtype("<f4"), 2, hashlib.sha256()) as chunks:
        for start, _view in chunks:
            if start == 4:
                break
    assert not reader_threads()


def test_an_error_while_encoding_stops_the_helper_and_leaves_no_file(tmp_path: Path) -> None:
    # Row 30 of 40 holds inf in its kept prefix; with 2-row chunks, reads are still in flight
    # when the encoder rejects it.
    n, d = 40, 3
    weight = torch.randn(n, d)
    weight[30, 0] = float("inf")
    save_file({"t.weight": weight}, str(tmp_path / "s.safetensors"))
    out = tmp_path / "t.safetensors"
    with pytest.raises(RunDirError, match="table `t` row 30 holds a non-finite value"):
        pack_table(
            tmp_path / "s.safetensors", "t.weight", torch.full((n,), d), out, "float32", "t",
            chunk_bytes=2 * d * 4,
        )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
    assert not reader_threads()


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
def test_many_small_chunks_give_the_same_file_and_digest(tmp_path: Path, dtype: str) -> None:
    torch.manual_seed(0)
    n, d = 301, 7
    lengths = torch.randint(1, d + 1, (n,))
    lengths[::50] = 1  # rows of one value (int8/int4: a range of one point)
    lengths[1] = 2  # int4: an odd number of values in the first chunks (a code crosses a chunk)
    weight = torch.randn(n, d)
    weight[~prefix_mask(lengths, d)] = 0.0
    save_file({"t.weight": weight}, str(tmp_path / "s.safetensors"))
    files = []
    for chunk_bytes in (d * 4, 5 * d * 4, 1 << 30):  # 301 chunks, 61 chunks, one chunk
        out = tmp_path / f"t{chunk_bytes}.safetensors"
        report = pack_table(
            tmp_path / "s.safetensors", "t.weight", lengths, out, dtype, "t",
            chunk_bytes=chunk_bytes,
        )
        assert report.source_sha256 == hashlib.sha256(weight.numpy().tobytes()).hexdigest()
        files.append(out.read_bytes())
    assert files[0] == files[1] == files[2]
    table = read_packed_table(tmp_path / f"t{d * 4}.safetensors", mmap=False)
    assert torch.equal(table.lengths, lengths)
    if dtype in ("int8", "int4"):
        assert table.scale is not None and table.bias is not None
        decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
        step = table.scale.repeat_interleave(lengths)
        slack = 1e-6
        assert ((decoded - weight[prefix_mask(lengths, d)]).abs() <= step / 2 + slack).all()
