"""The packed table file: writer, reader, and every validation rule of docs/format.md."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from amtl_compress.errors import PackedFormatError
from amtl_compress.storage.format import (
    prefix_mask,
    read_packed_table,
    source_digest,
    write_packed_table,
)
from amtl_compress.storage.header import encode_header, read_header
from amtl_compress.storage.quantize import (
    dequantize_values,
    int4_encode,
    int8_encode,
    pack_nibbles,
)

GOLDEN = Path(__file__).parent / "golden"

D = 4
LENGTHS = torch.tensor([2, 1, 4])


def dense_rows() -> torch.Tensor:
    """The worked example of docs/format.md: 3 rows, D = 4, tails zeroed."""
    return torch.tensor(
        [[0.5, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.25, 0.75, 1.5, -2.0]]
    )


def packed(weight: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = prefix_mask(lengths, weight.shape[1])
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return weight[mask], offsets


#: A 4 x 4 rotation (orthogonal; 0.6 and 0.8 are not float16 values).
ROTATION = torch.tensor([[0.6, 0.8, 0, 0], [-0.8, 0.6, 0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 0]])


def write_table(path: Path, dtype: str = "float32", rotated: bool = False) -> torch.Tensor:
    """Write the worked example in ``dtype`` (with ``ROTATION`` if ``rotated``); return the
    dense rows."""
    weight = dense_rows()
    values, offsets = packed(weight, LENGTHS)
    scale = bias = None
    if dtype == "int8":
        values, scale, bias = int8_encode(values, LENGTHS)
    elif dtype == "int4":
        codes, scale, bias = int4_encode(values, LENGTHS)
        values = pack_nibbles(codes)
    else:
        values = values.to(getattr(torch, dtype))
    write_packed_table(
        path, values, offsets, embedding_dim=D, field="emb", source_sha256=source_digest(weight),
        scale=scale, bias=bias, rotation=ROTATION if rotated else None,
    )
    return weight


# --- round trip -------------------------------------------------------------------------------


def test_worked_example_matches_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path)
    table = read_packed_table(path)
    assert table.offsets.tolist() == [0, 2, 3, 7]
    assert table.lengths.tolist() == [2, 1, 4]
    assert table.values.tolist() == [0.5, -1.0, 2.0, 0.25, 0.75, 1.5, -2.0]
    assert (table.num_embeddings, table.embedding_dim, table.dtype, table.field) == (
        3, 4, "float32", "emb",
    )
    assert table.scale is None and table.bias is None
    # The header text shown in docs/format.md.
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = raw[8 : 8 + n].decode().rstrip(" ")
    assert header.endswith(
        '"values":{"dtype":"F32","shape":[7],"data_offsets":[0,28]},'
        '"lengths":{"dtype":"U8","shape":[3],"data_offsets":[28,31]}}'
    )
    assert header.startswith('{"__metadata__":{"dtype":"float32","embedding_dim":"4","field":"emb"')
    assert '"format_version":"4"' in header and "row_length" not in header
    assert raw[8 + n + 28 :] == bytes([2, 1, 4])  # the lengths, one byte each (D <= 255)
    assert table.offsets.dtype == torch.int64  # their cumulative sum on read
    assert table.format_version == 4
    assert (table.stored.values, table.stored.index, table.stored.row_metadata) == (28, 3, 0)


def test_worked_example_int8_matches_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path, "int8")
    table = read_packed_table(path)
    # Row 2: lo = -2, hi = 1.5, scale = 3.5 / 255; 0.25 -> 35.93 -> 36, 0.75 -> 72.36 -> 72.
    assert table.values.tolist() == [127, -128, 0, 36, 72, 127, -128]
    assert table.scale is not None and table.bias is not None
    assert table.scale.dtype == table.bias.dtype == torch.float32  # widened from F16 on read
    assert table.scale[1].item() == 0.0 and table.bias[1].item() == 2.0
    # The numbers of docs/format.md's worked example.
    assert table.bias[0].item() == -0.2470703125
    assert table.scale[0].item() == pytest.approx(0.0058861, abs=1e-7)
    assert table.scale[0].item() == pytest.approx(1.5 / 255, rel=1e-3)
    header = read_header(path)
    order = sorted(header.tensors.values(), key=lambda e: e.offset)
    assert [e.name for e in order] == ["bias", "scale", "lengths", "values"]
    assert [e.nbytes for e in order] == [6, 6, 3, 7]
    assert [e.dtype for e in order] == ["F16", "F16", "U8", "I8"]


def test_worked_example_int4_matches_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    weight = write_table(path, "int4")
    table = read_packed_table(path)
    assert table.values.dtype == torch.uint8
    # Codes [12, 0 | 15 | 9, 11, 14, 0] (zero is code 8), two a byte, low nibble first.
    assert [hex(b) for b in table.values.tolist()] == ["0xc", "0x9f", "0xeb", "0x0"]
    assert table.scale is not None and table.bias is not None
    # Row 0: max(1 / 8, 0.5 / 7) = 0.125; row 1: f16up(2 / 7); row 2: max(2 / 8, 1.5 / 7).
    assert table.scale.tolist() == [0.125, 0.285888671875, 0.25]
    assert torch.equal(table.bias, table.scale * -8)  # not stored: -8 * scale, on read
    decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
    expected, _ = packed(weight, LENGTHS)
    assert decoded.tolist() == [0.5, -1.0, 2.001220703125, 0.25, 0.75, 1.5, -2.0]
    assert ((decoded - expected).abs() <= table.scale.repeat_interleave(LENGTHS) / 2 + 1e-6).all()
    header = read_header(path)
    order = sorted(header.tensors.values(), key=lambda e: e.offset)
    assert [(e.name, e.dtype, e.nbytes) for e in order] == [
        ("scale", "F16", 6), ("lengths", "U8", 3), ("values", "U8", 4),
    ]
    assert table.stored is not None and table.stored.row_metadata == 6


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
def test_equal_lengths_store_no_index(tmp_path: Path, dtype: str) -> None:
    path = tmp_path / "t.safetensors"
    weight = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.25, 0.0], [1.5, -2.0, 0.0]])
    lengths = torch.tensor([2, 2, 2])
    values, offsets = packed(weight, lengths)
    scale = bias = None
    if dtype == "int8":
        values, scale, bias = int8_encode(values, lengths)
    elif dtype == "int4":
        codes, scale, bias = int4_encode(values, lengths)
        values = pack_nibbles(codes)
    stored = write_packed_table(
        path, values, offsets, embedding_dim=3, field="e", source_sha256=source_digest(weight),
        scale=scale, bias=bias,
    )
    assert stored.index == 0
    header = read_header(path)
    assert "lengths" not in header.tensors and header.metadata["row_length"] == "2"
    table = read_packed_table(path)
    assert table.offsets.tolist() == [0, 2, 4, 6] and table.offsets.dtype == torch.int64
    assert table.stored == stored
    # Reading and writing again gives the same bytes.
    again = tmp_path / "again.safetensors"
    write_packed_table(
        again, table.values, table.offsets, embedding_dim=3, field="e",
        source_sha256=source_digest(weight), scale=table.scale, bias=table.bias,
    )
    assert again.read_bytes() == path.read_bytes()


def test_index_is_the_smallest_unsigned_dtype_that_holds_d() -> None:
    from amtl_compress.storage.format import table_layout

    def index(d: int, dtype: str = "float32") -> tuple[str, str, tuple[int, ...]]:
        return next(e for e in table_layout(3, d, 6, dtype) if e[0] == "lengths")

    assert index(1) == index(255) == ("lengths", "U8", (3,))
    assert index(256) == index(65535) == ("lengths", "U16", (3,))
    assert index(65536) == ("lengths", "U32", (3,))
    # However many values: the lengths are bounded by D, not by S.
    assert ("lengths", "U8", (3,)) in table_layout(3, 64, 2**40, "float32")
    assert [e[0] for e in table_layout(3, 4, 6, "float32", row_length=2)] == ["values"]
    assert table_layout(3, 4, 7, "int4")[-1] == ("values", "U8", (4,))
    # Largest item size first, so each tensor starts at a multiple of its item size.
    assert [e[0] for e in table_layout(3, 300, 6, "float32", rotated=True)] == [
        "rotation", "values", "lengths",
    ]
    assert [e[0] for e in table_layout(3, 300, 6, "int8", rotated=True)] == [
        "rotation_scale", "lengths", "bias", "scale", "rotation", "values",
    ]
    # Version 4: the rotation at the values' precision; int4 stores a scale and no bias.
    assert [e[:2] for e in table_layout(3, 4, 6, "int4", rotated=True)] == [
        ("rotation_scale", "F16"), ("scale", "F16"), ("rotation", "I8"), ("lengths", "U8"),
        ("values", "U8"),
    ]
    for dtype, code in (("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")):
        assert table_layout(3, 4, 6, dtype, rotated=True)[0] == ("rotation", code, (4, 4))
    # float32 with a float16-exact rotation: F16, laid out after the F32 values.
    assert [e[:2] for e in table_layout(3, 4, 6, "float32", rotated=True,
                                        rotation_code="F16")] == [
        ("values", "F32"), ("rotation", "F16"), ("lengths", "U8"),
    ]
    with pytest.raises(ValueError, match="rotation_code 'BF16'"):
        table_layout(3, 4, 6, "float32", rotated=True, rotation_code="BF16")
    assert [e[0] for e in table_layout(3, 70000, 6, "float16")] == ["lengths", "values"]


@pytest.mark.parametrize("d,code", [(255, "U8"), (256, "U16"), (300, "U16")])
@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_round_trip_with_each_index_dtype(tmp_path: Path, d: int, code: str, dtype: str) -> None:
    path = tmp_path / "t.safetensors"
    lengths = torch.tensor([d, 1, 7, d - 1])
    weight = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    weight[~prefix_mask(lengths, d)] = 0.0
    values, offsets = packed(weight, lengths)
    scale = bias = None
    if dtype == "int4":
        codes, scale, bias = int4_encode(values, lengths)
        values = pack_nibbles(codes)
    stored = write_packed_table(
        path, values, offsets, embedding_dim=d, field="e", source_sha256=source_digest(weight),
        scale=scale, bias=bias,
    )
    assert read_header(path).tensors["lengths"].dtype == code
    assert stored.index == 4 * {"U8": 1, "U16": 2}[code]
    table = read_packed_table(path)
    assert torch.equal(table.offsets, offsets) and table.stored == stored


def test_writer_rejects_parameters_that_are_not_float16(tmp_path: Path) -> None:
    values, offsets = packed(dense_rows(), LENGTHS)
    q, scale, bias = int8_encode(values, LENGTHS, float16_params=False)
    with pytest.raises(PackedFormatError, match="`scale` holds values that are not float16"):
        write_packed_table(
            tmp_path / "t.safetensors", q, offsets, embedding_dim=4, field="e",
            source_sha256="0" * 64, scale=scale, bias=bias,
        )


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_each_dtype(tmp_path: Path, dtype: str, mmap: bool) -> None:
    path = tmp_path / "t.safetensors"
    weight = write_table(path, dtype)
    table = read_packed_table(path, mmap=mmap)
    decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
    expected, _ = packed(weight, LENGTHS)
    if dtype in ("int8", "int4"):
        assert table.scale is not None
        tolerance = 0.5 * table.scale.repeat_interleave(table.lengths) + 1e-6
        assert ((decoded - expected).abs() <= tolerance).all()
    else:
        # This example is exactly representable in every float dtype.
        assert torch.equal(decoded, expected)
        assert table.values.dtype == getattr(torch, dtype)
    assert table.metadata["source_sha256"] == source_digest(weight)


def test_safetensors_reads_our_files(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path, "int8")
    table = read_packed_table(path, mmap=False)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "amtl-packed-table"
        assert sorted(f.keys()) == ["bias", "lengths", "scale", "values"]
        assert torch.equal(f.get_tensor("values"), table.values)
        assert torch.equal(f.get_tensor("lengths").to(torch.int64), table.lengths)
        assert torch.equal(f.get_tensor("scale").float(), table.scale)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_mmap_maps_values_instead_of_reading(tmp_path: Path) -> None:
    mapped, read = tmp_path / "mapped.safetensors", tmp_path / "read.safetensors"
    write_table(mapped)
    write_table(read)
    a = read_packed_table(mapped, mmap=True)
    b = read_packed_table(read, mmap=False)
    maps = Path("/proc/self/maps").read_text()
    assert str(mapped) in maps
    assert str(read) not in maps
    assert torch.equal(a.values, b.values)
    # Copy-on-write: writing to the mapped tensor never reaches the file.
    before = mapped.read_bytes()
    a.values[0] = 99.0
    assert mapped.read_bytes() == before


def test_empty_table_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_packed_table(
        path, torch.zeros(0), torch.zeros(1, dtype=torch.int64), embedding_dim=8, field="e",
        source_sha256=source_digest(torch.zeros(0, 8)),
    )
    table = read_packed_table(path)
    assert table.num_embeddings == 0 and table.values.numel() == 0


def test_writer_rejects_bad_tables_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    values, offsets = packed(dense_rows(), LENGTHS)
    with pytest.raises(PackedFormatError, match=r"row 2 has length 4, outside \[1, embedding_dim"):
        write_packed_table(
            path, values, offsets, embedding_dim=3, field="e", source_sha256="0" * 64
        )
    with pytest.raises(PackedFormatError, match="tensors must be exactly"):
        write_packed_table(
            path, values.to(torch.int8), offsets, embedding_dim=4, field="e", source_sha256="0" * 64
        )
    with pytest.raises(PackedFormatError, match="has dtype torch.float64"):
        write_packed_table(
            path, values.double(), offsets, embedding_dim=4, field="e", source_sha256="0" * 64
        )
    assert list(tmp_path.iterdir()) == []


# --- validation: tamper with a valid file -----------------------------------------------------


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def set_index(header: dict, data: bytes, name: str, numbers: list[int]) -> bytes:
    """Overwrite the integers of ``offsets`` (versions 1, 2) or ``lengths`` (version 3)."""
    begin, end = header[name]["data_offsets"]
    code = {"U8": "u1", "U16": "<u2", "U32": "<u4", "I64": "<i8"}[header[name]["dtype"]]
    raw = np.asarray(numbers, dtype=code).tobytes()
    assert len(raw) == end - begin
    return data[:begin] + raw + data[end:]


def meta(key: str, value: str | None) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        if value is None:
            del h["__metadata__"][key]
        else:
            h["__metadata__"][key] = value
        return h, d

    return edit


def shift(name: str, by: int) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        h[name]["data_offsets"] = [o + by for o in h[name]["data_offsets"]]
        return h, d

    return edit


def offsets_are(values: list[int]) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    return lambda h, d: (h, set_index(h, d, "offsets", values))


def lengths_are(values: list[int]) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    return lambda h, d: (h, set_index(h, d, "lengths", values))


def retype(name: str, dtype: str, shape: list[int]) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        h[name]["dtype"], h[name]["shape"] = dtype, shape
        return h, d

    return edit


def rename(old: str, new: str) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        h[new] = h.pop(old)
        return h, d

    return edit


def drop(name: str) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """Remove a tensor and its bytes, keeping the data region tiled."""

    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        begin, end = h.pop(name)["data_offsets"]
        for info in (v for k, v in h.items() if k != "__metadata__"):
            if info["data_offsets"][0] >= end:
                info["data_offsets"] = [o - (end - begin) for o in info["data_offsets"]]
        return h, d[:begin] + d[end:]

    return edit


def grow(h: dict, d: bytes, numel: int) -> tuple[dict, bytes]:
    """Claim that `lengths` (the last tensor) holds ``numel`` bytes, more than the file has."""
    begin = h["lengths"]["data_offsets"][0]
    h["lengths"].update(shape=[numel], data_offsets=[begin, begin + numel])
    return h, d


def widen_lengths(code: str) -> Callable[[dict, bytes], tuple[dict, bytes]]:
    """Store the lengths in a wider dtype (U16, U32), keeping the data region tiled."""

    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        begin, end = h["lengths"]["data_offsets"]
        raw = np.frombuffer(d[begin:end], dtype="u1").astype({"U16": "<u2", "U32": "<u4"}[code])
        grown = raw.nbytes - (end - begin)
        for info in (v for k, v in h.items() if k != "__metadata__"):
            if info["data_offsets"][0] >= end:
                info["data_offsets"] = [o + grown for o in info["data_offsets"]]
        h["lengths"].update(dtype=code, data_offsets=[begin, begin + raw.nbytes])
        return h, d[:begin] + raw.tobytes() + d[end:]

    return edit


def add_tensor(h: dict, d: bytes) -> tuple[dict, bytes]:
    h["extra"] = {"dtype": "U8", "shape": [1], "data_offsets": [len(d), len(d) + 1]}
    return h, d + b"\x00"


TAMPERS: list[tuple[str, Callable[[dict, bytes], tuple[dict, bytes]], str]] = [
    # The worked example's data region: `values` F32 [0, 28), then `lengths` U8 [28, 31).
    ("overlap", shift("lengths", -4), "tensor `lengths` overlaps the previous tensor's data"),
    ("hole", lambda h, d: shift("lengths", 4)(h, d[:28] + b"\0" * 4 + d[28:]), "hole in the data"),
    ("past end", lambda h, d: grow(h, d, 20), r"truncated file \(data region needs 48 bytes, file"),
    ("trailing", lambda h, d: (h, d + b"\0" * 8), "8 trailing bytes after the last tensor"),
    ("span != shape", retype("values", "F32", [6]), r"spans 28 bytes but F32\[6\] needs 24"),
    ("unknown dtype", retype("values", "F99", [7]), "unknown dtype `F99`"),
    ("bad shape", retype("values", "F32", [-7]), "malformed shape"),
    ("missing values", drop("values"), r"missing tensor\(s\) `values`"),
    ("missing lengths", drop("lengths"), r"missing tensor\(s\) `lengths`"),
    ("extra tensor", add_tensor, r"unexpected tensor\(s\) `extra`"),
    ("lengths signed", retype("lengths", "I8", [3]),
     "`lengths` has dtype I8, expected U8 for embedding_dim 4"),
    # The index dtype is fixed by D: a wider one than D needs is rejected too.
    ("lengths U16", widen_lengths("U16"), "`lengths` has dtype U16, expected U8 for embedding_dim"),
    ("lengths U32", widen_lengths("U32"), "`lengths` has dtype U32, expected U8 for embedding_dim"),
    ("U8 for D 300", meta("embedding_dim", "300"), "`lengths` has dtype U8, expected U16 for emb"),
    ("lengths shape", retype("lengths", "U8", [1, 3]), r"`lengths` has shape \[1, 3\], expected"),
    # Version 3 has no `offsets` (version 1 and 2's index).
    ("v3 offsets", rename("lengths", "offsets"), r"missing tensor\(s\) `lengths`"),
    ("v1 with lengths", meta("format_version", "1"), r"missing tensor\(s\) `offsets`"),
    ("row_length", meta("row_length", "2"), r"unexpected tensor\(s\) `lengths`"),
    ("row_length 0", meta("row_length", "0"), r"`row_length` is `0`, must be a decimal integer in"),
    ("row_length > D", meta("row_length", "5"), r"`row_length` is `5`, must be .* \[1, embedding"),
    ("values dtype", retype("values", "I32", [7]), "`values` has dtype I32, metadata says F32"),
    ("values 2-D", retype("values", "F32", [7, 1]), r"`values` has shape \[7, 1\], must be 1-D"),
    ("zero length", lengths_are([2, 0, 4]), r"row 1 has length 0, outside \[1, embedding_dim=4"),
    ("length > D", lengths_are([2, 1, 5]), r"row 2 has length 5, outside \[1, embedding_dim=4"),
    ("length 255", lengths_are([255, 1, 4]), r"row 0 has length 255, outside \[1, embedding_di"),
    ("sum > S", lengths_are([2, 2, 4]), r"`lengths` sum to S = 8 values, which need 8 entries"),
    ("sum < S", lengths_are([2, 1, 3]), r"sum to S = 6 values, which need 6 entries of `values`"),
    ("no format", meta("format", None), r"metadata key\(s\) `format` missing"),
    ("wrong format", meta("format", "other"), "metadata `format` is `other`"),
    ("version", meta("format_version", "5"), "format_version `5` is not supported"),
    ("N unparsable", meta("num_embeddings", "three"), "`num_embeddings` is `three`, not a"),
    ("D zero", meta("embedding_dim", "0"), r"`embedding_dim` is 0, must be in \[1, 65536\]"),
    # Consistent with every row length, but a lookup would allocate a (B, D) output of ~800 GB.
    ("D huge", meta("embedding_dim", "99999999999"), "`embedding_dim` is 99999999999, must be in"),
    ("N mismatch", meta("num_embeddings", "4"), r"`lengths` has shape \[3\], expected \[4\]"),
    ("dtype name", meta("dtype", "fp8"), "metadata `dtype` is `fp8`"),
    ("int8 no scale", meta("dtype", "int8"), r"missing tensor\(s\) `bias`, `scale`"),
    # Version 4 int4 stores a scale and no bias (version 3: both).
    ("int4 no scale", meta("dtype", "int4"), r"missing tensor\(s\) `scale`;"),
    ("source dtype", meta("source_dtype", "int4"), "metadata `source_dtype` is `int4`"),
    ("empty field", meta("field", ""), "metadata `field` is empty"),
    ("sha", meta("source_sha256", "abc"), "`source_sha256` is not 64 lowercase hex digits"),
    ("meta type", lambda h, d: ({**h, "__metadata__": {"f": 3}}, d), "map strings to strings"),
]


@pytest.mark.parametrize("edit,message", [t[1:] for t in TAMPERS], ids=[t[0] for t in TAMPERS])
def test_reader_rejects_tampered_header_or_index(
    tmp_path: Path, edit: Callable[[dict, bytes], tuple[dict, bytes]], message: str
) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path)
    header, data = split(path)
    join(path, *edit(header, data))
    with pytest.raises(PackedFormatError, match=message) as info:
        read_packed_table(path)
    text = str(info.value)
    assert text.startswith(f"`{path}`: ") and "\n" not in text
    assert text.endswith("; re-create it with `pack`")


@pytest.mark.parametrize(
    "edit,problem",
    [
        (
            meta("format_version", "5"),
            "format_version `5` is not supported (this amtl-compress reads versions 1, 2, 3, 4; "
            "a later release wrote it)",
        ),
        (lengths_are([2, 0, 4]), "row 1 has length 0, outside [1, embedding_dim=4]"),
        (
            lengths_are([2, 2, 4]),
            "`lengths` sum to S = 8 values, which need 8 entries of `values`; it holds 7",
        ),
    ],
    ids=["version", "zero length", "lengths past values"],
)
def test_reader_error_strings_are_pinned(
    tmp_path: Path, edit: Callable[[dict, bytes], tuple[dict, bytes]], problem: str
) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path)
    join(path, *edit(*split(path)))
    with pytest.raises(PackedFormatError) as info:
        read_packed_table(path)
    assert str(info.value) == f"`{path}`: {problem}; re-create it with `pack`"


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"\x01\x02", r"truncated file \(2 bytes"),
        (struct.pack("<Q", 200_000_000), "header length 200000000 exceeds"),
        (struct.pack("<Q", 64) + b"{}", r"truncated file \(header needs 72 bytes, file has 10\)"),
        (struct.pack("<Q", 5) + b"{nope", "header is not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "header is not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", "header JSON is not an object"),
    ],
    ids=["under 8 bytes", "header too large", "header past end", "bad JSON", "not UTF-8", "array"],
)
def test_reader_rejects_broken_containers(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(raw)
    with pytest.raises(PackedFormatError, match=message):
        read_packed_table(path)


def test_reader_rejects_truncated_copy_of_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(PackedFormatError, match="truncated file"):
        read_packed_table(path)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s, b: (s.fill_(float("nan")), b), "non-finite"),
        (lambda s, b: (s, b.fill_(float("inf"))), "non-finite"),
        (lambda s, b: (s.fill_(-1.0), b), "`scale` holds a negative value"),
    ],
    ids=["nan scale", "inf bias", "negative scale"],
)
def test_reader_rejects_bad_affine_parameters(
    tmp_path: Path, edit: Callable, message: str, dtype: str
) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path, dtype)
    header, data = split(path)
    names = [name for name in ("scale", "bias") if name in header]  # version 4 int4: no bias
    arrays = {}
    for name in names:
        begin, end = header[name]["data_offsets"]
        arrays[name] = torch.from_numpy(np.frombuffer(data[begin:end], dtype="<f2").copy())
    edit(arrays["scale"], arrays.get("bias", torch.zeros(0, dtype=torch.float16)))
    if "bias" not in names and message == "non-finite" and torch.isfinite(arrays["scale"]).all():
        pytest.skip("version 4 int4 stores no bias")
    for name in names:
        begin, end = header[name]["data_offsets"]
        data = data[:begin] + arrays[name].numpy().tobytes() + data[end:]
    join(path, header, data)
    with pytest.raises(PackedFormatError, match=message):
        read_packed_table(path)


def test_reader_rejects_missing_file_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(PackedFormatError, match=re.escape(f"`{tmp_path / 'nope'}`: cannot read")):
        read_packed_table(tmp_path / "nope")


# --- the header helper ------------------------------------------------------------------------


def test_encode_header_pads_to_8_and_places_tensors_back_to_back() -> None:
    prefix, starts = encode_header([("a", "I64", (3,)), ("b", "I8", (5,))], {"k": "v"})
    assert len(prefix) % 8 == 0
    assert starts == {"a": len(prefix), "b": len(prefix) + 24}
    (n,) = struct.unpack("<Q", prefix[:8])
    doc = json.loads(prefix[8 : 8 + n])
    assert doc["__metadata__"] == {"k": "v"}
    assert doc["b"]["data_offsets"] == [24, 29]


# --- fuzz: any corruption is a PackedFormatError or a valid table, never a crash ---------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    dtype=st.sampled_from(["float32", "int8", "int4"]),
    rotated=st.booleans(),
)
def test_fuzzed_files_fail_cleanly(tmp_path: Path, edits, cut, dtype, rotated) -> None:
    path = tmp_path / f"fuzz_{dtype}.safetensors"
    write_table(path, dtype, rotated)
    raw = bytearray(path.read_bytes())
    for position, byte in edits:
        raw[position % len(raw)] = byte
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    path.write_bytes(bytes(raw))
    try:
        table = read_packed_table(path, mmap=False)
    except PackedFormatError as e:
        assert "\n" not in str(e)
        return
    # Accepted: then it must be internally consistent (a flipped value byte is allowed through).
    num_values = int(table.offsets[-1])
    expected_count = (num_values + 1) // 2 if table.dtype == "int4" else num_values
    assert expected_count == table.values.numel()
    assert (table.lengths >= 1).all() and (table.lengths <= table.embedding_dim).all()
    if table.rotation is not None:
        assert table.rotation.dtype == torch.float32 and torch.isfinite(table.rotation).all()



@pytest.mark.parametrize(
    "lengths,message",
    [
        # S = 6 and 8 need 3 and 4 bytes; the file holds 4 (S = 7): only the second fits.
        ([2, 1, 3], r"sum to S = 6 values, which need 3 bytes of int4 `values`; it holds 4"),
        ([1, 1, 2], r"sum to S = 4 values, which need 2 bytes of int4 `values`; it holds 4"),
        ([2, 0, 4], r"row 1 has length 0, outside \[1, embedding_dim=4\]"),
        ([2, 1, 9], r"row 2 has length 9, outside \[1, embedding_dim=4\]"),
    ],
)
def test_reader_rejects_int4_lengths_that_do_not_fit_the_bytes(
    tmp_path: Path, lengths: list[int], message: str
) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path, "int4")
    join(path, *lengths_are([2, 2, 4])(*split(path)))
    read_packed_table(path)  # S = 8 fits the 4 bytes too: a valid (other) table
    join(path, *lengths_are(lengths)(*split(path)))
    with pytest.raises(PackedFormatError, match=message):
        read_packed_table(path)


def test_reader_rejects_row_length_that_does_not_fit_values(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    weight = torch.ones(3, 2)
    offsets = torch.tensor([0, 2, 4, 6])
    write_packed_table(path, weight.reshape(-1), offsets, embedding_dim=2, field="e",
                       source_sha256=source_digest(weight))
    join(path, *meta("num_embeddings", "4")(*split(path)))
    with pytest.raises(PackedFormatError, match=r"expected \[8\] for num_embeddings 4 x row_len"):
        read_packed_table(path)


# --- versions 1 and 2: the golden files, read and tampered -------------------------------------


@pytest.mark.parametrize(
    "name,edit,message",
    [
        ("table_int8", meta("dtype", "int4"), "`int4`, which format_version `1` does not have"),
        ("table_float32", offsets_are([0, 1, 5, 7, 10, 15]), r"row 4 has length 5, outside"),
        ("table_v2_float32", meta("format_version", "1"), r"unexpected tensor\(s\) `rotation`"),
        ("table_float32", meta("format_version", "2"), r"missing tensor\(s\) `rotation`"),
        ("table_v2_int8", meta("format_version", "3"), r"missing tensor\(s\) `lengths`"),
        # Versions 1 and 2 ignore `row_length`: their offsets stay the index.
        ("table_float32", meta("row_length", "1"), None),
    ],
)
def test_legacy_files_are_validated_as_before(
    tmp_path: Path, name: str, edit: Callable, message: str | None
) -> None:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes((GOLDEN / f"{name}.safetensors").read_bytes())
    read_packed_table(path)
    join(path, *edit(*split(path)))
    if message is None:
        assert read_packed_table(path).offsets.tolist() == [0, 1, 5, 7, 10, 14]
        return
    with pytest.raises(PackedFormatError, match=message):
        read_packed_table(path)


def test_legacy_int8_parameters_are_float32_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes((GOLDEN / "table_int8.safetensors").read_bytes())
    header, data = split(path)
    assert header["scale"]["dtype"] == "F32"
    begin, _ = header["scale"]["data_offsets"]
    data = data[:begin] + np.float32(-1.0).tobytes() + data[begin + 4 :]
    join(path, header, data)
    with pytest.raises(PackedFormatError, match="`scale` holds a negative value"):
        read_packed_table(path)


# --- version 4: the rotation at the values' precision, int4 without a bias ------------------------


def tensor_bytes(h: dict, d: bytes, name: str, np_dtype: str) -> np.ndarray:
    begin, end = h[name]["data_offsets"]
    return np.frombuffer(d[begin:end], dtype=np_dtype).copy()


def replace(name: str, code: str, array: np.ndarray | None):
    """Store ``array`` as tensor ``name`` with dtype ``code`` (None: keep its bytes, change only
    the dtype), moving later tensors so the data region stays tiled."""

    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        begin, end = h[name]["data_offsets"]
        raw = d[begin:end] if array is None else array.tobytes()
        grown = len(raw) - (end - begin)
        for info in (v for k, v in h.items() if k != "__metadata__"):
            if info["data_offsets"][0] >= end:
                info["data_offsets"] = [o + grown for o in info["data_offsets"]]
        shape = h[name]["shape"] if array is None else list(array.shape)
        h[name] = {"dtype": code, "shape": shape, "data_offsets": [begin, begin + len(raw)]}
        return h, d[:begin] + raw + d[end:]

    return edit


def add(name: str, code: str, array: np.ndarray):
    """Append tensor ``name`` at the end of the data region."""

    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        raw = array.tobytes()
        h[name] = {"dtype": code, "shape": list(array.shape),
                   "data_offsets": [len(d), len(d) + len(raw)]}
        return h, d + raw

    return edit


def edit_values(name: str, np_dtype: str, change: Callable[[np.ndarray], None]):
    """Change tensor ``name``'s numbers in place (same dtype and size)."""

    def edit(h: dict, d: bytes) -> tuple[dict, bytes]:
        array = tensor_bytes(h, d, name, np_dtype)
        change(array)
        begin, end = h[name]["data_offsets"]
        return h, d[:begin] + array.tobytes() + d[end:]

    return edit


