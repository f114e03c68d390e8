"""Tampered packed files: loading raises ``PackedFormatError`` or, if a file loads, lookups through
the compiled kernel raise a clean error or return (B, D) rows; nothing crashes or reads out of
bounds.

The reader's own rules are covered rule by rule in test_storage_format.py; here the target is
what reaches the kernel. A crash in the kernel would take the test process down, so the raw
kernel fuzz (which bypasses every Python-side check) runs in a subprocess.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from amtl_compress.errors import PackedFormatError
from amtl_compress.lookup import PackedEmbedding, PackedEmbeddingBag
from amtl_compress.storage.format import read_packed_table
from amtl_compress.storage.pack import pack_table
from tests.reliability_helpers import cli_env

N, D = 40, 6
#: struct format and width of each integer dtype a row index may have.
INDEX_WIDTHS = {"U8": ("<B", 1), "U16": ("<H", 2), "U32": ("<I", 4), "I64": ("<q", 8)}
#: What a lookup may raise on a table that loaded: an id outside [0, N) (IndexError) or corrupt
#: offsets / arguments (ValueError, which PackedFormatError is) - never anything else.
CLEAN_ERRORS = (IndexError, ValueError)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, bytes]:
    """Valid packed files of one (N, D) table, per dtype, as bytes."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fuzz")
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, D + 1, (N,), generator=gen)
    weight = torch.randn(N, D, generator=gen)
    weight[torch.arange(D)[None, :] >= lengths[:, None]] = 0
    save_file({"t.weight": weight}, str(root / "model.safetensors"))
    out = {}
    for dtype in ("float32", "float16", "int8"):
        path = root / f"{dtype}.safetensors"
        pack_table(root / "model.safetensors", "t.weight", lengths, path, dtype, "t")
        out[dtype] = path.read_bytes()
    return out


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _rewrite(raw: bytes, how: str, a: int, b: int) -> bytes:
    """Structured tampering that byte flips rarely reach: header fields and index values."""
    header, data = _split(raw)
    names = [k for k in header if k != "__metadata__"]
    name = names[a % len(names)]
    entry = header[name]
    if how == "data_offsets":
        entry["data_offsets"][b % 2] += (a % 17) - 8
    elif how == "shape":
        entry["shape"] = [max(0, entry["shape"][0] + (a % 5) - 2)]
    elif how == "dtype":
        entry["dtype"] = ["F32", "F16", "BF16", "I8", "I64", "U8", "F64", "X9"][a % 8]
    elif how == "metadata":
        key = sorted(header["__metadata__"])[a % len(header["__metadata__"])]
        header["__metadata__"][key] = ["0", "-1", "99999999999", "", "1e3", "int8", "t"][b % 7]
    elif how == "index_value" and "lengths" in header:  # one length set to a hostile value
        begin, end = header["lengths"]["data_offsets"]
        fmt, width = INDEX_WIDTHS[header["lengths"]["dtype"]]
        slot = begin + width * (a % ((end - begin) // width))
        value = [-1, 0, 1, D, D + 1, 2**62, -(2**63), 2**63 - 1, a][b % 9]
        value %= 2 ** (8 * width)  # the same bits, as the field's unsigned width holds them
        data = data[:slot] + struct.pack(fmt.upper(), value) + data[slot + width :]
    return _join(header, data)


def _lookups_are_safe(table, ids: torch.Tensor) -> None:
    """Every lookup of ``ids`` either raises a clean error or returns float32 (.., D) rows."""
    modules = [
        PackedEmbedding(table.values, table.offsets, table.embedding_dim, scale=table.scale,
                        bias=table.bias),
        PackedEmbeddingBag(table.values, table.offsets, table.embedding_dim, mode="sum",
                           scale=table.scale, bias=table.bias),
        PackedEmbeddingBag(table.values, table.offsets, table.embedding_dim, mode="max",
                           padding_idx=0, scale=table.scale, bias=table.bias),
    ]
    for module in modules:
        try:
            rows = module(ids.reshape(-1, 2)) if isinstance(module, PackedEmbeddingBag) else (
                module(ids))
        except CLEAN_ERRORS as e:
            assert str(e) and "\n" not in str(e).strip()
            continue
        assert rows.dtype == torch.float32 and rows.shape[-1] == table.embedding_dim
        in_range = bool(((ids >= 0) & (ids < table.num_embeddings)).all())
        assert in_range, "an out-of-range id was looked up without an error"


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(["float32", "float16", "int8"]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
    # Half the flips land in `values`, which no reader check covers (docs/format.md), so the
    # kernel gets loaded tables with arbitrary value bytes (NaN, inf, any int8) to look up.
    in_values=st.booleans(),
    rewrite=st.one_of(
        st.none(), st.none(), st.none(),  # mostly none, so enough tables load and get looked up
        st.tuples(st.sampled_from(["data_offsets", "shape", "dtype", "metadata", "index_value"]),
                  st.integers(0, 1000), st.integers(0, 1000)),
    ),
    cut=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 10**6)),
    id_pairs=st.lists(st.tuples(st.integers(-3, N + 3), st.integers(-3, N + 3)), min_size=1,
                      max_size=6),
)
@example(dtype="int8", flips=[(3, 0xFF)], in_values=True, rewrite=None, cut=None,
         id_pairs=[(0, N - 1)]).via("loads: garbage int8 codes are looked up")
@example(dtype="float32", flips=[(1, 0xFF), (2, 0x7F)], in_values=True, rewrite=None, cut=None,
         id_pairs=[(N, -1)]).via("loads: out-of-range ids raise IndexError")
