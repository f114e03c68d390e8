"""The Triton kernels == torch on the dense zero-tailed table == the reference, bitwise.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``interpret=True``: the
kernel functions are wrapped as interpreter functions directly, so ``TRITON_INTERPRET`` is never
set and nothing leaks into other tests). The interpreter is slow, so the grids are small. The
compiled path is checked without a GPU too: every kernel variant is compiled for sm_90 (PTX and
cubin, Triton's bundled ptxas) and its PTX inspected for the arithmetic the bitwise match needs.
Tests of real CUDA dispatch are skipped where no CUDA device is available.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lookup_helpers import assert_bitwise, dense_of, int4_pack, packed, random_table
from torch import nn

pytest.importorskip("triton", reason="triton is not installed: `scripts/setup-venv test` "
                    "installs it (the `triton` extra), CUDA builds of torch ship it")

from amtl_compress.lookup import PackedEmbedding, PackedEmbeddingBag, ops, triton_ops  # noqa: E402
from amtl_compress.lookup.reference import (  # noqa: E402
    packed_embedding_bag_reference,
    packed_embedding_reference,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device: the GPU dispatch tests need one")
REPO = Path(__file__).resolve().parents[1]


def _fma_probe(x, y, z, out):
    import triton.language as tl

    tl.store(out, tl.fma(tl.load(x), tl.load(y), tl.load(z)))


def _interpreter_fma_is_fused() -> bool:
    """Whether this Triton's interpreter rounds ``tl.fma`` once, as the GPU does (older ones
    compute a multiply and an add)."""
    from triton.runtime.interpreter import InterpretedFunction

    out = torch.zeros(1)
    InterpretedFunction(_fma_probe)[(1,)](torch.tensor([1.0 + 2**-23]),
                                          torch.tensor([1.0 - 2**-24]), torch.tensor([-1.0]), out)
    return out.item() != 0.0


FUSED_FMA = pytest.mark.skipif(
    not _interpreter_fma_is_fused(),
    reason="this Triton's interpreter rounds tl.fma twice (the GPU fuses it; the compiled "
           "kernel's fma.rn.f32 is checked by the PTX test): install the pinned triton")


def emb_triton(*args, _fn=triton_ops.packed_embedding_triton, **kwargs):
    return _fn(*args, interpret=True, **kwargs)


def bag_triton(*args, _fn=triton_ops.packed_embedding_bag_triton, **kwargs):
    return _fn(*args, interpret=True, **kwargs)


def _table(n: int, d: int, dtype: torch.dtype, seed: int):
    # Lengths 0..D (empty rows included); float32 gets -0.0, +-inf and NaN among the kept values.
    weight, lengths = random_table(n, d, seed, specials=dtype == torch.float32, min_length=0)
    lengths[0], lengths[1], lengths[2] = d, 1, 0
    values, offsets, scale, bias = packed(weight, lengths, dtype, seed=seed)
    return values, offsets, scale, bias, dense_of(values, offsets, d, scale, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_matches_dense_and_reference(dtype: torch.dtype) -> None:
    for d, shape in ((1, (7,)), (7, (3, 5)), (16, (40,)), (33, (2, 3, 4))):
        values, offsets, scale, bias, dense = _table(30, d, dtype, seed=d)
        g = torch.Generator().manual_seed(d)
        ids = torch.randint(0, 30, shape, generator=g)
        ids.view(-1)[:3] = torch.tensor([0, 1, 2])  # the rows of length D, 1 and 0
        if dtype == torch.uint8:  # some looked-up row starts on a high nibble
            assert bool((offsets[ids.reshape(-1)] % 2 == 1).any())
        for index_dtype in (torch.int64, torch.int32):
            ids = ids.to(index_dtype)
            out = emb_triton(values, offsets, scale, bias, ids, d)
            assert out.shape == (*shape, d)
            assert_bitwise(out, F.embedding(ids, dense))
            assert_bitwise(out, packed_embedding_reference(values, offsets, scale, bias, ids, d))


def _bags(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (nnz,), bag offsets (B,)): bags of 0..12 ids, the first two empty, one of size 1."""
    g = torch.Generator().manual_seed(seed)
    sizes = [0, 0, 1, *torch.randint(0, 13, (9,), generator=g).tolist()]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    return torch.randint(0, n, (int(starts[-1]),), generator=g), starts[:-1]


