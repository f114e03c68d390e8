"""Shared builders and comparisons for the tests/test_lookup_*.py files (a helper, no tests)."""

from __future__ import annotations

import torch
from torch import Tensor

from amtl_compress.lookup import pack_rows


def assert_bitwise(actual: Tensor, expected: Tensor) -> None:
    """Equal bit patterns (so -0.0 != +0.0); two NaNs match whatever their payload."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype == torch.float32
    both_nan = actual.isnan() & expected.isnan()
    a = actual.view(torch.int32)[~both_nan]
    e = expected.view(torch.int32)[~both_nan]
    if not torch.equal(a, e):
        bad = (a != e).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"{int((a != e).sum())} elements differ, e.g. flat positions {bad}: "
                             f"{actual.flatten()[~both_nan.flatten()][bad].tolist()} vs "
                             f"{expected.flatten()[~both_nan.flatten()][bad].tolist()}")


def random_table(n: int, d: int, seed: int, *, specials: bool = False,
                 min_length: int = 1) -> tuple[Tensor, Tensor]:
    """(weight (N, D) float32, lengths (N,) int64 in [min_length, D]).

    With ``specials`` some kept values are -0.0, +-inf or NaN, to pin down the sign-of-zero and
    non-finite behaviour.
    """
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, d, generator=g)
    if specials:
        pick = torch.rand(n, d, generator=g)
        weight[pick < 0.08] = -0.0
        weight[(pick >= 0.08) & (pick < 0.1)] = float("inf")
        weight[(pick >= 0.1) & (pick < 0.11)] = float("-inf")
        weight[(pick >= 0.11) & (pick < 0.12)] = float("nan")
    lengths = torch.randint(min_length, d + 1, (n,), generator=g)
    return weight, lengths


def int4_encode(values: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise packed float32 rows to int4, written from the rule alone (docs/lookup.md).

    Per row i: ``bias = lo``, ``scale = (hi - lo) / 15`` over its kept values (0 and 0 for an empty
    row), ``u = clamp(round_half_even((x - bias) / scale), 0, 15)`` (``u = 0`` where scale is 0).
    The codes go in one nibble stream: value j in byte j // 2, low nibble for even j.

    Returns ``(bytes uint8 (ceil(S / 2),), scale float32 (N,), bias float32 (N,))``.
    """
    n = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(n), lengths)
    lo = torch.zeros(n).scatter_reduce(0, rows, values, "amin", include_self=False)
    hi = torch.zeros(n).scatter_reduce(0, rows, values, "amax", include_self=False)
    scale = (hi - lo) / 15
    bias = lo
    safe = torch.where(scale[rows] == 0, 1.0, scale[rows])
    u = torch.round((values - bias[rows]) / safe).clamp(0, 15)  # torch.round: half to even
    u = torch.where(scale[rows] == 0, 0.0, u).to(torch.uint8)
    return int4_pack(u), scale, bias


def int4_pack(codes: Tensor) -> Tensor:
    """Codes (S,) in [0, 15] -> the nibble stream, uint8 (ceil(S / 2),); an odd S pads with 0."""
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4)


def int4_codes(stream: Tensor, count: int) -> Tensor:
    """The first ``count`` codes of a nibble stream, uint8 (count,)."""
    both = torch.stack([stream & 15, stream >> 4], 1).reshape(-1)
    return both[:count]


def dense_of(values: Tensor, offsets: Tensor, d: int, scale: Tensor | None = None,
             bias: Tensor | None = None) -> Tensor:
    """The dense (N, D) float32 table a packed table stands for: dequantised prefix, +0.0 tail."""
    n = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    keep = torch.arange(d) < lengths[:, None]
    dense = torch.zeros(n, d)
    if values.dtype == torch.uint8:  # int4
        values = int4_codes(values, int(offsets[-1]))
    kept = values.float()
    if scale is not None and bias is not None:
        rows = torch.repeat_interleave(torch.arange(n), lengths)
        kept = kept * scale[rows] + bias[rows]
    dense[keep] = kept
    return dense


def packed(weight: Tensor, lengths: Tensor, dtype: torch.dtype = torch.float32, seed: int = 0
           ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(values, offsets, scale, bias) of ``weight`` kept to ``lengths`` in ``dtype``.

    int8: random codes and per-row scale / bias (the decode is what is tested). uint8 (int4):
    ``weight`` encoded by :func:`int4_encode`, non-finite values read as 0.
    """
    values, offsets = pack_rows(weight, lengths)
    if dtype == torch.uint8:
        stream, scale, bias = int4_encode(torch.nan_to_num(values, 0.0, 0.0, 0.0), offsets)
        return stream, offsets, scale, bias
    if dtype == torch.int8:
        g = torch.Generator().manual_seed(seed)
        n = lengths.numel()
        q = torch.randint(-128, 128, (values.numel(),), generator=g, dtype=torch.int8)
        return q, offsets, torch.rand(n, generator=g) * 0.1, torch.randn(n, generator=g)
    return values.to(dtype), offsets, None, None
