"""Prefix extraction (Eq. 1) and value encodings, checked against the words of docs/format.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amtl_compress.lookup.reference import pack_rows
from amtl_compress.storage.format import kept_values, prefix_mask
from amtl_compress.storage.quantize import (
    cast_values,
    dequantize_values,
    int4_encode,
    int8_encode,
    pack_nibbles,
    rotation_decode,
    rotation_encode,
    unpack_nibbles,
)


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])


def spec_int8(rows: torch.Tensor, lengths: torch.Tensor):
    """docs/format.md's version 1 int8 rule (float32 parameters), row by row in torch."""
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


def f16(v: float, direction: str = "nearest") -> np.float16:
    """float16 of a float32 ``v``: nearest (ties to even), or the next one up / down."""
    h = np.float16(np.float32(v))
    if direction == "up" and np.float32(h) < np.float32(v):
        h = np.nextafter(h, np.float16(np.inf))
    if direction == "down" and np.float32(h) > np.float32(v):
        h = np.nextafter(h, np.float16(-np.inf))
    return h


def spec_v3(rows: torch.Tensor, lengths: torch.Tensor, dtype: str):
    """docs/format.md's version 3 int8 / int4 encoder, row by row with numpy float32 scalars."""
    qs, scales, biases = [], [], []
    f32 = np.float32
    for row, n in zip(rows, lengths.tolist(), strict=True):
        x = row[:n].numpy()
        lo, hi = x.min(), x.max()
        if dtype == "int8":
            b = f16(lo + f32(128) * ((hi - lo) / f32(255)))
            scale = f16(max((f32(b) - lo) / f32(128), (hi - f32(b)) / f32(127)), "up")
            qmin, qmax = -128, 127
        else:
            b = f16(lo, "down")
            scale = f16((hi - f32(b)) / f32(15), "up")
            qmin, qmax = 0, 15
        if scale > 0:
            q = np.clip(np.rint((x - f32(b)) / f32(scale)), qmin, qmax)
        else:
            q = np.zeros_like(x)
        qs.append(torch.from_numpy(q.astype(np.int8 if dtype == "int8" else np.uint8)))
        scales.append(scale)
        biases.append(b)
    return (
        torch.cat(qs),
        torch.from_numpy(np.array(scales, dtype=np.float16)),
        torch.from_numpy(np.array(biases, dtype=np.float16)),
    )


def spec_int4_v4(rows: torch.Tensor, lengths: torch.Tensor):
    """docs/format.md's version 4 (symmetric) int4 encoder, row by row with numpy float32."""
    qs, scales = [], []
    f32 = np.float32
    for row, n in zip(rows, lengths.tolist(), strict=True):
        x = row[:n].numpy()
        lo, hi = x.min(), x.max()
        scale = f16(max(-lo / f32(8), hi / f32(7), f32(0)), "up")
        q = np.clip(np.rint(x / f32(scale)), -8, 7) if scale > 0 else np.zeros_like(x)
        qs.append(torch.from_numpy((q + 8).astype(np.uint8)))
        scales.append(scale)
    scale = torch.from_numpy(np.array(scales, dtype=np.float16))
    return torch.cat(qs), scale, scale.float() * -8


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

    q, scale, bias = int8_encode(kept, lengths, float16_params=False)
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


@pytest.mark.parametrize("dtype", ["int8", "int4 v3", "int4"])
@settings(max_examples=60, deadline=None)
@given(case=rows_and_lengths)
def test_int8_and_int4_with_float16_params_follow_the_spec(dtype: str, case) -> None:
    d, lens, seed, magnitude = case
    lengths = torch.tensor(lens)
    rows = torch.randn(len(lens), d, generator=torch.Generator().manual_seed(seed)) * magnitude
    kept = kept_values(rows, lengths)
    if dtype == "int4":  # version 4: symmetric codes, float16 scale, bias -8 * scale in float32
        q, scale, bias = int4_encode(kept, lengths)
        assert scale.dtype == torch.float16 and bias.dtype == torch.float32
        ref_q, ref_scale, ref_bias = spec_int4_v4(rows, lengths)
    else:
        if dtype == "int8":
            q, scale, bias = int8_encode(kept, lengths)
        else:
            q, scale, bias = int4_encode(kept, lengths, symmetric=False)
        assert scale.dtype == bias.dtype == torch.float16
        ref_q, ref_scale, ref_bias = spec_v3(rows, lengths, dtype.split()[0])
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale) and torch.equal(bias, ref_bias)
    # Every decoded value lies within scale / 2 of its source, whatever the float16 rounding.
    stored = pack_nibbles(q) if dtype.startswith("int4") else q
    decoded = dequantize_values(stored, offsets_of(lengths), scale, bias)
    step = scale.float().repeat_interleave(lengths)
    slack = 4 * torch.finfo(torch.float32).eps * kept.abs().max()
    assert ((decoded - kept).abs() <= 0.5 * step + slack).all()