BAG_CASES = [  # (mode, per-sample weights, padding_idx)
    ("sum", False, None), ("mean", False, None), ("max", False, None),
    ("sum", True, None),  # fused multiply-add, as torch's fbgemm path
    ("sum", True, 3),  # multiply, then add, as torch's path with padding_idx
    ("mean", False, 3), ("max", False, 3),
]


@pytest.mark.parametrize("mode, weighted, padding_idx", [
    pytest.param(*case, marks=FUSED_FMA) if case == ("sum", True, None) else case
    for case in BAG_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bag_matches_dense_and_reference(dtype: torch.dtype, mode: str, weighted: bool,
                                         padding_idx: int | None) -> None:
    for d in (5, 33):
        values, offsets, scale, bias, dense = _table(20, d, dtype, seed=d)
        ids, bag_offsets = _bags(20, seed=d)
        ids[::4] = 3  # padding ids, also a whole bag of them when padding_idx is 3
        g = torch.Generator().manual_seed(d + 1)
        weights = None
        if weighted:
            weights = torch.randn(ids.numel(), generator=g)
            weights[::5] = -0.0
        for include_last in (False, True):
            bo = torch.cat([bag_offsets, torch.tensor([ids.numel()])]) if include_last \
                else bag_offsets
            args = (ids, bo, weights, mode, d, padding_idx, include_last)
            out = bag_triton(values, offsets, scale, bias, *args)
            expected = F.embedding_bag(ids, dense, bo, mode=mode, per_sample_weights=weights,
                                       padding_idx=padding_idx, include_last_offset=include_last)
            assert_bitwise(out, expected)
            assert_bitwise(out, packed_embedding_bag_reference(values, offsets, scale, bias,
                                                               *args))


@pytest.mark.parametrize("sms", [1, 3, 10**6], ids=["large tiles", "mid", "one bag a tile"])
def test_tile_sizes_give_the_same_bits(sms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiles shrink with the SM count (two programs per SM at least): a tile of several
    # ragged bags steps them together, masked past each one's end; one bag a tile does not.
    monkeypatch.setattr(triton_ops, "_sm_count", lambda device: sms)
    values, offsets, scale, bias, dense = _table(20, 5, torch.uint8, seed=11)
    ids, bag_offsets = _bags(20, seed=11)
    for mode in ("sum", "max"):
        out = bag_triton(values, offsets, scale, bias, ids, bag_offsets, None, mode, 5, None,
                         False)
        assert_bitwise(out, F.embedding_bag(ids, dense, bag_offsets, mode=mode))
    rows = torch.randint(0, 20, (37,), generator=torch.Generator().manual_seed(11))
    assert_bitwise(emb_triton(values, offsets, scale, bias, rows, 5), F.embedding(rows, dense))


@FUSED_FMA
def test_weighted_sum_mirrors_both_torch_roundings() -> None:
    # -1 * 1 + (1 + 2^-23) * (1 - 2^-24): a fused multiply-add keeps the residue 2^-24 - 2^-47,
    # a separate multiply rounds the product to 1.0 first and the sum is 0. torch fuses without
    # padding_idx and not with it; the kernel must follow both.
    values = torch.tensor([-1.0, 1.0 + 2**-23, 0.0])
    offsets = torch.tensor([0, 1, 2, 3])
    ids, bag_offsets = torch.tensor([0, 1]), torch.tensor([0])
    w = torch.tensor([1.0, 1.0 - 2**-24])
    got = {pad: bag_triton(values, offsets, None, None, ids, bag_offsets, w, "sum", 1, pad,
                           False).item() for pad in (None, 2)}
    assert got == {None: 2**-24 - 2**-47, 2: 0.0}


def test_int4_rows_on_either_nibble_and_an_odd_stream() -> None:
    # Codes 1..7 (S = 7, odd): row 1 is nibbles 2..5, row 2 starts on the high nibble of byte 2.
    stream = int4_pack(torch.arange(1, 8))
    offsets = torch.tensor([0, 2, 5, 7])
    scale, bias = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 1.0, -1.0])
    out = emb_triton(stream, offsets, scale, bias, torch.tensor([2, 1, 0]), 4)
    assert out.tolist() == [[11.0, 13.0, 0.0, 0.0], [2.5, 3.0, 3.5, 0.0], [1.0, 2.0, 0.0, 0.0]]


def test_empty_inputs_and_an_empty_table() -> None:
    values, offsets = torch.ones(6), torch.tensor([0, 2, 6])
    assert emb_triton(values, offsets, None, None, torch.zeros(0, 3, dtype=torch.int64),
                      4).shape == (0, 3, 4)
    for mode in ("sum", "mean", "max"):
        out = bag_triton(values, offsets, None, None, torch.zeros(0, dtype=torch.int64),
                         torch.tensor([0, 0]), None, mode, 4, None, False)
        assert torch.equal(out, torch.zeros(2, 4))
        assert bag_triton(values, offsets, None, None, torch.tensor([1]),
                          torch.zeros(0, dtype=torch.int64), None, mode, 4, None,
                          False).shape == (0, 4)
    # S = 0: every row is empty, so every lookup is zeros (weights times the zero tail too).
    empty, zeros = torch.zeros(0), torch.zeros(4, dtype=torch.int64)
    ids = torch.tensor([0, 2, 1])
    assert torch.equal(emb_triton(empty, zeros, None, None, ids, 3), torch.zeros(3, 3))
    w = torch.tensor([2.0, -1.0, float("inf")])
    out = bag_triton(empty, zeros, None, None, ids, torch.tensor([0, 2]), w, "sum", 3, None,
                     False)
    assert_bitwise(out, F.embedding_bag(ids, torch.zeros(3, 3), torch.tensor([0, 2]),
                                        mode="sum", per_sample_weights=w))


def test_out_of_range_ids_raise_index_error() -> None:
    values, offsets = torch.ones(6), torch.tensor([0, 2, 6])
    for bad in (torch.tensor([0, 2]), torch.tensor([-1]), torch.tensor([1, 2**40])):
        with pytest.raises(IndexError, match=r"outside \[0, 2\)"):
            emb_triton(values, offsets, None, None, bad, 4)
        with pytest.raises(IndexError, match=r"outside \[0, 2\)"):
            bag_triton(values, offsets, None, None, bad, torch.tensor([0]), None, "sum", 4,
                       None, False)
    no_rows = torch.zeros(1, dtype=torch.int64)  # N = 0: any id is out of range
    with pytest.raises(IndexError, match=r"outside \[0, 0\)"):
        emb_triton(values[:0], no_rows, None, None, torch.tensor([0]), 4)
    with pytest.raises(IndexError, match=r"outside \[0, 0\)"):
        bag_triton(values[:0], no_rows, None, None, torch.tensor([0]), torch.tensor([0]), None,
                   "sum", 4, None, False)
    with pytest.raises(IndexError, match=r"id 5 is outside"):  # the first bad one
        emb_triton(values, offsets, None, None, torch.tensor([0, 5, -3, 9]), 4)
    q, scale = torch.ones(6, dtype=torch.int8), torch.ones(2)
    with pytest.raises(IndexError):  # never indexes scale with it either
        emb_triton(q, offsets, scale, scale, torch.tensor([2**40]), 4)


@pytest.mark.parametrize("corrupt", [[0, 2, 10**12], [0, 2, 7], [0, -4, 6], [0, 5, 3],
                                     [0, 1, 6], [-(2**62), 2, 6]])
def test_corrupt_offsets_raise_on_the_checked_path(corrupt: list) -> None:
    values, offsets = torch.ones(6), torch.tensor(corrupt)
    ids = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        emb_triton(values, offsets, None, None, ids, 4)
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        bag_triton(values, offsets, None, None, ids, torch.tensor([0, 2]), None, "max", 4, None,
                   False)


@pytest.mark.parametrize("bag_offsets, include_last, match", [
    ([1, 2], False, "offsets\\[0\\] must be 0"),
    ([0, 3, 2], False, "non-decreasing"),
    ([0, 5], False, "must be <= len\\(input\\) = 4"),
    ([0, 2, 3], True, "must equal len\\(input\\) = 4"),
    ([], True, "at least 1 element"),
])
def test_bad_bag_offsets_raise_value_error(bag_offsets: list, include_last: bool,
                                           match: str) -> None:
    values, offsets = torch.ones(6), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match=match):
        bag_triton(values, offsets, None, None, torch.tensor([0, 1, 1, 0]),
                   torch.tensor(bag_offsets, dtype=torch.int64), None, "sum", 4, None,
                   include_last)