F32_ROTATION = ROTATION.numpy().astype("<f4")


V4_TAMPERS = [
    # (id, dtype of the rotated file, edit, message)
    ("int8 rotation F32", "int8", replace("rotation", "F32", F32_ROTATION),
     "tensor `rotation` has dtype F32, expected I8 for dtype int8"),
    ("int4 rotation F16", "int4", replace("rotation", "F16", F32_ROTATION.astype("<f2")),
     "tensor `rotation` has dtype F16, expected I8 for dtype int4"),
    ("float32 rotation BF16", "float32",
     replace("rotation", "BF16", F32_ROTATION.astype("<f2")),  # 2-byte entries
     "tensor `rotation` has dtype BF16, expected F32 or F16 for dtype float32"),
    ("float32 rotation I8", "float32", replace("rotation", "I8", np.zeros((4, 4), dtype="i1")),
     "tensor `rotation` has dtype I8, expected F32 or F16 for dtype float32"),
    ("float32 F16 rotation inf", "float32",
     replace("rotation", "F16", np.where(F32_ROTATION == 1, np.inf, F32_ROTATION).astype("<f2")),
     "tensor `rotation` holds a non-finite value"),
    ("float32 F16 rotation nan", "float32",
     replace("rotation", "F16", np.full((4, 4), np.nan, dtype="<f2")),
     "tensor `rotation` holds a non-finite value"),
    ("float32 F16 rotation_scale", "float32",
     lambda h, d: add("rotation_scale", "F16", np.ones(4, dtype="<f2"))(
         *replace("rotation", "F16", F32_ROTATION.astype("<f2"))(h, d)),
     r"unexpected tensor\(s\) `rotation_scale`"),
    ("float16 rotation BF16", "float16", replace("rotation", "BF16", None),
     "tensor `rotation` has dtype BF16, expected F16 for dtype float16"),
    ("bfloat16 rotation F16", "bfloat16", replace("rotation", "F16", None),
     "tensor `rotation` has dtype F16, expected BF16 for dtype bfloat16"),
    ("int8 rotation U8", "int8", replace("rotation", "U8", None),
     "tensor `rotation` has dtype U8, expected I8 for dtype int8"),
    ("rotation shape", "int8", replace("rotation", "I8", np.zeros((2, 8), dtype="i1")),
     r"tensor `rotation` has shape \[2, 8\], expected \[4, 4\] for embedding_dim 4"),
    ("no rotation_scale", "int8", drop("rotation_scale"), r"missing tensor\(s\) `rotation_scale`"),
    ("no rotation", "int4", drop("rotation"), r"unexpected tensor\(s\) `rotation_scale`"),
    ("float32 rotation_scale", "float32", add("rotation_scale", "F16", np.ones(4, dtype="<f2")),
     r"unexpected tensor\(s\) `rotation_scale`"),
    ("rotation_scale shape", "int8", replace("rotation_scale", "F16", np.ones(3, dtype="<f2")),
     r"tensor `rotation_scale` has shape \[3\], expected \[4\] for embedding_dim 4"),
    ("rotation_scale F32", "int4", replace("rotation_scale", "F32", np.ones(4, dtype="<f4")),
     "tensor `rotation_scale` has dtype F32, expected F16"),
    ("rotation_scale nan", "int8", edit_values("rotation_scale", "<f2", lambda a: a.fill(np.nan)),
     "tensor `rotation_scale` holds a non-finite value"),
    ("rotation_scale inf", "int4",
     edit_values("rotation_scale", "<f2", lambda a: a.__setitem__(2, np.inf)),
     "tensor `rotation_scale` holds a non-finite value"),
    ("rotation_scale < 0", "int8",
     edit_values("rotation_scale", "<f2", lambda a: a.__setitem__(1, -0.5)),
     "tensor `rotation_scale` holds a negative value"),
    ("rotation code -128", "int4",
     edit_values("rotation", "i1", lambda a: a.__setitem__(6, -128)),
     r"tensor `rotation` holds code -128 at \[1, 2\], outside \[-127, 127\]"),
    ("float16 rotation inf", "float16",
     edit_values("rotation", "<f2", lambda a: a.__setitem__(3, np.inf)),
     "tensor `rotation` holds a non-finite value"),
    ("bfloat16 rotation nan", "bfloat16",
     edit_values("rotation", "<i2", lambda a: a.__setitem__(0, 0x7FC0)),
     "tensor `rotation` holds a non-finite value"),
    ("int4 with bias", "int4", add("bias", "F16", np.zeros(3, dtype="<f2")),
     r"unexpected tensor\(s\) `bias`"),
    # A version 4 file relabelled version 3: an int8 rotation and no int4 bias are version 4's.
    ("v4 int8 as v3", "int8", meta("format_version", "3"),
     r"unexpected tensor\(s\) `rotation_scale`"),
    ("v4 int4 as v3", "int4", meta("format_version", "3"),
     r"missing tensor\(s\) `bias`"),
    ("v4 float16 as v3", "float16", meta("format_version", "3"),
     "tensor `rotation` has dtype F16, expected F32;"),
]


