"""The compiled kernel == the pure-torch reference == torch on the dense zero-tailed table.

float32 is compared bitwise (-0.0 vs +0.0 counts, NaN payloads do not); float16/bfloat16/int8 and
int4 (uint8) are compared bitwise against torch on the dequantised dense table. Every vector ISA of
the kernel is
exercised through AMTL_COMPRESS_ISA (on a CPU without one, the cap falls back to the best there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lookup_helpers import assert_bitwise, dense_of, packed, random_table

from amtl_compress.lookup import ops
from amtl_compress.lookup.reference import (
    packed_embedding_bag_reference,
    packed_embedding_reference,
)

ISAS = ("portable", "avx2", "avx512")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8)
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    ops.load_kernel()  # the first run builds it (~1-2 min), later runs load the cache


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AMTL_COMPRESS_ISA", request.param)
    return request.param


@st.composite
def tables(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 40))
    d = draw(st.sampled_from([1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 64, 70, 128, 129]))
    return {"n": n, "d": d, "seed": draw(st.integers(0, 2**31 - 1)),
            "specials": draw(st.booleans()), "min_length": draw(st.sampled_from([0, 1]))}


@st.composite
def bags(draw: st.DrawFn, n: int) -> dict:
    """Jagged bags over ids in [0, n): repeated ids, empty bags, maybe include_last_offset."""
    sizes = draw(st.lists(st.integers(0, 12), min_size=0, max_size=12))
    ids = draw(st.lists(st.integers(0, n - 1), min_size=sum(sizes), max_size=sum(sizes)))
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    include_last = draw(st.booleans())
    offsets = starts if include_last else starts[:-1]
    return {"input": torch.tensor(ids, dtype=torch.int64),
            "offsets": torch.tensor(offsets, dtype=torch.int64), "include_last": include_last}


def _table(t: dict, dtype: torch.dtype = torch.float32):
    weight, lengths = random_table(t["n"], t["d"], t["seed"], specials=t["specials"],
                                   min_length=t["min_length"])
    values, offsets, scale, bias = packed(weight, lengths, dtype, seed=t["seed"])
    return values, offsets, scale, bias, dense_of(values, offsets, t["d"], scale, bias)


@SETTINGS
@given(t=tables(), data=st.data())
def test_embedding_matches_reference_and_dense(isa: str, t: dict, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES))
    values, offsets, scale, bias, dense = _table(t, dtype)
    shape = data.draw(st.sampled_from([(0,), (5,), (3, 4), (2, 3, 2), ()]))
    ids = torch.randint(0, t["n"], shape, generator=torch.Generator().manual_seed(t["seed"]))
    ids = ids.to(data.draw(st.sampled_from([torch.int64, torch.int32])))
    out = ops.packed_embedding(values, offsets, scale, bias, ids, t["d"])
    assert out.shape == (*shape, t["d"])
    assert_bitwise(out, F.embedding(ids, dense))
    assert_bitwise(out, packed_embedding_reference(values, offsets, scale, bias, ids, t["d"]))


@SETTINGS
@given(t=tables(), data=st.data())
def test_bag_matches_reference_and_dense(isa: str, t: dict, data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(DTYPES))
    values, offsets, scale, bias, dense = _table(t, dtype)
    b = data.draw(bags(t["n"]))
    mode = data.draw(st.sampled_from(["sum", "mean", "max"]))
    padding_idx = data.draw(st.one_of(st.none(), st.integers(0, t["n"] - 1)))
    weights = None
    if mode == "sum" and data.draw(st.booleans()):
        g = torch.Generator().manual_seed(t["seed"] + 1)
        weights = torch.randn(b["input"].numel(), generator=g)
        if t["specials"] and weights.numel():  # signed zeros and non-finite weights
            weights[::3] = -0.0
            weights[1::7] = float("inf")
    ids = b["input"].to(data.draw(st.sampled_from([torch.int64, torch.int32])))
    args = (ids, b["offsets"], weights, mode, t["d"], padding_idx, b["include_last"])
    out = ops.packed_embedding_bag(values, offsets, scale, bias, *args)
    expected = F.embedding_bag(ids.long(), dense, b["offsets"], mode=mode,
                               per_sample_weights=weights, padding_idx=padding_idx,
                               include_last_offset=b["include_last"])
    assert_bitwise(out, expected)
    assert_bitwise(out, packed_embedding_bag_reference(values, offsets, scale, bias, *args))


@pytest.mark.parametrize("d", [8, 16, 24, 32, 48, 64, 96, 128, 256])
def test_whole_vector_row_widths_match_dense(isa: str, d: int) -> None:
    # D a multiple of the vector width takes fixed-count (unrolled) paths per ISA; enough ids
    # that the prefetch-unchecked middle of a chunk and its checked tail are both crossed.
    for dtype in (torch.float32, torch.float16, torch.int8, torch.uint8):
        weight, lengths = random_table(300, d, seed=d, min_length=0)
        values, offsets, scale, bias = packed(weight, lengths, dtype, seed=d)
        dense = dense_of(values, offsets, d, scale, bias)
        g = torch.Generator().manual_seed(d)
        ids = torch.randint(0, 300, (700,), generator=g)
        out = ops.packed_embedding(values, offsets, scale, bias, ids, d)
        assert_bitwise(out, F.embedding(ids, dense))
        bag_offsets = torch.arange(0, 700, 20)
        out = ops.packed_embedding_bag(values, offsets, scale, bias, ids, bag_offsets, None,
                                       "sum", d, None, False)
        assert_bitwise(out, F.embedding_bag(ids, dense, bag_offsets, mode="sum"))


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_chunks_match_dense(isa: str, threads: int) -> None:
    # Enough work for several parallel chunks, so chunk edges (and prefetch limits) are crossed.
    weight, lengths = random_table(3000, 24, seed=7)
    values, offsets, _, _ = packed(weight, lengths)
    dense = dense_of(values, offsets, 24)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 3000, (20_000,), generator=g)
    bag_offsets = torch.sort(torch.randint(0, 20_001, (900,), generator=g)).values
    bag_offsets[0] = 0
    weights = torch.randn(20_000, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_bitwise(ops.packed_embedding(values, offsets, None, None, ids, 24),
                       F.embedding(ids, dense))
        for mode, w in (("sum", None), ("sum", weights), ("mean", None), ("max", None)):
            out = ops.packed_embedding_bag(values, offsets, None, None, ids, bag_offsets, w, mode,
                                           24, None, False)
            assert_bitwise(out, F.embedding_bag(ids, dense, bag_offsets, mode=mode,
                                                per_sample_weights=w))
    finally:
        torch.set_num_threads(old)


def _ending_at_an_unreadable_page(values: torch.Tensor) -> tuple[torch.Tensor, mmap.mmap]:
    """A copy of 1-D ``values`` whose last byte is the last readable byte before a PROT_NONE page
    (and the mapping that holds it, to keep alive)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    nbytes = values.numel() * values.element_size()
    pages = -(-nbytes // mmap.PAGESIZE) + 1
    area = mmap.mmap(-1, pages * mmap.PAGESIZE)
    array = np.frombuffer(area, dtype=np.uint8)
    guard = array.ctypes.data + (pages - 1) * mmap.PAGESIZE
    assert libc.mprotect(guard, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()  # PROT_NONE
    start = (pages - 1) * mmap.PAGESIZE - nbytes
    placed = torch.from_numpy(array[start:start + nbytes]).view(values.dtype)
    placed.copy_(values)
    return placed, area


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect through libc")
@pytest.mark.parametrize("d", [40, 128, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_at_the_end_of_the_mapping_read_nothing_past_it(isa: str, dtype: torch.dtype,
                                                             d: int) -> None:
    # Vector k of a row is loaded from row start + k * W with the lanes past the row masked off, so
    # the last short rows of a table reach up to D values past the end of `values`: masked-off
    # lanes must not fault, even on an unreadable page (and prefetches never fault).
    weight, lengths = random_table(64, d, seed=3)
    lengths[-8:] = torch.tensor([1, 5, 16, 17, 2, 1, 33, 1])
    values, offsets, scale, bias = packed(weight, lengths, dtype, seed=3)
    dense = dense_of(values, offsets, d, scale, bias)
    placed, area = _ending_at_an_unreadable_page(values)
    ids = torch.arange(64).flip(0).repeat(3)  # the last rows first, past the prefetch-free middle
    assert_bitwise(ops.packed_embedding(placed, offsets, scale, bias, ids, d),
                   F.embedding(ids, dense))
    bag_offsets = torch.arange(0, ids.numel(), 4)
    for mode in ("sum", "max"):
        out = ops.packed_embedding_bag(placed, offsets, scale, bias, ids, bag_offsets, None,
                                       mode, d, None, False)
        assert_bitwise(out, F.embedding_bag(ids, dense, bag_offsets, mode=mode))
    del placed
    area.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_int32_offsets_give_the_same_bits(isa: str, dtype: torch.dtype) -> None:
    # The modules hand the kernel an int32 copy of the offsets; it must read rows identically.
    weight, lengths = random_table(300, 40, seed=5, specials=True)
    values, offsets, scale, bias = packed(weight, lengths, dtype, seed=5)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 300, (2000,), generator=g)
    bag_offsets = torch.arange(0, 2000, 20)
    narrow = offsets.to(torch.int32)
    assert_bitwise(ops.packed_embedding(values, narrow, scale, bias, ids, 40),
                   ops.packed_embedding(values, offsets, scale, bias, ids, 40))
    for mode in ("sum", "mean", "max"):
        args = (ids, bag_offsets, None, mode, 40, None, False)
        assert_bitwise(ops.packed_embedding_bag(values, narrow, scale, bias, *args),
                       ops.packed_embedding_bag(values, offsets, scale, bias, *args))


@pytest.mark.parametrize("corrupt", [[0, 2, 2**31 - 1], [0, 2, 7], [0, -4, 6], [0, 5, 3],
                                     [0, 1, 6], [-(2**31), 2, 6]])
def test_corrupt_int32_offsets_raise_without_reading_out_of_bounds(isa: str,
                                                                   corrupt: list) -> None:
    values, offsets = torch.ones(6), torch.tensor(corrupt, dtype=torch.int32)
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        ops.packed_embedding(values, offsets, None, None, ids, 4)
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        ops.packed_embedding_bag(values, offsets, None, None, ids, torch.tensor([0, 2]), None,
                                 "sum", 4, None, False)


def test_weighted_sum_mirrors_both_torch_roundings() -> None:
    # -1 * 1 + (1 + 2^-23) * (1 - 2^-24): fused (fma) keeps the residue 2^-24 - 2^-47, a separate
    # multiply rounds the product to 1.0 first and the sum is 0. torch fuses without padding_idx
    # and not with it; the kernel must follow both.
    values = torch.tensor([-1.0, 1.0 + 2**-23, 0.0])
    offsets = torch.tensor([0, 1, 2, 3])
    dense = dense_of(values, offsets, 1)
    ids, bag_offsets = torch.tensor([0, 1]), torch.tensor([0])
    w = torch.tensor([1.0, 1.0 - 2**-24])
    results = {}
    for pad in (None, 2):  # row 2 is never looked up: only the arithmetic path changes
        out = ops.packed_embedding_bag(values, offsets, None, None, ids, bag_offsets, w, "sum", 1,
                                       pad, False)
        assert_bitwise(out, F.embedding_bag(ids, dense, bag_offsets, mode="sum",
                                            per_sample_weights=w, padding_idx=pad))
        results[pad] = out.item()
    assert results == {None: 2**-24 - 2**-47, 2: 0.0}


def test_out_of_range_ids_raise_index_error(isa: str) -> None:
    values, offsets = torch.ones(6), torch.tensor([0, 2, 6])
    for bad in (torch.tensor([0, 2]), torch.tensor([-1]), torch.tensor([1, 2**40])):
        with pytest.raises(IndexError, match=r"outside \[0, 2\)"):
            ops.packed_embedding(values, offsets, None, None, bad, 4)
        with pytest.raises(IndexError, match=r"outside \[0, 2\)"):
            ops.packed_embedding_bag(values, offsets, None, None, bad, torch.tensor([0]), None,
                                     "sum", 4, None, False)
    with pytest.raises(IndexError, match="id 5 at position 1"):  # the first bad position
        ops.packed_embedding(values, offsets, None, None, torch.tensor([0, 5, -3, 9]), 4)


@pytest.mark.parametrize("corrupt", [
    [0, 2, 10**12],        # end far past len(values)
    [0, 2, 7],             # end one past len(values)
    [0, -4, 6],            # negative start
    [0, 5, 3],             # decreasing (negative length)
    [0, 1, 6],             # length 5 > D = 4
    [-(2**62), 2, 6],      # start far below 0
])
def test_corrupt_offsets_raise_without_reading_out_of_bounds(isa: str, corrupt: list) -> None:
    values, offsets = torch.ones(6), torch.tensor(corrupt)
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        ops.packed_embedding(values, offsets, None, None, ids, 4)
    for mode in ("sum", "max"):
        with pytest.raises(ValueError, match="corrupt offsets for row"):
            ops.packed_embedding_bag(values, offsets, None, None, ids, torch.tensor([0, 2]), None,
                                     mode, 4, None, False)
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        packed_embedding_reference(values, offsets, None, None, ids, 4)


@pytest.mark.parametrize("corrupt", [[0, 2, 7], [0, 2, 2**40], [0, 5, 3], [0, 1, 6]])
def test_corrupt_int4_offsets_raise_without_reading_out_of_bounds(isa: str, corrupt: list) -> None:
    # 3 bytes hold 6 nibbles: a row ending at nibble 7 is past them.
    stream, offsets = torch.full((3,), 0x55, dtype=torch.uint8), torch.tensor(corrupt)
    scale, bias = torch.ones(2), torch.zeros(2)
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        ops.packed_embedding(stream, offsets, scale, bias, ids, 4)
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        ops.packed_embedding_bag(stream, offsets, scale, bias, ids, torch.tensor([0, 2]), None,
                                 "sum", 4, None, False)
    good = torch.tensor([0, 2, 6])
    assert ops.packed_embedding(stream, good, scale, bias, ids[:2], 4).tolist() == [
        [5.0, 5.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]


def test_corrupt_int8_table_never_indexes_scale_with_a_bad_id() -> None:
    q, offsets = torch.ones(6, dtype=torch.int8), torch.tensor([0, 2, 6])
    scale, bias = torch.ones(2), torch.zeros(2)
    with pytest.raises(IndexError):
        ops.packed_embedding(q, offsets, scale, bias, torch.tensor([2**40]), 4)


@pytest.mark.parametrize("bag_offsets, include_last, match", [
    ([1, 2], False, "offsets\\[0\\] must be 0"),
    ([0, 3, 2], False, "non-decreasing"),
    ([0, 5], False, "must be <= len\\(input\\) = 4"),
    ([0, 2, 3], True, "must equal len\\(input\\) = 4"),
    ([], True, "at least 1 element"),
])
def test_bad_bag_offsets_raise_value_error(bag_offsets: list, include_last: bool,
                                           match: str) -> None:
    values, offsets = torch.ones(6), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match=match):
        ops.packed_embedding_bag(values, offsets, None, None, torch.tensor([0, 1, 1, 0]),
                                 torch.tensor(bag_offsets, dtype=torch.int64), None, "sum", 4,
                                 None, include_last)


def test_argument_errors() -> None:
    values, offsets = torch.ones(6), torch.tensor([0, 2, 6])
    ids, bag_offsets = torch.tensor([0, 1]), torch.tensor([0])
    with pytest.raises(NotImplementedError, match="only supported for mode='sum'"):
        ops.packed_embedding_bag(values, offsets, None, None, ids, bag_offsets, torch.ones(2),
                                 "mean", 4, None, False)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.packed_embedding_bag(values, offsets, None, None, ids, bag_offsets, None, "min", 4,
                                 None, False)
    with pytest.raises(ValueError, match="padding_idx must be in"):
        ops.packed_embedding_bag(values, offsets, None, None, ids, bag_offsets, None, "sum", 4,
                                 2, False)
    for quantized in (torch.int8, torch.uint8):
        with pytest.raises(TypeError, match="int8 / int4 \\(uint8\\) `values` need"):
            ops.packed_embedding(values.to(quantized), offsets, None, None, ids, 4)
    with pytest.raises(TypeError, match="only used with int8 / int4"):
        ops.packed_embedding(values, offsets, torch.ones(2), torch.ones(2), ids, 4)
    with pytest.raises(TypeError, match="contiguous 1-D"):
        ops.packed_embedding(torch.ones(12)[::2], offsets, None, None, ids, 4)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        ops.packed_embedding(values, offsets, None, None, ids.float(), 4)
