"""PackedEmbedding / PackedEmbeddingBag: drop-in behaviour, errors, buffers, state_dict, mmap."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lookup_helpers import assert_bitwise, dense_of, packed, random_table
from safetensors.torch import load_file, save_file
from torch import nn

from amtl_compress.errors import PackedFormatError
from amtl_compress.lookup import PackedEmbedding, PackedEmbeddingBag, ops, pack_rows


def _modules(n: int = 30, d: int = 12, seed: int = 0, **bag_kwargs):
    weight, lengths = random_table(n, d, seed)
    values, offsets, _, _ = packed(weight, lengths)
    dense = dense_of(values, offsets, d)
    return (PackedEmbedding(values, offsets, d, name="embeddings.user_id"),
            PackedEmbeddingBag(values, offsets, d, name="embeddings.items", **bag_kwargs), dense)


@pytest.fixture(params=["compiled", "reference"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ops.KERNEL_ENV, request.param)
    monkeypatch.setattr(ops, "_warned_reference", True)  # the warning has its own test
    return request.param


@settings(max_examples=25, deadline=None)
@given(bag_len=st.integers(0, 6), bags=st.integers(0, 7), seed=st.integers(0, 1000),
       mode=st.sampled_from(["sum", "mean", "max"]), padding_idx=st.sampled_from([None, 3, -1]))
def test_2d_input_pools_fixed_length_bags_like_torch(bag_len: int, bags: int, seed: int,
                                                     mode: str, padding_idx: int | None) -> None:
    _, bag, dense = _modules(mode=mode, padding_idx=padding_idx)
    ids = torch.randint(0, 30, (bags, bag_len), generator=torch.Generator().manual_seed(seed))
    expected = nn.EmbeddingBag.from_pretrained(dense, mode=mode, padding_idx=padding_idx)
    if bag_len == 0:  # torch cannot build offsets for 0-length bags; ours gives zero rows
        assert torch.equal(bag(ids), torch.zeros(bags, 12))
    else:
        assert_bitwise(bag(ids), expected(ids))


def test_embedding_is_a_drop_in_for_nn_embedding(kernel: str) -> None:
    emb, _, dense = _modules()
    ids = torch.tensor([[0, 29, 5], [5, 5, 1]], dtype=torch.int32)
    assert_bitwise(emb(ids), nn.Embedding.from_pretrained(dense)(ids))
    assert emb.num_embeddings == 30 and emb.embedding_dim == 12
    assert torch.equal(emb.lengths, emb.offsets[1:] - emb.offsets[:-1])
    assert list(emb.parameters()) == []
    assert {name for name, _ in emb.named_buffers()} == {"values", "offsets"}


def test_bag_forward_matches_nn_embedding_bag(kernel: str) -> None:
    _, bag, dense = _modules(mode="sum", include_last_offset=True)
    ids, offsets = torch.tensor([1, 2, 2, 7, 0]), torch.tensor([0, 2, 2, 5])
    w = torch.rand(5)
    ref = nn.EmbeddingBag.from_pretrained(dense, mode="sum", include_last_offset=True)
    assert_bitwise(bag(ids, offsets), ref(ids, offsets))
    assert_bitwise(bag(ids, offsets, per_sample_weights=w), ref(ids, offsets, w))
    assert torch.equal(bag(ids, offsets)[1], torch.zeros(12))  # the empty bag


def test_negative_padding_idx_counts_from_the_end(kernel: str) -> None:
    _, bag, dense = _modules(mode="mean", padding_idx=-1)
    assert bag.padding_idx == 29
    ids, offsets = torch.tensor([29, 3, 29, 29]), torch.tensor([0, 2])
    ref = nn.EmbeddingBag.from_pretrained(dense, mode="mean", padding_idx=-1)
    assert_bitwise(bag(ids, offsets), ref(ids, offsets))
    assert torch.equal(bag(ids, offsets)[1], torch.zeros(12))  # a bag of only padding


def test_out_of_range_ids_name_the_table(kernel: str) -> None:
    # The message is the contract (what is wrong; the fix), so it is pinned whole.
    emb, bag, _ = _modules()
    with pytest.raises(IndexError) as info:
        emb(torch.tensor([3, 30, 31]))
    assert str(info.value) == ("table `embeddings.user_id`: id 30 is outside [0, 30) (2 such ids); "
                               "ids must be row numbers of this table")
    with pytest.raises(IndexError) as info:
        bag(torch.tensor([-2, 4]), torch.tensor([0]))
    assert str(info.value) == ("table `embeddings.items`: id -2 is outside [0, 30) (1 such ids); "
                               "ids must be row numbers of this table")


def test_forward_errors_match_torch_wording(kernel: str) -> None:
    _, bag, _ = _modules(mode="mean")
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(NotImplementedError, match="only supported for mode='sum'"):
        bag(ids, torch.tensor([0]), per_sample_weights=torch.ones(3))
    with pytest.raises(ValueError, match="offsets has to be a 1D Tensor but got None"):
        bag(ids)
    with pytest.raises(ValueError, match="if input is 2D, then offsets has to be None"):
        bag(ids.view(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="must have the same shape as the input"):
        bag(ids, torch.tensor([0]), per_sample_weights=torch.ones(2))
    with pytest.raises(ValueError, match="input has to be 1D or 2D"):
        bag(ids.view(1, 1, 3))


#: The fix every offsets error in the test below ends with (D = 12, 24 values).
OFFSETS_RULE = ("; `offsets` must start at 0, rise by 0 to embedding_dim = 12 per row and end "
                "at len(values) = 24")


@pytest.mark.parametrize("o, message", [
    (torch.tensor([0, 10, 12]), "offsets[N] = 12 but `values` holds 24 entries"),
    (torch.tensor([24, 12, 10, 0]), "offsets[0] is 24, must be 0"),
    (torch.tensor([0, 12, 11, 24]), "offsets decrease at row 1 (12 -> 11)"),
    (torch.tensor([0, 13, 14, 24]), "row 0 has length 13, outside [0, embedding_dim=12]"),
    (torch.tensor([0, 10, 20, 25]), "offsets[N] = 25 points past the end of `values` (24 entries)"),
])
def test_offsets_errors_name_the_problem_and_the_rule(o: torch.Tensor, message: str) -> None:
    values = torch.arange(24.0)
    with pytest.raises(PackedFormatError) as info:
        PackedEmbedding(values, o, 12, name="t")
    assert str(info.value) == f"table `t`: {message}{OFFSETS_RULE}"


def test_empty_rows_are_valid_lookups() -> None:
    # The lookup rule allows rows of length 0 (looked up as zeros); only packed files require 1.
    emb = PackedEmbedding(torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 2]), 3)
    assert emb(torch.tensor([0, 1])).tolist() == [[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]]


@pytest.mark.parametrize("change, match", [
    (lambda v, o, s, b: (v, o[:-1], s, b), "offsets\\[N\\] = 12 but `values` holds 24"),
    (lambda v, o, s, b: (v, o.flip(0), s, b), "offsets\\[0\\] is 24, must be 0"),
    (lambda v, o, s, b: (v, torch.tensor([0, 12, 11, 24]), s, b), "decrease at row 1"),
    (lambda v, o, s, b: (v, torch.tensor([0, 13, 14, 24]), s, b), "row 0 has length 13"),
    (lambda v, o, s, b: (v, o.int(), s, b), "`offsets` must be a non-empty 1-D int64"),
    (lambda v, o, s, b: (v.double(), o, s, b), "`values` must be a 1-D"),
    (lambda v, o, s, b: (v.to(torch.int8), o, s, b), "int8 / int4 \\(uint8\\) `values` need"),
    (lambda v, o, s, b: (v[:12].to(torch.uint8), o, s, b), "\\(uint8\\) `values` need `scale`"),
    (lambda v, o, s, b: (v[:13].to(torch.uint8), o, torch.ones(3), torch.ones(3)),
     "int4 \\(uint8\\) `values` must hold ceil\\(S / 2\\) bytes for S = offsets\\[N\\] = 24 "
     "values, got 13 bytes"),
    (lambda v, o, s, b: (v[:13].to(torch.uint8), torch.tensor([0, 10, 12, 25]), torch.ones(3),
                         torch.ones(3)), "row 2 has length 13"),
    (lambda v, o, s, b: (v, o, torch.ones(3), torch.ones(3)), "only used with int8 / int4"),
])
def test_invalid_tables_raise_packed_format_error(change, match: str) -> None:
    values, offsets = torch.arange(24.0), torch.tensor([0, 10, 12, 24])
    v, o, s, b = change(values, offsets, None, None)
    with pytest.raises(PackedFormatError, match=f"table `t`: .*{match}"):
        PackedEmbedding(v, o, 12, scale=s, bias=b, name="t")


def test_state_dict_round_trip_takes_incoming_sizes(tmp_path) -> None:
    src_emb, src_bag, dense = _modules(n=30, d=12, seed=1, mode="max")
    dst_emb, dst_bag, _ = _modules(n=7, d=12, seed=2, mode="max")
    save_file(src_bag.state_dict(), tmp_path / "bag.safetensors")
    dst_bag.load_state_dict(load_file(tmp_path / "bag.safetensors"))
    dst_emb.load_state_dict(src_emb.state_dict())
    ids, offsets = torch.tensor([29, 0, 3, 3]), torch.tensor([0, 1])
    assert dst_bag.num_embeddings == 30
    assert_bitwise(dst_bag(ids, offsets), F.embedding_bag(ids, dense, offsets, mode="max"))
    assert_bitwise(dst_emb(ids), F.embedding(ids, dense))


def test_state_dict_switches_dtype_and_reports_key_problems() -> None:
    weight, lengths = random_table(9, 5, seed=3)
    q, offsets, scale, bias = packed(weight, lengths, torch.int8)
    int8 = PackedEmbedding(q, offsets, 5, scale=scale, bias=bias)
    fp32_emb, _, _ = _modules(n=4, d=5)
    fp32_emb.load_state_dict(int8.state_dict())  # fp32 module takes an int8 table (+ scale/bias)
    ids = torch.arange(9)
    assert_bitwise(fp32_emb(ids), F.embedding(ids, dense_of(q, offsets, 5, scale, bias)))
    state = int8.state_dict()
    del state["scale"]
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "scale"'):
        fp32_emb.load_state_dict(state)
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "extra"'):
        fp32_emb.load_state_dict({**int8.state_dict(), "extra": torch.ones(1)})
    bad = {**int8.state_dict(), "offsets": torch.tensor([0, 100])}
    with pytest.raises(PackedFormatError,
                       match=r"row 0 has length 100, outside \[0, embedding_dim=5\]"):
        fp32_emb.load_state_dict(bad)
    assert_bitwise(fp32_emb(ids), int8(ids))  # a failed load leaves the module as it was


@pytest.mark.parametrize("d, n", [(12, 30), (7, 9), (64, 200)])
def test_int4_modules_match_torch_on_the_dequantised_table(kernel: str, d: int, n: int) -> None:
    weight, lengths = random_table(n, d, seed=d, min_length=0)
    lengths[0] = 1 if int(lengths.sum()) % 2 == 0 else lengths[0]  # odd S: a padding nibble
    stream, offsets, scale, bias = packed(weight, lengths, torch.uint8)
    assert int(offsets[-1]) % 2 == 1 and stream.numel() == (int(offsets[-1]) + 1) // 2
    dense = dense_of(stream, offsets, d, scale, bias)
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, n, (3, 40), generator=g)
    emb = PackedEmbedding(stream, offsets, d, scale=scale, bias=bias)
    assert_bitwise(emb(ids), F.embedding(ids, dense))
    flat, bag_offsets = ids.flatten(), torch.tensor([0, 0, 7, 30, 120])
    w = torch.randn(flat.numel(), generator=g)
    for mode, pad, weights, last in (("sum", None, None, False), ("sum", None, w, True),
                                     ("sum", 3, w, False), ("mean", 3, None, True),
                                     ("max", None, None, False), ("max", -1, None, True)):
        bag = PackedEmbeddingBag(stream, offsets, d, scale=scale, bias=bias, mode=mode,
                                 padding_idx=pad, include_last_offset=last)
        expected = nn.EmbeddingBag.from_pretrained(dense, mode=mode, padding_idx=pad,
                                                   include_last_offset=last)
        assert_bitwise(bag(flat, bag_offsets, weights), expected(flat, bag_offsets, weights))
    if kernel == "compiled":  # the int32 offsets copy is validated against S, not len(values)
        assert emb._kernel_offsets(emb.offsets, emb.values)[1]
    assert "values=int4" in repr(emb) and f"kept={int(offsets[-1])}" in repr(emb)


def test_int4_state_dict_round_trip() -> None:
    weight, lengths = random_table(20, 10, seed=4)
    stream, offsets, scale, bias = packed(weight, lengths, torch.uint8)
    int4 = PackedEmbeddingBag(stream, offsets, 10, scale=scale, bias=bias, mode="sum")
    _, fp32, _ = _modules(n=5, d=10, mode="sum")
    fp32.load_state_dict(int4.state_dict())
    assert fp32.values.dtype == torch.uint8
    ids, bag_offsets = torch.arange(20), torch.tensor([0, 5])
    assert_bitwise(fp32(ids, bag_offsets), int4(ids, bag_offsets))
    bad = {**int4.state_dict(), "values": stream[:-1]}
    with pytest.raises(PackedFormatError, match="must hold ceil"):
        fp32.load_state_dict(bad)


@pytest.mark.parametrize("inference", [False, True])
def test_kernel_offsets_follow_the_buffer(inference: bool) -> None:
    # The compiled path reads a derived int32 copy of `offsets`; it must never go stale, and it
    # must not show up in the state_dict.
    with torch.inference_mode(inference):
        emb, bag, dense = _modules(n=30, d=12, seed=4, mode="sum")
    ids = torch.arange(30)
    assert_bitwise(emb(ids), F.embedding(ids, dense))
    assert set(emb.state_dict()) == {"values", "offsets"}
    assert emb.state_dict()["offsets"].dtype == torch.int64
    other_emb, other_bag, other_dense = _modules(n=30, d=12, seed=5, mode="sum")
    for module in (emb, bag):
        module.load_state_dict(other_emb.state_dict())
    assert_bitwise(emb(ids), F.embedding(ids, other_dense))
    assert_bitwise(bag(ids, torch.tensor([0, 7])),
                   F.embedding_bag(ids, other_dense, torch.tensor([0, 7]), mode="sum"))
    if not inference:  # an in-place edit of the buffers is seen (the version counter moves)
        lengths = emb.lengths
        rolled = torch.cat([other_dense[1:], other_dense[:1]])
        values, offsets = pack_rows(rolled, torch.cat([lengths[1:], lengths[:1]]))
        emb.offsets.copy_(offsets)  # same N and len(values): only the row boundaries move
        emb.values.copy_(values)
        assert_bitwise(emb(ids), F.embedding(ids, rolled))


def test_unchecked_operators_only_for_a_validated_offsets_copy(monkeypatch) -> None:
    # The modules skip the kernel's per-row offset checks only for their private int32 copy,
    # validated whole when derived; any change that could make it unsafe re-validates it, and an
    # invalid copy goes to the checked operators, which raise instead of reading outside values.
    unchecked_calls = []
    real = ops._unchecked_ops
    monkeypatch.setattr(ops, "_unchecked_ops", lambda: unchecked_calls.append(1) or real())
    ids, bag_offsets = torch.arange(30), torch.tensor([0, 7])
    emb, bag, dense = _modules(n=30, d=12, seed=6, mode="sum")
    assert_bitwise(emb(ids), F.embedding(ids, dense))
    assert_bitwise(bag(ids, bag_offsets), F.embedding_bag(ids, dense, bag_offsets, mode="sum"))
    assert len(unchecked_calls) == 2
    unchecked_calls.clear()

    emb, bag, _ = _modules(n=30, d=12, seed=6, mode="sum")
    with torch.no_grad():
        emb.offsets[5] = 10**6  # in place: the version counter moves
    with pytest.raises(ValueError, match="corrupt offsets for row 4"):
        emb(ids)
    bag.values = bag.values[:5].clone()  # shorter values under the same offsets tensor
    with pytest.raises(ValueError, match="corrupt offsets for row"):
        bag(ids, bag_offsets)
    emb, _, _ = _modules(n=30, d=12, seed=6)
    assert int(emb.lengths.max()) > 2
    emb.embedding_dim = 2  # rows now longer than D
    with pytest.raises(ValueError, match="longer than 2"):
        emb(ids)
    assert not unchecked_calls


def test_nested_state_dict_prefixes() -> None:
    emb, bag, _ = _modules()
    model = nn.ModuleDict({"a": emb, "b": bag})
    fresh = nn.ModuleDict({"a": _modules(n=3)[0], "b": _modules(n=3)[1]})
    fresh.load_state_dict(model.state_dict())
    assert fresh["a"].num_embeddings == fresh["b"].num_embeddings == 30


@pytest.mark.parametrize("mode", ["r", "c"])
def test_memory_mapped_values_are_only_read(tmp_path, mode: str) -> None:
    weight, lengths = random_table(50, 16, seed=4)
    values, offsets, _, _ = packed(weight, lengths)
    path = tmp_path / "values.bin"
    values.numpy().tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode=mode, shape=(values.numel(),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that "r" maps are read-only
        mapped_values = torch.from_numpy(mapped)
    emb = PackedEmbedding(mapped_values, offsets, 16)
    bag = PackedEmbeddingBag(mapped_values, offsets, 16, mode="sum")
    assert emb.values.data_ptr() == mapped_values.data_ptr()  # no copy was made
    ids = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(0))
    dense = dense_of(values, offsets, 16)
    assert_bitwise(emb(ids), F.embedding(ids, dense))
    assert_bitwise(bag(ids, torch.tensor([0, 10])),
                   F.embedding_bag(ids, dense, torch.tensor([0, 10]), mode="sum"))
    assert np.array_equal(np.fromfile(path, dtype=np.float32), values.numpy())


def test_to_device_keeps_buffers_and_results() -> None:
    emb, bag, dense = _modules()
    assert emb.to("cpu") is emb and emb.values.device.type == "cpu"
    ids = torch.tensor([1, 2])
    assert_bitwise(emb(ids), F.embedding(ids, dense))
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines only
        expected = bag(ids, torch.tensor([0]))
        cuda = bag.to("cuda")
        assert_bitwise(cuda(ids.cuda(), torch.tensor([0]).cuda()).cpu(), expected)


def test_reference_switch_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    emb, _, dense = _modules()
    monkeypatch.setenv(ops.KERNEL_ENV, "reference")
    monkeypatch.setattr(ops, "_warned_reference", False)
    with pytest.warns(RuntimeWarning, match="AMTL_COMPRESS_KERNEL=reference"):
        emb(torch.tensor([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_bitwise(emb(torch.tensor([2])), F.embedding(torch.tensor([2]), dense))
    monkeypatch.setenv(ops.KERNEL_ENV, "fast")
    with pytest.raises(ops.KernelBuildError, match="must be `compiled` or `reference`"):
        emb(torch.tensor([1]))


def test_repr_names_the_table() -> None:
    _, bag, _ = _modules(mode="sum")
    assert "name='embeddings.items'" in repr(bag) and "mode='sum'" in repr(bag)