def test_argument_errors() -> None:
    values, offsets = torch.ones(6), torch.tensor([0, 2, 6])
    ids, bag_offsets = torch.tensor([0, 1]), torch.tensor([0])
    with pytest.raises(NotImplementedError, match="only supported for mode='sum'"):
        bag_triton(values, offsets, None, None, ids, bag_offsets, torch.ones(2), "mean", 4, None,
                   False)
    with pytest.raises(ValueError, match="mode must be one of"):
        bag_triton(values, offsets, None, None, ids, bag_offsets, None, "min", 4, None, False)
    with pytest.raises(ValueError, match="padding_idx must be in"):
        bag_triton(values, offsets, None, None, ids, bag_offsets, None, "sum", 4, 2, False)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        emb_triton(values, offsets, None, None, ids.float(), 4)
    with pytest.raises(ValueError, match="must be a cuda tensor"):
        triton_ops.packed_embedding_triton(values, offsets, None, None, ids, 4)


@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Route the modules' CPU lookups through the interpreted Triton kernels (as on CUDA)."""
    calls: list[str] = []
    monkeypatch.setenv(ops.KERNEL_ENV, "reference")  # the CPU path leaves the compiled kernel
    monkeypatch.setattr(ops, "_warned_reference", True)
    monkeypatch.setattr(triton_ops, "use_triton", lambda values: True)
    for name, fn in (("packed_embedding_triton", emb_triton),
                     ("packed_embedding_bag_triton", bag_triton)):
        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls.append(f"{_name} checked={kwargs['checked']} offsets={args[1].dtype}")
            return _fn(*args, **kwargs)
        monkeypatch.setattr(triton_ops, name, spy)
    return calls


