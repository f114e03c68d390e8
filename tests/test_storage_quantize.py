"""Prefix extraction (Eq. 1) and value encodings, checked against the words of docs/format.md."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amtl_compress.lookup.reference import pack_rows
from amtl_compress.storage.format import kept_values, prefix_mask
from amtl_compress.storage.quantize import cast_values, dequantize_values, int8_encode


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def spec_int8(rows: torch.Tensor, lengths: torch.Tensor):
    """docs/format.md's int8 rule, written out row by row in torch (an independent reference)."""
    qs, scales, biases = [], [], []
    for row, n in zip(rows, lengths.tolist(), strict=True):
        x = row[:n]
        lo, hi = x.min(), x.max()
        scale = (hi - lo) / 255
        if scale > 0:
            bias = lo + 128 * scale
            q = torch.round((x - bias) / scale).clamp(-128, 127)
        else:
            bias, q = lo, torch.zeros_like(x)
        qs.append(q.to(torch.int8))
        scales.append(scale)
        biases.append(bias)
    return torch.cat(qs), torch.stack(scales), torch.stack(biases)


rows_and_lengths = st.integers(1, 12).flatmap(
    lambda d: st.tuples(
        st.just(d),
        st.lists(st.integers(1, d), min_size=1, max_size=20),
        st.integers(0, 2**31 - 1),
        st.sampled_from([1e-3, 1.0, 1e4]),
    )
)


@settings(max_examples=60, deadline=None)
@given(rows_and_lengths)
def test_kept_values_and_int8_follow_the_spec(case) -> None:
    d, lens, seed, magnitude = case
    lengths = torch.tensor(lens)
    rows = torch.randn(len(lens), d, generator=torch.Generator().manual_seed(seed)) * magnitude
    kept = kept_values(rows, lengths)
    assert torch.equal(kept, rows[prefix_mask(lengths, d)])
    assert torch.equal(kept, pack_rows(rows, lengths)[0])  # same layout as the lookup's reference

    q, scale, bias = int8_encode(kept, lengths)
    ref_q, ref_scale, ref_bias = spec_int8(rows, lengths)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale) and torch.equal(bias, ref_bias)

    decoded = dequantize_values(q, offsets_of(lengths), scale, bias)
    step = scale.repeat_interleave(lengths)
    slack = 4 * torch.finfo(torch.float32).eps * kept.abs().max()
    assert ((decoded - kept).abs() <= 0.5 * step + slack).all()
    # Each row's min encodes as -128 and max as 127 (unless the row is constant).
    for i, (a, b) in enumerate(zip(offsets_of(lengths)[:-1], offsets_of(lengths)[1:], strict=True)):
        if scale[i] > 0:
            assert q[a:b].min() == -128 and q[a:b].max() == 127
        else:
            assert (q[a:b] == 0).all() and bias[i] == kept[a]


def test_int8_ignores_the_zero_tail() -> None:
    # The tail past L_i is zero in the run directory; it must not widen the row's range.
    rows = torch.tensor([[5.0, 6.0, 0.0, 0.0]])
    q, scale, bias = int8_encode(kept_values(rows, torch.tensor([2])), torch.tensor([2]))
    assert scale.item() == pytest.approx(1 / 255)
    assert q.tolist() == [-128, 127]


def test_int8_reports_overflowing_spread_as_inf_scale() -> None:
    kept = torch.tensor([-3e38, 3e38, 1.0])
    q, scale, _ = int8_encode(kept, torch.tensor([2, 1]))
    assert torch.isinf(scale[0]) and scale[1] == 0


def test_int8_of_no_rows() -> None:
    q, scale, bias = int8_encode(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert q.numel() == scale.numel() == bias.numel() == 0


def test_float16_rounding_and_overflow_boundary() -> None:
    # Round to nearest even, and |x| >= 65520 overflows (docs/format.md).
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 65519.0, 65520.0])
    out = cast_values(x, "float16").float()
    assert out[:3].tolist() == [1.0, 1 + 2**-9, 65504.0]
    assert torch.isinf(out[3])
    assert cast_values(x, "bfloat16").dtype == torch.bfloat16
    assert cast_values(x, "float32") is x  # no copy for the exact path


def test_dequantize_int8_needs_scale_and_bias() -> None:
    with pytest.raises(ValueError, match="int8 values need `scale` and `bias`"):
        dequantize_values(torch.zeros(2, dtype=torch.int8), torch.tensor([0, 2]))
