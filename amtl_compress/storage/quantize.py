"""Encoding kept embedding values in a packed dtype, and decoding them (docs/format.md,
"Value encoding").

int8 and int4 are per-row affine codes over the row's kept prefix only (the zeroed tail past L_i,
Eq. 1, is never stored, so it must not widen the row's range): ``value = float32(q) * scale +
bias``. Format version 4 stores int8 ``scale`` and ``bias`` in float16, and int4 as symmetric
codes with a float16 ``scale`` only (``bias = -8 * scale``), two codes a byte (value j in byte
``j // 2``, low nibble for even j). Older encoders are kept for comparisons and tests: version 3's
int4 with float16 ``scale`` and ``bias`` (``int4_encode(..., symmetric=False)``), versions 1 and
2's float32 int8 parameters (``int8_encode(..., float16_params=False)``).

A rotation (docs/format.md, "Rotation") is stored at the values' precision
(:func:`rotation_encode`): float32 as float16 when that is exact (the float16-exact rotation of
``ordering="pca"``), else as is; float16/bfloat16 as such; int8/int4 as symmetric int8 codes
with a float16 scale per row of R.

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
    "int4": torch.uint8,  # two 4-bit codes a byte
}
#: Packed dtypes stored as an affine code with per-row ``scale`` and ``bias``.
QUANTIZED = ("int8", "int4")
#: Largest finite float16: a float16 ``scale`` or ``bias`` beyond it cannot be stored.
FLOAT16_MAX = 65504.0


def int8_encode(
    kept: torch.Tensor, lengths: torch.Tensor, *, float16_params: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row affine int8 code of kept values (docs/format.md, "Value encoding").

    With ``lo``/``hi`` the min/max of a row's L_i kept values, in float32 arithmetic:

    - ``float16_params`` (format versions 3 and 4): ``b = f16(lo + 128 * ((hi - lo) / 255))``,
      ``scale = f16up(max((b - lo) / 128, (hi - b) / 127))``, so [lo, hi] stays inside the codes'
      range whatever the rounding of ``b`` and every decoded value is within ``scale / 2``;
    - else (versions 1 and 2): ``scale = (hi - lo) / 255``, ``b = lo + 128 * scale``;

    then ``q = clamp(round_half_even((x - b) / scale), -128, 127)``, ``bias = b``. A row whose
    scale is 0 (all kept values equal to ``b``) gets ``q = 0``: it decodes to ``b`` exactly.

    Args:
        kept: (S,) float32, finite, rows' kept prefixes back to back.
        lengths: (r,) int64 L_i >= 1, summing to S.
        float16_params: round ``scale``/``bias`` to float16 (returned as float16).

    Returns:
        ``(q, scale, bias)``: (S,) int8, (r,) float16 (float32 without ``float16_params``). A
        parameter is inf where it overflows (float16 or float32); callers must reject such rows
        (:func:`params_overflow`).
    """
    x, counts, lo, hi = _row_ranges(kept, lengths)
    if counts.size == 0:
        empty = torch.zeros(0, dtype=torch.float16 if float16_params else torch.float32)
        return torch.zeros(0, dtype=torch.int8), empty, empty.clone()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, reported by the caller
        if float16_params:
            centre = lo + np.float32(128) * ((hi - lo) / np.float32(255))
            b16 = centre.astype(np.float16)
            b = b16.astype(np.float32)
            scale16 = _f16_up(np.maximum((b - lo) / np.float32(128), (hi - b) / np.float32(127)))
            scale = scale16.astype(np.float32)
        else:
            scale = (hi - lo) / np.float32(255)
            b = np.where(scale > 0, lo + np.float32(128) * scale, lo)
    q = _codes(x, counts, scale, b, -128, 127).astype(np.int8)
    if float16_params:
        return torch.from_numpy(q), torch.from_numpy(scale16), torch.from_numpy(b16)
    return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(b)