def test_modules_dispatch_with_their_validated_offsets_copy(triton_on_cpu: list[str]) -> None:
    weight, lengths = random_table(30, 12, seed=4, min_length=0)
    values, offsets, _, _ = packed(weight, lengths)
    dense = dense_of(values, offsets, 12)
    emb = PackedEmbedding(values, offsets, 12, name="t")
    ids = torch.tensor([[0, 29, 5], [5, 5, 1]], dtype=torch.int32)
    assert_bitwise(emb(ids), nn.Embedding.from_pretrained(dense)(ids))
    bag = PackedEmbeddingBag(values, offsets, 12, mode="max", padding_idx=-1,
                             include_last_offset=True)
    flat, bo = torch.tensor([0, 29, 29, 3, 7]), torch.tensor([0, 2, 2, 5])
    expected = nn.EmbeddingBag.from_pretrained(dense, mode="max", padding_idx=29,
                                               include_last_offset=True)
    assert_bitwise(bag(flat, bo), expected(flat, bo))
    two_d = torch.tensor([[1, 2, 3], [4, 4, 0]])
    assert_bitwise(bag(two_d), nn.EmbeddingBag.from_pretrained(
        dense, mode="max", padding_idx=29)(two_d))
    assert triton_on_cpu == ["packed_embedding_triton checked=False offsets=torch.int32",
                             *["packed_embedding_bag_triton checked=False offsets=torch.int32"] * 2]
    with pytest.raises(IndexError, match=r"table `t`: id 30 is outside \[0, 30\)"):
        emb(torch.tensor([30]))


