"""Pure-torch reference lookups over a packed (jagged) embedding table.

A packed table keeps only the first ``L_i = k_i + 1`` values of row ``i`` (paper Eq. 1), torchrec
style. For ``N = 3`` rows, ``D = 4``, lengths ``[2, 4, 1]``::

    values  = [a0 a1 | b0 b1 b2 b3 | c0]      # 1-D, nnz_values = sum(lengths) = 7
    offsets = [0, 2, 6, 7]                     # int64 (N + 1,), offsets[N] == len(values)
    lengths = offsets[1:] - offsets[:-1]       # [2, 4, 1]

Looking up row ``i`` re-pads it: ``values[offsets[i]:offsets[i+1]]`` followed by ``D - L_i``
zeros. For ``int8`` values each row also has a ``scale`` and ``bias`` (float32, (N,)):
``value = q * scale[i] + bias[i]`` for the kept prefix; the tail stays exactly 0 (not ``bias``).

``int4`` values are a ``torch.uint8`` tensor of ``ceil(S / 2)`` bytes for ``S = offsets[N]``
values: the rows back to back as one stream of nibbles (no per-row padding), value ``j`` in byte
``j // 2``, the low nibble for even ``j``, the high nibble for odd ``j``. Each nibble ``u`` is
unsigned (0..15) and decodes like int8: ``u * scale[i] + bias[i]``. A uint8 ``values`` tensor
always means int4.

These functions are the specification of the compiled kernel (``lookup/csrc/lookup.cpp``): for
float32 values both produce bitwise the same output as ``F.embedding`` / ``F.embedding_bag`` on the
dense (N, D) table whose tails are zero, and the kernel matches this module bitwise for every
dtype. They run on any device and are the fallback when the kernel is unavailable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8)
#: Dtypes whose rows carry ``scale`` / ``bias`` (uint8 is int4).
QUANTIZED_DTYPES = (torch.int8, torch.uint8)
INDEX_DTYPES = (torch.int32, torch.int64)
BAG_MODES = ("sum", "mean", "max")


def pack_rows(weight: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Pack the kept prefix of every row of a dense table.

    Args:
        weight: (N, D) floating table; row ``i`` keeps ``weight[i, :lengths[i]]``.
        lengths: (N,) integer, each in [0, D].

    Returns:
        ``(values, offsets)``: values float32 (sum(lengths),), offsets int64 (N + 1,).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"`weight` must be a 2-D floating tensor, got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    n, d = weight.shape
    lengths = lengths.to(device=weight.device, dtype=torch.int64)
    if lengths.shape != (n,):
        raise ValueError(f"`lengths` must have shape ({n},) to match `weight`, got "
                         f"{tuple(lengths.shape)}")
    if n and (int(lengths.min()) < 0 or int(lengths.max()) > d):
        raise ValueError(f"`lengths` must lie in [0, {d}] (the embedding dim)")
    keep = torch.arange(d, device=weight.device) < lengths[:, None]
    values = weight.detach().to(torch.float32)[keep]  # row-major order = rows back to back
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return values, offsets


def value_capacity(values: Tensor) -> int:
    """Values that ``values`` can hold: its length, or for int4 (uint8) two per byte."""
    return 2 * values.numel() if values.dtype == torch.uint8 else values.numel()


def _check_table(values: Tensor, offsets: Tensor, scale: Tensor | None, bias: Tensor | None,
                 embedding_dim: int, offsets_dtypes: tuple[torch.dtype, ...] = (torch.int64,)
                 ) -> int:
    """Check the arguments' dtypes and shapes, O(1), as the kernel's operators do; return N.

    These functions take raw tensors, so they check what they read: the arguments here, and the
    offsets of every looked-up row in :func:`_padded_rows` (the checked operators' behaviour).
    The whole-table offsets rule (:func:`~amtl_compress.storage.offsets.offsets_problem`) is
    checked once where a table enters: the lookup modules and the file reader. The Triton
    functions also take the modules' int32 copy of ``offsets`` (``offsets_dtypes``).
    """
    if values.dim() != 1 or values.dtype not in VALUE_DTYPES:
        raise TypeError(f"`values` must be 1-D float32/float16/bfloat16/int8/uint8 (int4), got "
                        f"{values.dim()}-D {values.dtype}")
    if offsets.dim() != 1 or offsets.dtype not in offsets_dtypes or offsets.numel() < 1:
        kinds = "/".join(str(t).removeprefix("torch.") for t in offsets_dtypes)
        raise TypeError(f"`offsets` must be a non-empty 1-D {kinds} tensor (N + 1,)")
    if embedding_dim < 1:
        raise ValueError(f"`embedding_dim` must be >= 1, got {embedding_dim}")
    n = offsets.numel() - 1
    quantized = values.dtype in QUANTIZED_DTYPES
    for label, t in (("scale", scale), ("bias", bias)):
        if quantized and (t is None or t.dtype != torch.float32 or t.shape != (n,)):
            raise TypeError(f"int8 / int4 (uint8) `values` need `{label}` float32 of shape "
                            f"({n},)")
        if not quantized and t is not None:
            raise TypeError(f"`{label}` is only used with int8 / int4 (uint8) `values`, got "
                            f"{values.dtype}")
    return n


def _check_ids(ids: Tensor, n: int) -> None:
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ids_error(ids, n)


def ids_error(ids: Tensor, n: int) -> IndexError:
    """The IndexError for ``ids`` of which at least one lies outside [0, N)."""
    bad = ids[(ids < 0) | (ids >= n)]
    return IndexError(f"id {int(bad[0])} is outside [0, {n})")


def corrupt_rows(starts: Tensor, lengths: Tensor, capacity: int, embedding_dim: int) -> Tensor:
    """Bool mask of looked-up rows whose (start, length) do not lie in ``values`` or exceed D."""
    return (starts < 0) | (lengths < 0) | (lengths > embedding_dim) | (
        starts + lengths > capacity)


def corrupt_row_error(offsets: Tensor, row: int, capacity: int, embedding_dim: int) -> ValueError:
    """The ValueError for looked-up row ``row`` whose offsets :func:`corrupt_rows` flags."""
    return ValueError(f"corrupt offsets for row {row}: [{int(offsets[row])}, "
                      f"{int(offsets[row + 1])}) is not within [0, {capacity}] or is "
                      f"longer than {embedding_dim}")


def _padded_rows(values: Tensor, offsets: Tensor, scale: Tensor | None, bias: Tensor | None,
                 rows: Tensor, embedding_dim: int) -> Tensor:
    """Dequantised, zero-padded rows ``rows`` (R,) of the packed table -> (R, D) float32."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    capacity = value_capacity(values)
    bad = corrupt_rows(starts, lengths, capacity, embedding_dim)
    if bool(bad.any()):
        raise corrupt_row_error(offsets, int(rows[bad][0]), capacity, embedding_dim)
    col = torch.arange(embedding_dim, device=values.device)
    keep = col < lengths[:, None]
    out = torch.zeros(rows.numel(), embedding_dim, dtype=torch.float32, device=values.device)
    if values.numel() == 0:  # every kept length is 0: nothing to gather
        return out
    # Masked-off positions gather element 0 (always valid) and are zeroed below.
    at = torch.where(keep, starts[:, None] + col, 0)
    if values.dtype == torch.uint8:  # int4: nibble `at` of the stream, low nibble first
        gathered = ((values[at >> 1] >> ((at & 1) * 4).to(torch.uint8)) & 15).to(torch.float32)
    else:
        gathered = values[at].to(torch.float32)
    if scale is not None and bias is not None:
        # Two roundings (mul, then add), as the kernel does: no fused multiply-add.
        gathered = gathered * scale[rows, None] + bias[rows, None]
    return torch.where(keep, gathered, out)


def packed_embedding_reference(values: Tensor, offsets: Tensor, scale: Tensor | None,
                               bias: Tensor | None, ids: Tensor, embedding_dim: int) -> Tensor:
    """Re-padding lookup: the ``nn.Embedding`` forward of the packed table.

    Args:
        values: (nnz_values,) float32/float16/bfloat16/int8, the kept prefixes back to back, or
            int4: uint8 (ceil(nnz_values / 2),), two values a byte (see the module docstring).
        offsets: (N + 1,) int64, row ``i`` is values ``offsets[i]`` to ``offsets[i+1] - 1``.
        scale, bias: (N,) float32 for int8 / int4 values, else None.
        ids: any shape, int32/int64, each in [0, N).
        embedding_dim: D.

    Returns:
        (*ids.shape, D) float32: row prefix (dequantised), zeros after.

    Raises:
        IndexError: an id outside [0, N). ValueError: corrupt offsets of a looked-up row.
    """
    n = _check_table(values, offsets, scale, bias, embedding_dim)
    _check_ids(ids, n)
    flat = ids.reshape(-1).to(torch.int64)
    out = _padded_rows(values, offsets, scale, bias, flat, embedding_dim)
    return out.reshape(*ids.shape, embedding_dim)


def check_bag_offsets(bag_offsets: Tensor, nnz: int, include_last_offset: bool) -> int:
    """Validate EmbeddingBag offsets (B or B + 1,) against ``nnz`` ids; return B.

    Rules (the kernel enforces the same): offsets[0] == 0, non-decreasing, last <= nnz, and with
    ``include_last_offset`` the last offset must equal nnz (it closes the last bag).
    """
    k = check_bag_offsets_shape(bag_offsets, include_last_offset)
    if k == 0:
        return 0
    decreasing = k > 1 and bool((bag_offsets[1:] < bag_offsets[:-1]).any())
    problem = bag_offsets_problem(int(bag_offsets[0]), decreasing, int(bag_offsets[-1]), nnz,
                                  include_last_offset)
    if problem is not None:
        raise problem
    return k - 1 if include_last_offset else k


def check_bag_offsets_shape(bag_offsets: Tensor, include_last_offset: bool) -> int:
    """The O(1) part of :func:`check_bag_offsets`; returns ``len(bag_offsets)``."""
    if bag_offsets.dim() != 1 or bag_offsets.dtype not in INDEX_DTYPES:
        raise TypeError("bag `offsets` must be a 1-D int32/int64 tensor")
    k = bag_offsets.numel()
    if include_last_offset and k < 1:
        raise ValueError("with include_last_offset=True, `offsets` needs at least 1 element")
    return k


def bag_offsets_problem(first: int, decreasing: bool, last: int, nnz: int,
                        include_last_offset: bool) -> ValueError | None:
    """The ValueError for non-empty bag offsets with first / last element ``first`` / ``last``
    (``decreasing``: some element is below its predecessor), or None when they are valid."""
    if first != 0:
        return ValueError(f"offsets[0] must be 0, got {first}")
    if decreasing:
        return ValueError("bag `offsets` must be non-decreasing")
    if last > nnz or (include_last_offset and last != nnz):
        want = "equal" if include_last_offset else "be <="
        return ValueError(f"the last bag offset must {want} len(input) = {nnz}, got {last}")
    return None


def check_bag_arguments(input: Tensor, per_sample_weights: Tensor | None, mode: str,
                        padding_idx: int | None, n: int) -> None:
    """O(1) checks of a bag call's ``per_sample_weights`` and ``padding_idx`` for N = ``n``."""
    if per_sample_weights is not None:
        if mode != "sum":
            raise NotImplementedError(f"per_sample_weights is only supported for mode='sum' "
                                      f"(got mode='{mode}')")
        if per_sample_weights.dtype != torch.float32 or per_sample_weights.shape != input.shape:
            raise TypeError(f"per_sample_weights must be float32 of shape {tuple(input.shape)}")
    if padding_idx is not None and not 0 <= padding_idx < n:
        raise ValueError(f"padding_idx must be in [0, {n}), got {padding_idx}")


def packed_embedding_bag_reference(values: Tensor, offsets: Tensor, scale: Tensor | None,
                                   bias: Tensor | None, input: Tensor, bag_offsets: Tensor,
                                   per_sample_weights: Tensor | None, mode: str,
                                   embedding_dim: int, padding_idx: int | None,
                                   include_last_offset: bool) -> Tensor:
    """Pooled lookup: the ``nn.EmbeddingBag`` forward of the packed table (1-D input form).

    Args:
        values, offsets, scale, bias, embedding_dim: the packed table, as in
            :func:`packed_embedding_reference`.
        input: (nnz,) int32/int64 ids in [0, N).
        bag_offsets: (B,) start of each bag in ``input``, or (B + 1,) with
            ``include_last_offset`` (then the last element must be nnz).
        per_sample_weights: (nnz,) float32 or None; only with mode "sum".
        mode: "sum", "mean" or "max".
        padding_idx: None or a row in [0, N) whose ids are skipped (and not counted by "mean").

    Returns:
        (B, D) float32. Empty bags (or bags of only ``padding_idx``) are zeros.
    """
    n = _check_table(values, offsets, scale, bias, embedding_dim)
    if mode not in BAG_MODES:
        raise ValueError(f"mode must be one of sum, mean, max, got {mode!r}")
    if input.dim() != 1:
        raise ValueError(f"input must be 1-D, got {input.dim()}-D")
    _check_ids(input, n)
    check_bag_offsets(bag_offsets, input.numel(), include_last_offset)
    check_bag_arguments(input, per_sample_weights, mode, padding_idx, n)

    # Gather only the rows used, plus one zero row at the end that stands in for `padding_idx`
    # when it does not occur: passing a padding_idx keeps torch on the same arithmetic path
    # (mul + add instead of fma for weighted sums) as the dense call it reproduces.
    rows, local = torch.unique(input.to(torch.int64), return_inverse=True)
    table = _padded_rows(values, offsets, scale, bias, rows, embedding_dim)
    table = torch.cat([table, table.new_zeros(1, embedding_dim)])
    local_pad = None
    if padding_idx is not None:
        hit = (rows == padding_idx).nonzero()
        local_pad = int(hit[0, 0]) if hit.numel() else rows.numel()
    return F.embedding_bag(local, table, bag_offsets.to(torch.int64), mode=mode,
                           per_sample_weights=per_sample_weights,
                           include_last_offset=include_last_offset, padding_idx=local_pad)
