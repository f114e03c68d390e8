"""The Triton kernels of the packed lookups, as plain functions (imports triton: load lazily).

:mod:`amtl_compress.lookup.triton_ops` decorates them on first use, with ``triton.jit`` for a GPU
or as Triton interpreter functions for CPU tensors (tests), and launches them; it holds the
argument checks, tile sizes and the layout contract. Nothing else imports this module.

Both kernels read row ``i`` as ``values[offsets[i]:offsets[i+1]]`` with one masked load per
(id, block of D): lanes past the row's length are not read and are ``+0.0``, exactly the zero
tail of the dense table. ``KIND`` selects the values encoding at compile time: 0 float (float32,
float16, bfloat16: converted exactly to float32), 1 int8 (``q * scale + bias``), 2 int4 (a
uint8 nibble stream, low nibble first; ``u * scale + bias``). They are launched with
``enable_fp_fusion=False``, so ``x * s + b`` and ``acc + x * w`` round twice, as on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Compile-time selectors, shared with triton_ops.
KIND_FLOAT = 0
KIND_INT8 = 1
KIND_INT4 = 2
MODE_SUM = 0
MODE_MEAN = 1
MODE_MAX = 2
WEIGHTS_NONE = 0
WEIGHTS_FUSED = 1  # acc = fma(w, x, acc): torch's CPU path without padding_idx (fbgemm)
WEIGHTS_SEPARATE = 2  # acc = acc + x * w: torch's CPU path with padding_idx


def embedding_kernel(values, offsets, scale, bias, ids, out, num_ids, dim,
                     KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[m, :] = row ids[m] re-padded to D, for a (BLOCK_M ids) x (BLOCK_D columns) tile.

    Grid: (cdiv(num_ids, BLOCK_M), cdiv(dim, BLOCK_D)). ids are in [0, N) (checked before the
    launch); offsets int32 or int64 (N + 1,); out float32 (num_ids, dim), contiguous.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = m < num_ids
    row = tl.load(ids + m, mask=m_ok, other=0).to(tl.int64)
    start = tl.load(offsets + row, mask=m_ok, other=0).to(tl.int64)
    end = tl.load(offsets + row + 1, mask=m_ok, other=0).to(tl.int64)
    keep = (cols[None, :] < (end - start)[:, None]) & m_ok[:, None]
    pos = start[:, None] + cols[None, :]
    if KIND == 2:
        byte = tl.load(values + (pos >> 1), mask=keep, other=0).to(tl.int32)
        x = ((byte >> ((pos & 1) * 4).to(tl.int32)) & 15).to(tl.float32)
    else:
        x = tl.load(values + pos, mask=keep, other=0).to(tl.float32)
    if KIND != 0:
        s = tl.load(scale + row, mask=m_ok, other=0.0)
        b = tl.load(bias + row, mask=m_ok, other=0.0)
        x = tl.where(keep, x * s[:, None] + b[:, None], 0.0)  # the tail stays +0.0, not bias
    tl.store(out + m[:, None] * dim + cols[None, :], x, mask=m_ok[:, None] & (cols < dim)[None, :])


def embedding_bag_kernel(values, offsets, scale, bias, ids, bounds, weights, out, num_bags, dim,
                         padding_idx, KIND: tl.constexpr, MODE: tl.constexpr,
                         WEIGHTS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, :] = the pooled bag b, for a (BLOCK_B bags) x (BLOCK_D columns) tile.

    Grid: (cdiv(num_bags, BLOCK_B), cdiv(dim, BLOCK_D)). Bag b is ids[bounds[b]:bounds[b+1]]
    (bounds int64 (num_bags + 1,), non-decreasing). Each bag is accumulated in float32 in its
    ids' order, one id per step (the bags of a tile step together, masked past their end):
    sum from +0.0; mean = sum / max(count, 1) (IEEE division); max copies the first counted row
    and then takes ``x > acc ? x : acc`` over every lane, the zero tail included. Ids equal to
    ``padding_idx`` (-1: none) are skipped and not counted. An empty bag stays +0.0.
    """
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    bag = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    bag_ok = bag < num_bags
    lo = tl.load(bounds + bag, mask=bag_ok, other=0)
    hi = tl.load(bounds + bag + 1, mask=bag_ok, other=0)
    acc = tl.full([BLOCK_B, BLOCK_D], 0.0, tl.float32)
    count = tl.full([BLOCK_B], 0, tl.int32)
    # The tile's longest bag, from scalar loads: a reduction (tl.max) is a jitted library
    # function, which the interpreter functions of jit() below could not call.
    steps = tl.full([], 0, tl.int64)
    for i in tl.static_range(BLOCK_B):
        one = pid_b.to(tl.int64) * BLOCK_B + i
        size = (tl.load(bounds + one + 1, mask=one < num_bags, other=0)
                - tl.load(bounds + one, mask=one < num_bags, other=0))
        steps = tl.maximum(steps, size)
    # A while loop, not range(steps): older interpreters load a scalar as a 1-element array,
    # which range() refuses and a comparison takes.
    k = 0
    while k < steps:
        j = lo + k
        live = j < hi
        row = tl.load(ids + j, mask=live, other=0).to(tl.int64)
        live = live & (row != padding_idx)
        start = tl.load(offsets + row, mask=live, other=0).to(tl.int64)
        end = tl.load(offsets + row + 1, mask=live, other=0).to(tl.int64)
        keep = (cols[None, :] < (end - start)[:, None]) & live[:, None]
        pos = start[:, None] + cols[None, :]
        if KIND == 2:
            byte = tl.load(values + (pos >> 1), mask=keep, other=0).to(tl.int32)
            x = ((byte >> ((pos & 1) * 4).to(tl.int32)) & 15).to(tl.float32)
        else:
            x = tl.load(values + pos, mask=keep, other=0).to(tl.float32)
        if KIND != 0:
            s = tl.load(scale + row, mask=live, other=0.0)
            b = tl.load(bias + row, mask=live, other=0.0)
            x = tl.where(keep, x * s[:, None] + b[:, None], 0.0)
        if MODE == 2:
            new = tl.where((count == 0)[:, None] | (x > acc), x, acc)
        elif WEIGHTS == 1:
            w = tl.load(weights + j, mask=live, other=0.0)
            new = tl.fma(tl.broadcast_to(w[:, None], x.shape), x, acc)
        elif WEIGHTS == 2:
            w = tl.load(weights + j, mask=live, other=0.0)
            new = acc + x * w[:, None]
        else:
            new = acc + x
        acc = tl.where(live[:, None], new, acc)
        count += live.to(tl.int32)
        k += 1
    if MODE == 1:
        # Shapes spelled out: the interpreter broadcasts, the compiled div_rn would not.
        n = tl.broadcast_to(tl.maximum(count, 1).to(tl.float32)[:, None], acc.shape)
        acc = tl.math.div_rn(acc, n)
    tl.store(out + bag[:, None] * dim + cols[None, :], acc,
             mask=bag_ok[:, None] & (cols < dim)[None, :])


def jit(interpret: bool) -> tuple[object, object]:
    """(embedding, embedding_bag) kernels: ``triton.jit`` ones, or Triton interpreter functions
    that run on CPU tensors (without setting ``TRITON_INTERPRET``, which is read when a kernel is
    decorated and would switch every later kernel of the process). So the kernels call only
    Triton builtins, none of its jitted library functions (``tl.max``, ``tl.zeros``, ...):
    those are decorated once, when Triton is imported."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(embedding_kernel), InterpretedFunction(embedding_bag_kernel)
    return triton.jit(embedding_kernel), triton.jit(embedding_bag_kernel)
