"""The packed lookups on a GPU: Triton kernels, chosen by the modules for CUDA tensors.

``packed_embedding_triton`` / ``packed_embedding_bag_triton`` take the arguments of the reference
functions (:mod:`amtl_compress.lookup.reference`) and give the same bits: float32 values bitwise
equal to ``F.embedding`` / ``F.embedding_bag`` on the zero-tailed dense table as torch computes
them on the CPU, every other dtype bitwise equal to the reference. The kernels themselves are in
:mod:`amtl_compress.lookup._triton_kernels`.

Triton is imported on the first GPU lookup, never at package import: a CPU-only install needs
no Triton, and CUDA builds of torch ship it. Where it cannot be imported, or with
``AMTL_COMPRESS_KERNEL=reference``, CUDA lookups use the pure-torch reference (one warning).

Arguments are checked in torch before the launch (the kernels assume them valid), with one
device-to-host copy per call for the data-dependent checks (ids in [0, N), bag offsets, and on
the checked path every looked-up row's offsets).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import Tensor

from amtl_compress.lookup.ops import kernel_mode
from amtl_compress.lookup.reference import (
    BAG_MODES,
    INDEX_DTYPES,
    _check_table,
    bag_offsets_problem,
    check_bag_arguments,
    check_bag_offsets_shape,
    corrupt_row_error,
    corrupt_rows,
    ids_error,
    value_capacity,
)

#: The Triton version the test and dev set-ups install (the `triton` extra of pyproject.toml).
TRITON_PIN = "3.9.0"

_KIND = {torch.int8: 1, torch.uint8: 2}  # anything else: 0 (float, converted exactly)
_MODE = {"sum": 0, "mean": 1, "max": 2}
_WEIGHTS_NONE, _WEIGHTS_FUSED, _WEIGHTS_SEPARATE = 0, 1, 2

_warned_missing = False


@functools.cache
def _import_error() -> str | None:
    """Why ``import triton`` fails here (once per process), or None when it works."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True if Triton can be imported (imports it on the first call)."""
    return _import_error() is None


def use_triton(values: Tensor) -> bool:
    """True where the modules run a table with these ``values`` through the Triton kernels: CUDA
    tensors, Triton importable and ``AMTL_COMPRESS_KERNEL`` not ``reference``. A CUDA table
    without Triton uses the reference, with one RuntimeWarning per process."""
    global _warned_missing
    if not values.is_cuda or kernel_mode() == "reference":
        return False
    if triton_available():
        return True
    if not _warned_missing:
        _warned_missing = True
        warnings.warn(f"Triton cannot be imported ({_import_error()}): CUDA lookups use the "
                      f"slower pure-torch reference; install a CUDA build of torch, which "
                      f"ships Triton, or triton itself (tested: {TRITON_PIN})",
                      RuntimeWarning, stacklevel=3)
    return False


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    from amtl_compress.lookup import _triton_kernels

    return _triton_kernels.jit(interpret)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: large tiles, so its tests cover tiles of several bags
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_d(dim: int) -> int:
    """Columns a program handles: D rounded up to a power of two, at most 128."""
    return min(_next_power_of_2(dim), 128)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_check(values: Tensor, interpret: bool, **tensors: Tensor | None) -> None:
    want = "cpu" if interpret else "cuda"
    if values.device.type != want:
        raise ValueError(f"`values` must be a {want} tensor for this call, got {values.device}"
                         + ("" if interpret else "; use the reference for other devices"))
    for label, t in tensors.items():
        if t is not None and t.device != values.device:
            raise ValueError(f"`{label}` is on {t.device} but the table is on {values.device}; "
                             f"move it with .to({str(values.device)!r})")


def _launch(kernel: Any, grid: tuple[int, int], interpret: bool, *args: Any,
            **meta: Any) -> None:
    """Launch with ``enable_fp_fusion=False``: ``a * b + c`` stays two roundings, as on the CPU
    (the kernels ask for a fused multiply-add where torch uses one, with ``tl.fma``)."""
    if not interpret:
        # Triton launches on the current device: make it the table's (cuda:1 while cuda:0 is
        # current would read another GPU's addresses).
        with torch.cuda.device(args[0].device):
            kernel[grid](*args, **meta, enable_fp_fusion=False)
        return
    import numpy as np

    with np.errstate(all="ignore"):  # inf - inf and the like are meant (NaN), as on a GPU
        kernel[grid](*args, **meta, enable_fp_fusion=False)


def _scalars(parts: list[Tensor]) -> list[int]:
    """The int64 0-d tensors ``parts`` as Python ints, in one device-to-host copy."""
    if not parts:
        return []
    return torch.stack([p.to(torch.int64) for p in parts]).tolist()