@pytest.mark.parametrize(
    "dtype,edit,message", [t[1:] for t in V4_TAMPERS], ids=[t[0] for t in V4_TAMPERS]
)
def test_reader_rejects_tampered_version_4_rotation_and_parameters(
    tmp_path: Path, dtype: str, edit: Callable, message: str
) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path, dtype, rotated=True)
    read_packed_table(path)
    join(path, *edit(*split(path)))
    with pytest.raises(PackedFormatError, match=message) as info:
        read_packed_table(path)
    text = str(info.value)
    assert text.startswith(f"`{path}`: ") and "\n" not in text
    assert text.endswith("; re-create it with `pack`")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int4"])
def test_rotation_round_trips_at_the_values_precision(tmp_path: Path, dtype: str) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path, dtype, rotated=True)
    table = read_packed_table(path)
    header = read_header(path)
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype, "I8")
    assert header.tensors["rotation"].dtype == code
    assert ("rotation_scale" in header.tensors) == (code == "I8")
    assert table.rotation is not None and table.rotation.dtype == torch.float32
    tolerance = {"float32": 0.0, "float16": 2**-11, "bfloat16": 2**-8}.get(dtype, 0.8 / 254)
    assert (table.rotation - ROTATION).abs().max().item() <= tolerance
    expected_bytes = {"F32": 64, "F16": 32, "BF16": 32, "I8": 16 + 8}[code]
    assert table.stored is not None and table.stored.rotation == expected_bytes
    # A table read back writes the same bytes.
    again = tmp_path / "again.safetensors"
    write_packed_table(
        again, table.values, table.offsets, embedding_dim=D, field="emb",
        source_sha256=table.metadata["source_sha256"], scale=table.scale, bias=table.bias,
        rotation=table.rotation,
    )
    assert again.read_bytes() == path.read_bytes()