def test_use_triton_needs_cuda_and_falls_back_with_one_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    on_cuda, on_cpu = types.SimpleNamespace(is_cuda=True), types.SimpleNamespace(is_cuda=False)
    monkeypatch.delenv(ops.KERNEL_ENV, raising=False)
    assert triton_ops.use_triton(on_cuda) and not triton_ops.use_triton(on_cpu)
    monkeypatch.setenv(ops.KERNEL_ENV, "reference")
    assert not triton_ops.use_triton(on_cuda)
    monkeypatch.delenv(ops.KERNEL_ENV)
    monkeypatch.setattr(triton_ops, "_import_error", lambda: "ImportError: no triton")
    monkeypatch.setattr(triton_ops, "_warned_missing", False)
    with pytest.warns(RuntimeWarning, match="Triton cannot be imported .*reference"):
        assert not triton_ops.use_triton(on_cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not triton_ops.use_triton(on_cuda)  # once per process


def test_lookups_on_cpu_never_import_triton() -> None:
    code = ("import json, sys, torch\n"
            "from amtl_compress.lookup import PackedEmbeddingBag, pack_rows\n"
            "import amtl_compress.lookup.triton_ops\n"
            "v, o = pack_rows(torch.ones(3, 4), torch.tensor([1, 4, 2]))\n"
            "PackedEmbeddingBag(v, o, 4)(torch.tensor([0, 2]), torch.tensor([0]))\n"
            "print(json.dumps('triton' in sys.modules))\n")
    env_kernel = {"AMTL_COMPRESS_KERNEL": "reference"}  # no kernel build in a fresh process
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env_kernel})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False


# ---- the compiled kernels, without a GPU: compile for sm_90 and read the PTX ----

_BAG_SIGNATURE = {"values": None, "offsets": "*i32", "scale": "*fp32", "bias": "*fp32",
                  "ids": "*i64", "bounds": "*i64", "weights": "*fp32", "out": "*fp32",
                  "num_bags": "i32", "dim": "i32", "padding_idx": "i32", "KIND": "constexpr",
                  "MODE": "constexpr", "WEIGHTS": "constexpr", "BLOCK_B": "constexpr",
                  "BLOCK_D": "constexpr"}
_EMB_SIGNATURE = {"values": None, "offsets": "*i64", "scale": "*fp32", "bias": "*fp32",
                  "ids": "*i32", "out": "*fp32", "num_ids": "i32", "dim": "i32",
                  "KIND": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}


def _ptx(kernel, signature: dict, values: str, constexprs: dict, num_warps: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=triton.jit(kernel), signature={**signature, "values": values},
                       constexprs=constexprs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "enable_fp_fusion": False})
    except (ImportError, RuntimeError, FileNotFoundError) as exc:  # no CUDA backend / ptxas
        pytest.skip(f"Triton cannot compile for CUDA here ({type(exc).__name__}: {exc})")
    return compiled.asm["ptx"]