def test_float16_params_keep_the_error_of_a_row_far_from_zero_small() -> None:
    # A narrow row around 1000: float16 cannot hold its centre (ulp 0.5), so the scale widens to
    # cover [lo, hi] from the rounded bias; the error stays under scale / 2, far below the ulp.
    kept = torch.tensor([1000.1, 1000.2, 1000.3], dtype=torch.float32)
    lengths = torch.tensor([3])
    for encode in (int8_encode, lambda k, n: int4_encode(k, n, symmetric=False)):
        q, scale, bias = encode(kept, lengths)
        stored = pack_nibbles(q) if encode is not int8_encode else q
        decoded = dequantize_values(stored, offsets_of(lengths), scale, bias)
        assert (decoded - kept).abs().max() <= scale.float() / 2 + 1e-4
        assert (decoded - kept).abs().max() < 0.05
    # Version 4's symmetric int4 spans [-8, 7] x scale: the step follows max |x| (1000.3 / 7),
    # not the spread, so such a row is coded coarsely (still within scale / 2; docs/format.md).
    q, scale, bias = int4_encode(kept, lengths)
    decoded = dequantize_values(pack_nibbles(q), offsets_of(lengths), scale, bias)
    assert scale.item() == pytest.approx(1000.3 / 7, rel=1e-3)
    assert (decoded - kept).abs().max() <= scale.float() / 2


def test_int8_ignores_the_zero_tail() -> None:
    # The tail past L_i is zero in the run directory; it must not widen the row's range.
    rows = torch.tensor([[5.0, 6.0, 0.0, 0.0]])
    kept, lengths = kept_values(rows, torch.tensor([2])), torch.tensor([2])
    q, scale, bias = int8_encode(kept, lengths, float16_params=False)
    assert scale.item() == pytest.approx(1 / 255)
    assert q.tolist() == [-128, 127]
    q, scale, bias = int8_encode(kept, lengths)
    # The bias 5 + 128 / 255 is not a float16 (ulp 2**-8): the scale widens by under 1 %.
    assert 1 / 255 <= scale.item() <= 1.01 / 255
    assert q.tolist() in ([-128, 127], [-128, 126], [-127, 127])  # one end of the range is tight


def test_parameter_overflow_is_reported_as_inf() -> None:
    kept = torch.tensor([-3e38, 3e38, 1.0])
    q, scale, _ = int8_encode(kept, torch.tensor([2, 1]), float16_params=False)
    assert torch.isinf(scale[0]) and scale[1] == 0
    # float16 parameters overflow much sooner: a spread of 4e7 needs an int8 scale above 65504.
    kept = torch.tensor([-2e7, 2e7, 1.0])
    for encode in (int8_encode, int4_encode):
        _, scale, bias = encode(kept, torch.tensor([2, 1]))
        assert torch.isinf(scale[0]) and torch.isfinite(scale[1]) and torch.isfinite(bias[1])
    _, _, bias = int4_encode(torch.tensor([-70000.0]), torch.tensor([1]), symmetric=False)
    assert torch.isinf(bias[0])
    # Symmetric int4 stores no bias: only a scale over 65504 (|x| beyond ~4.6e5) overflows.
    _, scale, bias = int4_encode(torch.tensor([-70000.0, 5e5]), torch.tensor([1, 1]))
    assert torch.isfinite(scale[0]) and torch.isinf(scale[1]) and torch.isfinite(bias[0])