def test_float32_table_stores_a_float16_exact_rotation_as_f16(tmp_path: Path) -> None:
    """The rotation of ``ordering="pca"`` holds float16 values: a float32 table stores it in
    F16 (half the bytes), reads it back exactly and writes the same bytes again."""
    weight = dense_rows()
    values, offsets = packed(weight, LENGTHS)
    exact = ROTATION.half().float()
    assert not torch.equal(exact, ROTATION)  # 0.6 and 0.8 are not float16 values
    path = tmp_path / "t.safetensors"
    stored = write_packed_table(
        path, values, offsets, embedding_dim=D, field="emb",
        source_sha256=source_digest(weight), rotation=exact,
    )
    assert read_header(path).tensors["rotation"].dtype == "F16"
    assert stored.rotation == D * D * 2
    table = read_packed_table(path)
    assert table.rotation is not None and table.rotation.dtype == torch.float32
    assert torch.equal(table.rotation, exact)  # widened exactly: float32 lookups stay bitwise
    assert table.stored is not None and table.stored.rotation == D * D * 2
    again = tmp_path / "again.safetensors"
    write_packed_table(
        again, table.values, table.offsets, embedding_dim=D, field="emb",
        source_sha256=table.metadata["source_sha256"], rotation=table.rotation,
    )
    assert again.read_bytes() == path.read_bytes()
    # The F32 rotation of the other file, stored as F16 by another writer, decodes exactly too.
    other = tmp_path / "other.safetensors"
    write_table(other, "float32", rotated=True)
    assert read_header(other).tensors["rotation"].dtype == "F32"
    join(other, *replace("rotation", "F16", exact.numpy().astype("<f2"))(*split(other)))
    rotation = read_packed_table(other).rotation
    assert rotation is not None and torch.equal(rotation, exact)