@pytest.mark.parametrize("kind, values", [(0, "*fp32"), (0, "*bf16"), (1, "*i8"), (2, "*u8")])
def test_compiled_kernels_use_the_roundings_torch_uses(kind: int, values: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from amtl_compress.lookup import _triton_kernels as k

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile here, not from ~/.triton

    def count(ptx: str) -> dict[str, int]:
        ops_ = ("div.rn.f32", "fma.rn.f32", "mul.rn.f32", "add.rn.f32", "div.full.f32",
                "div.approx.f32", "max.f32", "min.f32")
        return {op: ptx.count(op) for op in ops_}

    dequant = kind != 0
    for mode, weights in ((k.MODE_SUM, k.WEIGHTS_NONE), (k.MODE_MEAN, k.WEIGHTS_NONE),
                          (k.MODE_MAX, k.WEIGHTS_NONE), (k.MODE_SUM, k.WEIGHTS_FUSED),
                          (k.MODE_SUM, k.WEIGHTS_SEPARATE)):
        got = count(_ptx(k.embedding_bag_kernel, _BAG_SIGNATURE, values,
                         {"KIND": kind, "MODE": mode, "WEIGHTS": weights, "BLOCK_B": 2,
                          "BLOCK_D": 32}, num_warps=1))
        # No approximate division, no max instruction (its NaN rule is not torch's), and a fused
        # multiply-add only where torch fuses: every other product and sum rounds on its own.
        assert got["div.full.f32"] == got["div.approx.f32"] == got["max.f32"] == 0, got
        assert (got["div.rn.f32"] > 0) == (mode == k.MODE_MEAN), got
        assert (got["fma.rn.f32"] > 0) == (weights == k.WEIGHTS_FUSED), got
        assert (got["mul.rn.f32"] > 0) == (dequant or weights == k.WEIGHTS_SEPARATE), got
    got = count(_ptx(k.embedding_kernel, _EMB_SIGNATURE, values,
                     {"KIND": kind, "BLOCK_M": 4, "BLOCK_D": 64}, num_warps=2))
    assert got["fma.rn.f32"] == 0 and (got["mul.rn.f32"] > 0) == dequant, got


# ---- on a GPU ----

@CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_modules_use_triton_and_match_cpu_torch(dtype: torch.dtype,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = triton_ops.packed_embedding_bag_triton
    monkeypatch.setattr(triton_ops, "packed_embedding_bag_triton",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv(ops.KERNEL_ENV, raising=False)
    values, offsets, scale, bias, dense = _table(300, 70, dtype, seed=7)
    ids, bag_offsets = _bags(300, seed=7)
    emb = PackedEmbedding(values, offsets, 70, scale=scale, bias=bias).cuda()
    assert_bitwise(emb(ids.cuda()).cpu(), F.embedding(ids, dense))
    for mode, weighted, padding_idx in BAG_CASES:
        bag = PackedEmbeddingBag(values, offsets, 70, scale=scale, bias=bias, mode=mode,
                                 padding_idx=padding_idx).cuda()
        w = torch.randn(ids.numel()) if weighted else None
        got = bag(ids.cuda(), bag_offsets.cuda(), None if w is None else w.cuda()).cpu()
        assert_bitwise(got, F.embedding_bag(ids, dense, bag_offsets, mode=mode,
                                            per_sample_weights=w, padding_idx=padding_idx))
    assert len(calls) == len(BAG_CASES)
    with pytest.raises(IndexError, match="outside"):
        emb(torch.tensor([300], device="cuda"))


@CUDA
def test_cuda_reference_switch_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    values, offsets, _, _, _ = _table(100, 33, torch.float32, seed=3)
    ids, bag_offsets = _bags(100, seed=3)
    bag = PackedEmbeddingBag(values, offsets, 33, mode="mean").cuda()
    fast = bag(ids.cuda(), bag_offsets.cuda())
    monkeypatch.setenv(ops.KERNEL_ENV, "reference")
    monkeypatch.setattr(ops, "_warned_reference", True)
    assert_bitwise(fast.cpu(), bag(ids.cuda(), bag_offsets.cuda()).cpu())