def int4_encode(
    kept: torch.Tensor, lengths: torch.Tensor, *, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row 4-bit code of kept values (docs/format.md, "Value encoding").

    With ``lo``/``hi`` the min/max of a row's L_i kept values, in float32 arithmetic:

    - ``symmetric`` (format version 4): ``scale = f16up(max(-lo / 8, hi / 7, 0))``,
      ``q = clamp(round_half_even(x / scale), -8, 7) + 8``, ``bias = -8 * scale`` (not stored:
      the file holds ``scale`` only);
    - else (version 3): ``b = f16down(lo)``, ``scale = f16up((hi - b) / 15)``,
      ``q = clamp(round_half_even((x - b) / scale), 0, 15)``, ``bias = b``;

    where ``scale == 0`` the codes are 8 (symmetric: every kept value is 0) or 0 (version 3:
    every kept value is ``b``). Decoding is ``float32(q) * scale + bias``, within ``scale / 2``
    of ``x``.

    Args:
        kept: (S,) float32, finite, rows' kept prefixes back to back.
        lengths: (r,) int64 L_i >= 1, summing to S.
        symmetric: version 4's code (else version 3's).

    Returns:
        ``(q, scale, bias)``: (S,) uint8 codes 0..15, one a byte (:func:`pack_nibbles` packs
        them two a byte), (r,) float16 ``scale`` (inf where it overflows float16) and (r,)
        ``bias``: float16 (version 3, -inf where it overflows), or float32 ``-8 * scale``
        (``symmetric``, exact; the file does not store it).
    """
    x, counts, lo, hi = _row_ranges(kept, lengths)
    if counts.size == 0:
        empty = torch.zeros(0, dtype=torch.float16)
        return torch.zeros(0, dtype=torch.uint8), empty, empty.clone()
    with np.errstate(over="ignore", invalid="ignore"):
        if symmetric:
            scale16 = _f16_up(
                np.maximum(np.maximum(-lo / np.float32(8), hi / np.float32(7)), np.float32(0))
            )
            scale = scale16.astype(np.float32)
            b16 = scale * np.float32(-8)  # float32, exact; the in-memory bias, never stored
            # Code x / scale (not (x - b) / scale, whose float32 rounding could differ), then
            # shift [-8, 7] to the stored [0, 15].
            q = _codes(x, counts, scale, np.zeros_like(scale), -8, 7) + np.float32(8)
        else:
            b16 = _f16_down(lo)
            b = b16.astype(np.float32)
            scale16 = _f16_up((hi - b) / np.float32(15))
            scale = scale16.astype(np.float32)
            q = _codes(x, counts, scale, b, 0, 15)
    return torch.from_numpy(q.astype(np.uint8)), torch.from_numpy(scale16), torch.from_numpy(b16)


def rotation_encode(
    rotation: torch.Tensor, dtype: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 (D, D) rotation as format version 4 stores it beside values of ``dtype``.

    ``float32``: float16 if every entry is a float16 value (``R.half().float() == R``: no loss,
    half the bytes), else as is. ``float16`` / ``bfloat16``: rounded to nearest even (``Tensor.to``;
    float16 overflow gives inf, which the writer rejects). ``int8`` / ``int4``: per row i of R,
    in float32 arithmetic, ``s_i = f16up(max_j |R[i, j]| / 127)`` and
    ``q[i, j] = clamp(round_half_even(R[i, j] / s_i), -127, 127)`` (0 where ``s_i == 0``), so
    ``float32(q) * s_i`` is within ``s_i / 2`` of R[i, j]. Encoding a decoded rotation again
    gives the same bytes.

    Args:
        rotation: (D, D) float32.
        dtype: the table's packed dtype name.

    Returns:
        ``(stored, scale)``: (D, D) float32/float16/bfloat16 and None (its dtype is the file's
        ``rotation`` dtype), or (D, D) int8 codes and
        (D,) float16 ``rotation_scale`` (inf where it overflows float16).
    """
    if dtype == "float32":
        half = rotation.to(torch.float16)
        # torch.equal is False for a NaN, which then stays float32 for the writer to reject.
        exact = torch.equal(half.to(rotation.dtype), rotation)
        return (half if exact else rotation.to(torch.float32)), None
    if dtype not in QUANTIZED:
        return rotation.to(PACKED_DTYPES[dtype]), None
    r = rotation.detach().cpu().to(torch.float32).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        scale16 = _f16_up(np.abs(r).max(axis=1, initial=np.float32(0)) / np.float32(127))
        scale = scale16.astype(np.float32)
        step = np.where((scale > 0) & np.isfinite(scale), scale, np.float32(1))
        q = np.rint(r / step[:, None])
    np.clip(q, -127, 127, out=q)
    q[~((scale > 0) & np.isfinite(scale))] = 0
    return torch.from_numpy(q.astype(np.int8)), torch.from_numpy(scale16)