def test_writer_rejects_an_int4_bias_that_is_not_minus_8_scale(tmp_path: Path) -> None:
    values, offsets = packed(dense_rows(), LENGTHS)
    codes, scale, bias = int4_encode(values, LENGTHS, symmetric=False)  # version 3's code
    with pytest.raises(PackedFormatError, match=r"int4 `bias` is not -8 \* `scale`"):
        write_packed_table(
            tmp_path / "t.safetensors", pack_nibbles(codes), offsets, embedding_dim=4,
            field="e", source_sha256="0" * 64, scale=scale, bias=bias,
        )
    # The bias may be left out: the file stores the scale only.
    codes, scale, _ = int4_encode(values, LENGTHS)
    write_packed_table(
        tmp_path / "t.safetensors", pack_nibbles(codes), offsets, embedding_dim=4, field="e",
        source_sha256="0" * 64, scale=scale,
    )
    assert torch.equal(read_packed_table(tmp_path / "t.safetensors").bias, scale.float() * -8)
    assert list(tmp_path.iterdir()) == [tmp_path / "t.safetensors"]


def test_writer_rejects_a_rotation_that_is_not_float32_d_by_d(tmp_path: Path) -> None:
    values, offsets = packed(dense_rows(), LENGTHS)
    for rotation in (ROTATION.double(), ROTATION[:3]):
        with pytest.raises(PackedFormatError, match=r"`rotation` is torch.float.*expected float32"):
            write_packed_table(
                tmp_path / "t.safetensors", values, offsets, embedding_dim=4, field="e",
                source_sha256="0" * 64, rotation=rotation,
            )
    huge = ROTATION * 1e5  # not a rotation, but finite: float16 cannot hold it
    with pytest.raises(PackedFormatError, match="`rotation` holds a non-finite value"):
        write_packed_table(
            tmp_path / "t.safetensors", values.half(), offsets, embedding_dim=4, field="e",
            source_sha256="0" * 64, rotation=huge,
        )
    assert list(tmp_path.iterdir()) == []