def _row_parts(values: Tensor, offsets: Tensor, rows: Tensor, embedding_dim: int,
               n: int) -> list[Tensor]:
    """[first position of a corrupt looked-up row, or len(rows)] as a 0-d tensor (ids clamped
    into [0, N), so it can be computed before the ids are known to be valid; N >= 1)."""
    safe = rows.to(torch.int64).clamp(0, n - 1)
    starts = offsets[safe].to(torch.int64)
    lengths = offsets[safe + 1].to(torch.int64) - starts
    bad = corrupt_rows(starts, lengths, value_capacity(values), embedding_dim)
    where = torch.arange(rows.numel(), device=rows.device)
    return [torch.where(bad, where, rows.numel()).min()]


def _table_args(values: Tensor, offsets: Tensor, scale: Tensor | None,
                bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Contiguous tensors for the kernel; a stand-in for an absent or empty one (never read:
    every load from it is masked off, or its KIND never reads it)."""
    values = values.contiguous()
    if values.numel() == 0:
        values = values.new_zeros(1)
    offsets = offsets.contiguous()
    scale = values if scale is None else scale.contiguous()
    bias = values if bias is None else bias.contiguous()
    return values, offsets, scale, bias


def packed_embedding_triton(values: Tensor, offsets: Tensor, scale: Tensor | None,
                            bias: Tensor | None, ids: Tensor, embedding_dim: int, *,
                            checked: bool = True, interpret: bool = False) -> Tensor:
    """:func:`~amtl_compress.lookup.reference.packed_embedding_reference` as a Triton kernel.

    Args:
        values, scale, bias, ids, embedding_dim: as for the reference (CUDA tensors).
        offsets: (N + 1,) int64, or int32 (the modules' validated copy).
        checked: check every looked-up row's offsets (ValueError for a corrupt one); the modules
            pass False for an offsets copy they validated whole.
        interpret: run Triton's interpreter on CPU tensors instead (tests; slow).

    Returns:
        (*ids.shape, D) float32 on the table's device.

    Raises:
        IndexError: an id outside [0, N). ValueError: corrupt offsets of a looked-up row.
    """
    n = _check_table(values, offsets, scale, bias, embedding_dim, INDEX_DTYPES)
    _device_check(values, interpret, offsets=offsets, scale=scale, bias=bias, ids=ids)
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    flat = ids.reshape(-1).contiguous()
    num_ids = flat.numel()
    if num_ids == 0:
        return torch.empty(*ids.shape, embedding_dim, dtype=torch.float32, device=values.device)
    if n == 0:  # no row to gather the checks from: every id is out of range
        raise ids_error(flat, n)
    parts = list(torch.aminmax(flat))
    if checked:
        parts += _row_parts(values, offsets, flat, embedding_dim, n)
    got = _scalars(parts)  # the one copy to the host
    if got[0] < 0 or got[1] >= n:
        raise ids_error(flat, n)
    if checked and got[2] < num_ids:
        raise corrupt_row_error(offsets, int(flat[got[2]]), value_capacity(values),
                                embedding_dim)
    out = launch_embedding(values, offsets, scale, bias, flat, embedding_dim, interpret)
    return out.reshape(*ids.shape, embedding_dim)


def launch_embedding(values: Tensor, offsets: Tensor, scale: Tensor | None, bias: Tensor | None,
                     ids: Tensor, embedding_dim: int, interpret: bool = False) -> Tensor:
    """The embedding kernel alone, no checks: ``ids`` (M,) contiguous, all in [0, N), ``offsets``
    a valid index (:func:`packed_embedding_triton` checks; ``bench/lookup.py`` times this part
    on its own). Returns (M, D) float32."""
    num_ids = ids.numel()
    out = torch.empty(num_ids, embedding_dim, dtype=torch.float32, device=values.device)
    if num_ids == 0:
        return out
    v, o, s, b = _table_args(values, offsets, scale, bias)
    block_d = _block_d(embedding_dim)
    block_m = _tile_rows(2048 // block_d, num_ids, _cdiv(embedding_dim, block_d), values.device)
    grid = (_cdiv(num_ids, block_m), _cdiv(embedding_dim, block_d))
    _launch(_kernels(interpret)[0], grid, interpret,
            v, o, s, b, ids, out, num_ids, embedding_dim,
            KIND=_KIND.get(values.dtype, 0), BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=_warps(block_m * block_d))
    return out


def _tile_rows(most: int, rows: int, d_blocks: int, device: torch.device) -> int:
    """Ids (or bags) per program: ``most`` (a power of two), halved while the grid would give
    fewer than two programs per SM, so that a small batch still spreads over the GPU."""
    block = max(1, most)
    while block > 1 and _cdiv(rows, block) * d_blocks < 2 * _sm_count(device):
        block //= 2
    return block


def _warps(elements: int) -> int:
    """Warps for a tile of ``elements`` values: one per 256 (8 a thread), 1 to 4."""
    return max(1, min(4, elements // 256))


def packed_embedding_bag_triton(values: Tensor, offsets: Tensor, scale: Tensor | None,
                                bias: Tensor | None, input: Tensor, bag_offsets: Tensor,
                                per_sample_weights: Tensor | None, mode: str,
                                embedding_dim: int, padding_idx: int | None,
                                include_last_offset: bool, *, checked: bool = True,
                                interpret: bool = False) -> Tensor:
    """:func:`~amtl_compress.lookup.reference.packed_embedding_bag_reference` as a Triton kernel.

    Arguments as for the reference (1-D ``input`` (nnz,), ``bag_offsets`` (B,) or (B + 1,)),
    plus ``checked`` and ``interpret`` as in :func:`packed_embedding_triton`; ``offsets`` may be
    int32. Returns (B, D) float32; empty bags (or bags of only ``padding_idx``) are zeros.
    """
    n = _check_table(values, offsets, scale, bias, embedding_dim, INDEX_DTYPES)
    if mode not in BAG_MODES:
        raise ValueError(f"mode must be one of sum, mean, max, got {mode!r}")
    if input.dim() != 1:
        raise ValueError(f"input must be 1-D, got {input.dim()}-D")
    if input.dtype not in INDEX_DTYPES:
        raise TypeError(f"ids must be int32 or int64, got {input.dtype}")
    _device_check(values, interpret, offsets=offsets, scale=scale, bias=bias, input=input,
                  bag_offsets=bag_offsets, per_sample_weights=per_sample_weights)
    k = check_bag_offsets_shape(bag_offsets, include_last_offset)
    check_bag_arguments(input, per_sample_weights, mode, padding_idx, n)
    nnz = input.numel()
    num_bags = k - 1 if include_last_offset else k
    ids = input.contiguous()
    if nnz and n == 0:  # no row to gather the checks from: every id is out of range
        raise ids_error(ids, n)
    # One copy to the host for every data-dependent check.
    parts: list[Tensor] = []
    if nnz:
        parts += list(torch.aminmax(ids))
    if k:
        decreasing = (bag_offsets[1:] < bag_offsets[:-1]).any()
        parts += [bag_offsets[0], decreasing, bag_offsets[-1]]
    if checked and nnz:
        parts += _row_parts(values, offsets, ids, embedding_dim, n)
    got = _scalars(parts)
    if nnz:
        lo, hi, *got = got
        if lo < 0 or hi >= n:
            raise ids_error(ids, n)
    if k:
        first, decreasing, last, *got = got
        problem = bag_offsets_problem(first, bool(decreasing), last, nnz, include_last_offset)
        if problem is not None:
            raise problem
    if checked and nnz and got[0] < nnz:
        raise corrupt_row_error(offsets, int(ids[got[0]]), value_capacity(values),
                                embedding_dim)
    if num_bags == 0:
        return torch.empty(0, embedding_dim, dtype=torch.float32, device=values.device)
    bounds = bag_offsets.to(torch.int64)
    if not include_last_offset:
        bounds = torch.cat([bounds, bounds.new_full((1,), nnz)])
    return launch_embedding_bag(values, offsets, scale, bias, ids, bounds, per_sample_weights,
                                mode, embedding_dim, padding_idx, interpret)


def launch_embedding_bag(values: Tensor, offsets: Tensor, scale: Tensor | None,
                         bias: Tensor | None, ids: Tensor, bounds: Tensor,
                         per_sample_weights: Tensor | None, mode: str, embedding_dim: int,
                         padding_idx: int | None, interpret: bool = False) -> Tensor:
    """The bag kernel alone, no checks: ``ids`` (nnz,) contiguous, all in [0, N); bag ``b`` is
    ``ids[bounds[b]:bounds[b+1]]``, ``bounds`` int64 (B + 1,) non-decreasing within [0, nnz]
    (:func:`packed_embedding_bag_triton` checks; ``bench/lookup.py`` times this part on its
    own). Returns (B, D) float32."""
    num_bags = bounds.numel() - 1
    out = torch.empty(num_bags, embedding_dim, dtype=torch.float32, device=values.device)
    if num_bags == 0:
        return out
    bounds = bounds.contiguous()
    if per_sample_weights is None:
        weighting, weights = _WEIGHTS_NONE, values
    else:
        # torch's CPU arithmetic: fbgemm's fused multiply-add without padding_idx, a multiply
        # then an add with it (docs/lookup.md, "Exactness").
        weighting = _WEIGHTS_FUSED if padding_idx is None else _WEIGHTS_SEPARATE
        weights = per_sample_weights.contiguous()
    v, o, s, b = _table_args(values, offsets, scale, bias)
    if ids.numel() == 0:
        ids = o  # never read: every bag is empty
    block_d = _block_d(embedding_dim)
    d_blocks = _cdiv(embedding_dim, block_d)
    block_b = _tile_rows(min(32, 512 // block_d), num_bags, d_blocks, values.device)
    grid = (_cdiv(num_bags, block_b), d_blocks)
    _launch(_kernels(interpret)[1], grid, interpret,
            v, o, s, b, ids, bounds, weights, out, num_bags, embedding_dim,
            -1 if padding_idx is None else padding_idx,
            KIND=_KIND.get(values.dtype, 0), MODE=_MODE[mode], WEIGHTS=weighting,
            BLOCK_B=block_b, BLOCK_D=block_d, num_warps=_warps(2 * block_b * block_d))
    return out
