"""Encoding kept embedding values in a packed dtype, and decoding them (docs/format.md,
"Value encoding").

int8 is a per-row affine code over the row's kept prefix only (the zeroed tail past L_i, Eq. 1, is
never stored, so it must not widen the row's range): ``value = float32(q) * scale + bias``.

Symbols: r rows in a chunk, L_i kept lengths, S = sum(L_i) kept values. The encoders work on the
kept values back to back (S,), the layout of ``values``. They run in numpy: its segmented
reductions (``minimum.reduceat``) and elementwise float32 kernels are 5-10x faster than the
equivalent torch CPU ops on the pack path, with identical IEEE float32 results.
"""

from __future__ import annotations

import numpy as np
import torch

#: Packed dtypes by their name in files, manifests and the CLI.
PACKED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
}


def int8_encode(
    kept: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row affine int8 code of kept values.

    With ``lo``/``hi`` the min/max of a row's L_i kept values, in float32 arithmetic:
    ``scale = (hi - lo) / 255``, ``bias = lo + 128 * scale`` and
    ``q = clamp(round_half_even((x - bias) / scale), -128, 127)``, so ``lo`` encodes as -128 and
    ``hi`` as 127. A row whose scale is 0 (all kept values equal, or their spread underflows)
    gets ``scale = 0, bias = lo, q = 0``: it decodes to ``lo`` exactly.

    Args:
        kept: (S,) float32, finite, rows' kept prefixes back to back.
        lengths: (r,) int64 L_i >= 1, summing to S.

    Returns:
        ``(q, scale, bias)``: (S,) int8, (r,) float32, (r,) float32. ``scale`` is inf where
        ``hi - lo`` overflows float32; callers must reject such rows.
    """
    x = kept.numpy()
    counts = lengths.numpy()
    if counts.size == 0:
        empty = torch.zeros(0)
        return torch.zeros(0, dtype=torch.int8), empty, empty.clone()
    starts = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    lo = np.minimum.reduceat(x, starts)
    hi = np.maximum.reduceat(x, starts)
    with np.errstate(over="ignore"):  # an overflowing spread becomes inf, reported by the caller
        scale = (hi - lo) / np.float32(255)
        coded = scale > 0
        bias = np.where(coded, lo + np.float32(128) * scale, lo)
    step = np.where(coded, scale, np.float32(1))  # any non-zero step; those q are zeroed below
    with np.errstate(invalid="ignore"):  # inf scale gives NaN q here; the caller rejects the row
        q = (x - np.repeat(bias, counts)) / np.repeat(step, counts)
    np.rint(q, out=q)  # round half to even, like torch.round
    np.clip(q, -128, 127, out=q)
    q[np.repeat(~coded, counts)] = 0
    with np.errstate(invalid="ignore"):
        q8 = q.astype(np.int8)
    return torch.from_numpy(q8), torch.from_numpy(scale), torch.from_numpy(bias)


def cast_values(kept: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 kept values (S,) -> ``float32``/``float16``/``bfloat16`` (round to nearest even).

    float16 overflow gives inf; callers must check (``pack`` rejects it).
    """
    return kept.to(PACKED_DTYPES[dtype])


def dequantize_values(
    values: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode packed ``values`` to float32 (reference path for tests and tools, not the hot path).

    Args:
        values: (S,) float32/float16/bfloat16, or int8 with ``scale`` and ``bias``.
        offsets: (N + 1,) int64 row boundaries into ``values``.
        scale, bias: (N,) float32, int8 only.

    Returns:
        (S,) float32: ``values`` widened, or ``float32(q) * scale[row] + bias[row]``.
    """
    if values.dtype != torch.int8:
        return values.to(torch.float32)
    if scale is None or bias is None:
        raise ValueError("int8 values need `scale` and `bias` to decode")
    lengths = offsets[1:] - offsets[:-1]
    row_scale = torch.repeat_interleave(scale, lengths)
    row_bias = torch.repeat_interleave(bias, lengths)
    return values.to(torch.float32) * row_scale + row_bias