def rotation_decode(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`rotation_encode`: (D, D) float32 (exact widening, or
    ``float32(q) * float32(scale[row])``, exact: 8 + 11 significant bits)."""
    if scale is None:
        return stored.to(torch.float32)
    return stored.to(torch.float32) * scale.to(torch.float32).unsqueeze(1)


def params_overflow(scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(r,) bool: rows whose ``scale`` or ``bias`` is not finite (overflowed while encoding)."""
    # numpy: torch.isfinite on a chunk's (r,) params can take 10-30 ms instead of ~0.1 ms when
    # the other cores are busy (its thread pool waits for a second thread).
    ok = np.isfinite(scale.numpy()) & np.isfinite(bias.numpy())
    return torch.from_numpy(~ok)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes (S,) uint8 0..15 -> (ceil(S / 2),) uint8, code j in byte ``j // 2``.

    Even j go to the low nibble, odd j to the high one; an odd S leaves the last high nibble 0.
    """
    c = codes.numpy()
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, dtype=np.uint8)])
    return torch.from_numpy(c[0::2] | (c[1::2] << np.uint8(4)))


def unpack_nibbles(packed: torch.Tensor, num_values: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (ceil(S / 2),) uint8 -> (S,) uint8 codes 0..15."""
    p = packed.numpy()
    codes = np.empty(2 * p.size, dtype=np.uint8)
    codes[0::2] = p & np.uint8(0x0F)
    codes[1::2] = p >> np.uint8(4)
    return torch.from_numpy(codes[:num_values])


def _row_ranges(
    kept: torch.Tensor, lengths: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, counts, lo, hi)``: the kept values, the lengths and each row's min and max."""
    x = kept.numpy()
    counts = lengths.numpy()
    if counts.size == 0:
        return x, counts, np.zeros(0, np.float32), np.zeros(0, np.float32)
    starts = np.zeros(counts.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return x, counts, np.minimum.reduceat(x, starts), np.maximum.reduceat(x, starts)


def _codes(
    x: np.ndarray, counts: np.ndarray, scale: np.ndarray, bias: np.ndarray, qmin: int, qmax: int
) -> np.ndarray:
    """``clamp(round_half_even((x - bias) / scale), qmin, qmax)`` per row, 0 where scale is 0.

    Returned as float32 with integral values in [qmin, qmax] (0 where a parameter is not finite;
    those rows are rejected by the caller).
    """
    coded = scale > 0
    step = np.where(coded, scale, np.float32(1))  # any non-zero step; those q are zeroed below
    with np.errstate(invalid="ignore", over="ignore"):
        q = (x - np.repeat(bias, counts)) / np.repeat(step, counts)
    np.rint(q, out=q)  # round half to even, like torch.round
    np.clip(q, qmin, qmax, out=q)
    bad = np.repeat(~coded | ~np.isfinite(scale) | ~np.isfinite(bias), counts)
    q[bad | np.isnan(q)] = 0
    return q


def _f16_up(v: np.ndarray) -> np.ndarray:
    """The smallest float16 >= each float32 of ``v`` (inf beyond float16's range)."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _f16_down(v: np.ndarray) -> np.ndarray:
    """The largest float16 <= each float32 of ``v`` (-inf beyond float16's range)."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    high = h.astype(np.float32) > v
    h[high] = np.nextafter(h[high], np.float16(-np.inf))
    return h


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
        values: (S,) float32/float16/bfloat16, or int8 with ``scale`` and ``bias``, or int4:
            (ceil(S / 2),) uint8 with ``scale`` and ``bias`` (S = ``offsets[-1]``).
        offsets: (N + 1,) int64 row boundaries into the value stream.
        scale, bias: (N,) float32 (or float16), int8 and int4 only.

    Returns:
        (S,) float32: ``values`` widened, or ``float32(q) * scale[row] + bias[row]``.
    """
    if values.dtype not in (torch.int8, torch.uint8):
        return values.to(torch.float32)
    if scale is None or bias is None:
        raise ValueError("int8/int4 values need `scale` and `bias` to decode")
    if values.dtype == torch.uint8:
        values = unpack_nibbles(values, int(offsets[-1]))
    lengths = offsets[1:] - offsets[:-1]
    row_scale = torch.repeat_interleave(scale.to(torch.float32), lengths)
    row_bias = torch.repeat_interleave(bias.to(torch.float32), lengths)
    return values.to(torch.float32) * row_scale + row_bias
