"""The pure-torch reference: packing, and lookups equal to torch on the dense zero-tailed table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lookup_helpers import (
    assert_bitwise,
    dense_of,
    int4_codes,
    int4_encode,
    int4_pack,
    packed,
    random_table,
)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8,
                                   torch.uint8])
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


def test_int4_worked_example() -> None:
    # Rows of 2, 3 and 2 values: S = 7 nibbles in 4 bytes, rows 1 and 2 start on a high nibble.
    # Value j is in byte j // 2, low nibble for even j; the last byte's high nibble is padding.
    stream = torch.tensor([0x21, 0x43, 0x65, 0xF7], dtype=torch.uint8)  # codes 1..7, pad 15
    offsets = torch.tensor([0, 2, 5, 7])
    scale, bias = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, -1.0, 10.0])
    out = packed_embedding_reference(stream, offsets, scale, bias, torch.tensor([0, 1, 2]), 4)
    assert out.tolist() == [[1.0, 2.0, 0.0, 0.0], [0.5, 1.0, 1.5, 0.0], [22.0, 24.0, 0.0, 0.0]]
    assert not out.signbit()[:, 3].any()  # the tail is +0.0, not bias


def test_int4_test_encoder_follows_the_rule() -> None:
    values = torch.tensor([0.0, 1.5, 3.0, 2.0, 2.0, 2.0, -1.0, 0.1])  # rows of 3, 3 (equal), 2
    offsets = torch.tensor([0, 3, 6, 8])
    stream, scale, bias = int4_encode(values, offsets)
    assert stream.dtype == torch.uint8 and stream.numel() == 4
    assert scale.tolist() == pytest.approx([0.2, 0.0, 1.1 / 15])
    assert bias.tolist() == pytest.approx([0.0, 2.0, -1.0])
    # The ends of a row code 0 and 15; a row of equal values has scale 0 and codes 0.
    codes = int4_codes(stream, 8).tolist()
    assert codes[0] == 0 and codes[2] == 15 and codes[3:6] == [0, 0, 0]
    assert codes[6] == 0 and codes[7] == 15
    assert int4_pack(torch.tensor([1, 2, 3])).tolist() == [0x21, 0x03]
    assert int4_codes(torch.tensor([0x21, 0x03], dtype=torch.uint8), 3).tolist() == [1, 2, 3]


def test_int4_decodes_within_half_a_step_of_the_encoded_values() -> None:
    weight, lengths = random_table(50, 24, seed=9)
    values, offsets = pack_rows(weight, lengths)
    stream, scale, bias = int4_encode(values, offsets)
    dense = dense_of(stream, offsets, 24, scale, bias)
    kept = torch.arange(24) < lengths[:, None]
    error = (dense - torch.where(kept, weight, 0.0)).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-6).all())


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
    # int4: 3 bytes hold 6 nibbles; a row reaching nibble 7 is corrupt.
    stream, scale = torch.zeros(3, dtype=torch.uint8), torch.ones(2)
    with pytest.raises(ValueError, match=r"corrupt offsets for row 1: \[2, 7\) is not within "
                                         r"\[0, 6\]"):
        packed_embedding_reference(stream, torch.tensor([0, 2, 7]), scale, scale,
                                   torch.tensor([1]), 4)
    with pytest.raises(TypeError, match="int8 / int4 \\(uint8\\) `values` need `scale`"):
        packed_embedding_reference(stream, torch.tensor([0, 2, 6]), None, None,
                                   torch.tensor([1]), 4)
