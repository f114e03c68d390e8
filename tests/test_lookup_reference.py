"""The pure-torch reference: packing, and lookups equal to torch on the dense zero-tailed table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lookup_helpers import assert_bitwise, dense_of, packed, random_table

from amtl_compress.lookup import (
    pack_rows,
    packed_embedding_bag_reference,
    packed_embedding_reference,
)


def test_pack_rows_worked_example() -> None:
    weight = torch.tensor([[1.0, 2.0, 9.0, 9.0], [3.0, 4.0, 5.0, 6.0], [7.0, 9.0, 9.0, 9.0]])
    values, offsets = pack_rows(weight, torch.tensor([2, 4, 1]))
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert offsets.tolist() == [0, 2, 6, 7] and offsets.dtype == torch.int64
    assert packed_embedding_reference(values, offsets, None, None, torch.tensor([2, 0]),
                                      4).tolist() == [[7.0, 0, 0, 0], [1.0, 2.0, 0, 0]]


def test_pack_rows_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match=r"`lengths` must lie in \[0, 4\]"):
        pack_rows(torch.ones(2, 4), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="`lengths` must have shape"):
        pack_rows(torch.ones(2, 4), torch.tensor([1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_reference_equals_torch_on_the_dense_table(dtype: torch.dtype) -> None:
    weight, lengths = random_table(40, 13, seed=5, specials=dtype == torch.float32, min_length=0)
    values, offsets, scale, bias = packed(weight, lengths, dtype)
    dense = dense_of(values, offsets, 13, scale, bias)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (6, 5), generator=g)
    assert_bitwise(packed_embedding_reference(values, offsets, scale, bias, ids, 13),
                   F.embedding(ids, dense))
    flat, bag_offsets = ids.flatten(), torch.tensor([0, 0, 7, 30])
    for mode, pad in (("sum", None), ("mean", 3), ("max", None), ("max", int(flat[0]))):
        assert_bitwise(
            packed_embedding_bag_reference(values, offsets, scale, bias, flat, bag_offsets, None,
                                           mode, 13, pad, False),
            F.embedding_bag(flat, dense, bag_offsets, mode=mode, padding_idx=pad))


def test_tails_are_positive_zero_even_when_int8_bias_is_not() -> None:
    q, offsets = torch.tensor([5, -5], dtype=torch.int8), torch.tensor([0, 1, 2])
    out = packed_embedding_reference(q, offsets, torch.tensor([0.5, 2.0]),
                                     torch.tensor([-1.0, -3.0]), torch.tensor([0, 1]), 3)
    assert out.tolist() == [[1.5, 0.0, 0.0], [-13.0, 0.0, 0.0]]
    assert not out.signbit()[:, 1:].any()


def test_reference_errors() -> None:
    values, offsets = torch.ones(6), torch.tensor([0, 2, 6])
    with pytest.raises(IndexError, match=r"id 2 is outside \[0, 2\)"):
        packed_embedding_reference(values, offsets, None, None, torch.tensor([2]), 4)
    with pytest.raises(ValueError, match="corrupt offsets for row 1"):
        packed_embedding_reference(values, torch.tensor([0, 2, 7]), None, None,
                                   torch.tensor([1]), 4)
    with pytest.raises(ValueError, match="must equal len"):
        packed_embedding_bag_reference(values, offsets, None, None, torch.tensor([0, 1]),
                                       torch.tensor([0, 1]), None, "sum", 4, None, True)
    with pytest.raises(NotImplementedError):
        packed_embedding_bag_reference(values, offsets, None, None, torch.tensor([0, 1]),
                                       torch.tensor([0]), torch.ones(2), "max", 4, None, False)