@pytest.mark.parametrize("count", [0, 1, 2, 7, 8])
def test_nibbles_pack_low_first_and_unpack(count: int) -> None:
    codes = torch.arange(count, dtype=torch.uint8) % 16
    packed = pack_nibbles(codes)
    assert packed.numel() == (count + 1) // 2
    if count >= 2:
        assert packed[0].item() == codes[0].item() | (codes[1].item() << 4)
    if count % 2:
        assert packed[-1].item() >> 4 == 0  # the padding nibble of an odd count
    assert torch.equal(unpack_nibbles(packed, count), codes)


def test_int8_of_no_rows() -> None:
    for encode in (int8_encode, int4_encode):
        q, scale, bias = encode(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
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
    with pytest.raises(ValueError, match="int8/int4 values need `scale` and `bias`"):
        dequantize_values(torch.zeros(2, dtype=torch.int8), torch.tensor([0, 2]))


def test_int4_codes_are_symmetric_around_8() -> None:
    # docs/format.md, "Value encoding": scale = f16up(max(-lo / 8, hi / 7)), u = q + 8.
    kept = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0, 0.0, 0.0])
    lengths = torch.tensor([3, 2, 2])
    q, scale, bias = int4_encode(kept, lengths)
    assert scale.tolist() == [0.125, 0.4287109375, 0.0]  # f16up(3 / 7) = 0.42871
    assert q.tolist() == [0, 8, 12, 13, 15, 8, 8]  # zero is code 8; an all-zero row too
    assert torch.equal(bias, scale.float() * -8)
    decoded = dequantize_values(pack_nibbles(q), offsets_of(lengths), scale, bias)
    assert decoded[:3].tolist() == [-1.0, 0.0, 0.5]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int4"])
def test_rotation_is_stored_at_the_values_precision(dtype: str) -> None:
    q_mat, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    stored, scale = rotation_encode(q_mat, dtype)
    decoded = rotation_decode(stored, scale)
    assert decoded.dtype == torch.float32
    if dtype in ("int8", "int4"):
        assert stored.dtype == torch.int8 and scale is not None and scale.dtype == torch.float16
        assert int(stored.abs().max()) == 127 and int(stored.min()) >= -127
        # s_i = f16up(max_j |R[i, j]| / 127); every entry within s_i / 2.
        assert (scale.float() * 127 >= q_mat.abs().amax(1)).all()
        assert ((decoded - q_mat).abs() <= scale.float().unsqueeze(1) / 2).all()
    else:
        assert scale is None and stored.dtype == getattr(torch, dtype)
        assert torch.equal(decoded, q_mat.to(getattr(torch, dtype)).float())
    # Encoding the decoded rotation again gives the same bytes (a table read back re-writes).
    again, again_scale = rotation_encode(decoded, dtype)
    assert torch.equal(again, stored)
    assert (again_scale is None) == (scale is None)
    if scale is not None and again_scale is not None:
        assert torch.equal(again_scale, scale)


def test_float32_rotation_of_float16_values_is_stored_as_float16() -> None:
    q_mat, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    exact = q_mat.half().float()  # what `ordering="pca"` stores
    stored, scale = rotation_encode(exact, "float32")
    assert scale is None and stored.dtype == torch.float16
    assert torch.equal(rotation_decode(stored, scale), exact)  # lossless
    # One entry that is not a float16 value keeps the whole rotation float32.
    exact[3, 5] += 2**-20
    stored, _ = rotation_encode(exact, "float32")
    assert stored.dtype == torch.float32 and torch.equal(stored, exact)
    # A NaN stays float32 (the writer rejects it as non-finite).
    exact[0, 0] = float("nan")
    assert rotation_encode(exact, "float32")[0].dtype == torch.float32


def test_rotation_of_zero_rows_codes_zero() -> None:
    rotation = torch.tensor([[0.0, 0.0], [0.6, -0.8]])
    stored, scale = rotation_encode(rotation, "int8")
    assert scale is not None
    assert stored.tolist() == [[0, 0], [95, -127]] and scale[0].item() == 0.0