def test_tampered_files_fail_cleanly_or_look_up_safely(
    sources, tmp_path: Path, dtype, flips, in_values, rewrite, cut, id_pairs
) -> None:
    raw = sources[dtype]
    if rewrite is not None:
        raw = _rewrite(raw, *rewrite)
    header, _ = _split(sources[dtype])
    begin, end = header["values"]["data_offsets"]
    start = len(raw) - (len(sources[dtype]) - begin) if in_values else 0
    span = end - begin if in_values else len(raw)
    raw = bytearray(raw)
    for position, byte in flips:
        raw[(start + position % span) % len(raw)] = byte
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    path = tmp_path / "t.safetensors"
    path.write_bytes(bytes(raw))
    try:
        table = read_packed_table(path, mmap=True)
    except PackedFormatError as e:
        assert "\n" not in str(e) and str(e).startswith(f"`{path}`")
        event("refused by the reader")
        return
    if (table.num_embeddings, table.embedding_dim) != (N, D):
        # A self-consistent file may claim another D (e.g. 99999999999: every length is still
        # <= D). load_packed refuses it against the model, the trusted source of shapes
        # (test_lookup_load.py::test_model_mismatch_raises_and_leaves_model_untouched); looked
        # up directly it would make every lookup allocate (B, D).
        event("refused by the model-fit check")
        return
    event("loaded; looked up")
    _lookups_are_safe(table, torch.tensor(id_pairs).reshape(-1))


def test_a_hostile_length_is_refused_before_any_lookup(sources, tmp_path: Path) -> None:
    """The cases the fuzz is for, pinned: a row length that would point outside `values`."""
    header, data = _split(sources["float32"])
    begin = header["lengths"]["data_offsets"][0]
    # Version 3 stores the lengths as uint8 for D <= 255: every byte value but 1..D is hostile,
    # and any other value changes their sum, which must then equal len(values).
    fmt, width = INDEX_WIDTHS[header["lengths"]["dtype"]]
    assert width == 1
    for slot in (0, 1, N // 2, N - 1):
        for value in (0, D + 1, 127, 128, 255):
            at = begin + width * slot
            path = tmp_path / "t.safetensors"
            path.write_bytes(
                _join(header, data[:at] + struct.pack(fmt, value) + data[at + width :])
            )
            with pytest.raises(PackedFormatError, match=f"row {slot} has length {value}, outside"):
                read_packed_table(path)
        old = data[begin + slot]
        at = begin + slot
        path.write_bytes(_join(header, data[:at] + bytes([old % D + 1]) + data[at + 1 :]))
        with pytest.raises(PackedFormatError, match="`lengths` sum to S = "):
            read_packed_table(path)


RAW_KERNEL_FUZZ = textwrap.dedent(
    """
    import random, sys, torch
    from amtl_compress.lookup import ops
    emb, bag = ops.compiled_ops()
    rng = random.Random(int(sys.argv[1]))
    hostile = [-2**63, -1, 0, 1, 3, 7, 2**31, 2**62, 2**63 - 1]
    for case in range(int(sys.argv[2])):
        n, d = rng.randint(0, 6), rng.randint(1, 5)
        nv = rng.randint(0, n * d)
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.int8])
        values = (torch.randn(nv) * 3).to(dtype)
        offsets = sorted(rng.randint(0, nv) for _ in range(n + 1))
        for _ in range(rng.randint(0, 3)):  # corrupt some offsets: unsorted, huge, negative
            if offsets:
                offsets[rng.randrange(len(offsets))] = rng.choice(hostile + [rng.randint(-9, 40)])
        offsets = torch.tensor(offsets or [0], dtype=torch.int64)
        q = dtype == torch.int8
        scale = torch.rand(max(n, 0)) if q else None
        bias = torch.randn(max(n, 0)) if q else None
        ids = torch.tensor([rng.choice([rng.randint(-2, n + 2), rng.choice(hostile)])
                            for _ in range(rng.randint(0, 8))], dtype=torch.int64)
        try:
            out = emb(values, offsets, scale, bias, ids, d)
            assert out.shape == (ids.numel(), d), out.shape
        except (IndexError, ValueError, TypeError, RuntimeError):
            pass
        bags = sorted(rng.randint(0, ids.numel()) for _ in range(rng.randint(0, 3)))
        if bags and rng.random() < 0.3:
            bags[rng.randrange(len(bags))] = rng.choice(hostile)
        mode = rng.choice(["sum", "mean", "max"])
        try:
            out = bag(values, offsets, scale, bias, ids, torch.tensor(bags, dtype=torch.int64),
                      None, mode, d, rng.choice([None, 0]), rng.random() < 0.5)
            assert out.dim() == 2 and out.shape[1] == d, out.shape
        except (IndexError, ValueError, TypeError, RuntimeError):
            pass
    print("survived", int(sys.argv[2]))
    """
)


@pytest.mark.parametrize("seed,cases", [(0, 3000)])
def test_raw_kernel_never_crashes_on_corrupt_offsets_or_ids(seed: int, cases: int) -> None:
    """Bypass every Python check and hand the kernel corrupt offsets, bag offsets and ids."""
    proc = subprocess.run(
        [sys.executable, "-c", RAW_KERNEL_FUZZ, str(seed), str(cases)], env=cli_env(),
        capture_output=True, text=True, timeout=300, check=False,
    )
    # A negative return code is a signal: SIGSEGV/SIGBUS from an out-of-bounds access.
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip() == f"survived {cases}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_raw_kernel_fuzz_long(seed: int) -> None:
    test_raw_kernel_never_crashes_on_corrupt_offsets_or_ids(seed, 50_000)
