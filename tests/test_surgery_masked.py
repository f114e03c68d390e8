"""MaskedEmbedding / MaskedEmbeddingBag: Eq. 1 applied per looked-up row, torch's call semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amtl_compress.core.amtl import AMTL, AMTLConfig
from amtl_compress.surgery import MaskedEmbedding, MaskedEmbeddingBag, SurgeryError

N, D = 30, 6


def scrambled_amtl(seed: int = 0) -> AMTL:
    """AMTL for an (N, D) table whose rows get various lengths."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # The paper's head (D free logits read from the raw activation): random last layers give
    # rows of many lengths, which is what the wrappers are tested with.
    layer = AMTL(torch.randint(0, 50, (N,), generator=g), D, AMTLConfig(head="plain"))
    with torch.no_grad():
        for branch in (layer.h_aml, layer.l_aml):
            branch[-1].weight.normal_(0, 2.0)
            branch[-1].bias.normal_(0, 2.0)
    assert len(set(layer.lengths().tolist())) > 2
    return layer


def reference_bags(
    weight: torch.Tensor,
    lengths: torch.Tensor,
    bags: list[list[int]],
    mode: str,
    padding_idx: int | None = None,
    bag_weights: list[list[float]] | None = None,
) -> torch.Tensor:
    """Brute force: mask each row to its length, drop padding entries, pool bag by bag."""
    out = []
    for b, bag in enumerate(bags):
        rows = []
        for pos, i in enumerate(bag):
            if i == padding_idx:
                continue
            row = weight[i].clone()
            row[lengths[i] :] = 0.0
            if bag_weights is not None:
                row = row * bag_weights[b][pos]
            rows.append(row)
        if not rows:
            out.append(torch.zeros(weight.shape[1]))
        elif mode == "sum":
            out.append(torch.stack(rows).sum(0))
        elif mode == "mean":
            out.append(torch.stack(rows).mean(0))
        else:
            out.append(torch.stack(rows).max(0).values)
    return torch.stack(out)


# ---- MaskedEmbedding -------------------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_masked_embedding_keeps_first_k_plus_one_dims(padding_idx: int | None) -> None:
    base = nn.Embedding(N, D, padding_idx=padding_idx)
    layer = scrambled_amtl()
    wrapped = MaskedEmbedding(base, layer).eval()
    ids = torch.tensor([[3, 0, 29], [3, 17, 5]])
    out = wrapped(ids)
    assert out.shape == (2, 3, D)
    lengths = layer.lengths()
    for i in ids.flatten().tolist():
        row = base.weight[i].detach().clone()
        row[lengths[i] :] = 0.0
        assert torch.equal(out[ids == i][0], row)
    if padding_idx is not None:  # the base's padding row (zeros) stays zeros
        assert torch.equal(out[0, 0], torch.zeros(D))


def test_inference_writes_positive_zeros() -> None:
    base = nn.Embedding(N, D)
    with torch.no_grad():
        base.weight.copy_(-base.weight.abs() - 1.0)  # all negative: 0 * x would be -0.0
    wrapped = MaskedEmbedding(base, scrambled_amtl()).eval()
    with torch.no_grad():
        out = wrapped(torch.arange(N))
    dropped = torch.arange(D) >= wrapped.amtl.lengths().unsqueeze(1)
    assert dropped.any()
    assert torch.all(out[dropped] == 0) and not torch.signbit(out[dropped]).any()


def test_training_forward_is_differentiable_in_table_and_amtl() -> None:
    wrapped = MaskedEmbedding(nn.Embedding(N, D), scrambled_amtl()).train()
    out = wrapped(torch.randint(0, N, (16,)))
    (out * torch.randn_like(out)).sum().backward()
    assert wrapped.base_layer.weight.grad.abs().sum() > 0
    assert wrapped.amtl.h_aml[-1].weight.grad.abs().sum() > 0
    assert wrapped.amtl.l_aml[-1].weight.grad.abs().sum() > 0


def test_wrapper_exposes_the_base_attributes() -> None:
    base = nn.Embedding(N, D, padding_idx=2)
    wrapped = MaskedEmbedding(base, AMTL(torch.zeros(N, dtype=torch.long), D))
    assert wrapped.weight is base.weight
    assert (wrapped.num_embeddings, wrapped.embedding_dim, wrapped.padding_idx) == (N, D, 2)
    bag = MaskedEmbeddingBag(nn.EmbeddingBag(N, D, mode="max"), AMTL(torch.zeros(N).long(), D))
    assert bag.mode == "max" and bag.weight is bag.base_layer.weight


def test_mismatched_layer_raises() -> None:
    with pytest.raises(SurgeryError, match=r"\(30, 5\) table but `base_layer` is \(30, 6\)"):
        MaskedEmbedding(nn.Embedding(N, D), AMTL(torch.zeros(N, dtype=torch.long), 5))
    with pytest.raises(SurgeryError, match="nn.EmbeddingBag"):
        MaskedEmbeddingBag(nn.Embedding(N, D), AMTL(torch.zeros(N, dtype=torch.long), D))


# ---- MaskedEmbeddingBag -----------------------------------------------------------------------

BAGS = [[1, 4, 4, 9], [], [29], [0, 3, 3, 7, 12], [3]]


def jagged(bags: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """values (nnz,) and offsets (B,) of a list of bags."""
    values = torch.tensor([i for bag in bags for i in bag], dtype=torch.long)
    offsets = torch.tensor([0] + [len(b) for b in bags[:-1]]).cumsum(0)
    return values, offsets


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_bag_matches_brute_force(
    mode: str, padding_idx: int | None, include_last_offset: bool
) -> None:
    base = nn.EmbeddingBag(
        N, D, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset
    )
    layer = scrambled_amtl()
    wrapped = MaskedEmbeddingBag(base, layer).eval()
    values, offsets = jagged(BAGS)
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([values.numel()])])
    out = wrapped(values, offsets)
    want = reference_bags(base.weight.detach(), layer.lengths(), BAGS, mode, padding_idx)
    assert out.shape == (len(BAGS), D)
    torch.testing.assert_close(out, want)


def test_bag_per_sample_weights_match_brute_force() -> None:
    base = nn.EmbeddingBag(N, D, mode="sum", padding_idx=3)
    layer = scrambled_amtl(1)
    wrapped = MaskedEmbeddingBag(base, layer).eval()
    values, offsets = jagged(BAGS)
    psw = torch.linspace(-1.0, 2.0, values.numel())
    bag_weights, start = [], 0
    for bag in BAGS:
        bag_weights.append(psw[start : start + len(bag)].tolist())
        start += len(bag)
    out = wrapped(values, offsets, per_sample_weights=psw)
    want = reference_bags(base.weight.detach(), layer.lengths(), BAGS, "sum", 3, bag_weights)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_2d_input_matches_brute_force(mode: str) -> None:
    base = nn.EmbeddingBag(N, D, mode=mode, padding_idx=0)
    layer = scrambled_amtl(2)
    wrapped = MaskedEmbeddingBag(base, layer).eval()
    ids = torch.tensor([[1, 2, 0], [0, 0, 0], [5, 5, 28]])
    out = wrapped(ids)
    want = reference_bags(base.weight.detach(), layer.lengths(), ids.tolist(), mode, 0)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_bag_with_all_ones_mask_equals_nn_embedding_bag(mode: str, padding_idx: int | None) -> None:
    base = nn.EmbeddingBag(N, D, mode=mode, padding_idx=padding_idx)
    wrapped = MaskedEmbeddingBag(base, AMTL(torch.randint(0, 9, (N,)), D))  # warm start
    values, offsets = jagged(BAGS)
    psw = torch.rand(values.numel()) if mode == "sum" else None
    for training in (True, False):
        wrapped.train(training)
        assert torch.equal(wrapped(values, offsets, psw), base(values, offsets, psw))
    ids = torch.tensor([[1, 3, 3], [4, 5, 6]])
    assert torch.equal(wrapped(ids), base(ids))


def test_bag_training_gradients_reach_table_and_amtl() -> None:
    base = nn.EmbeddingBag(N, D, mode="mean", padding_idx=3)
    wrapped = MaskedEmbeddingBag(base, scrambled_amtl()).train()
    values, offsets = jagged(BAGS)
    out = wrapped(values, offsets)
    (out * torch.randn_like(out)).sum().backward()
    grad = base.weight.grad
    assert grad[1].abs().sum() > 0
    assert torch.equal(grad[3], torch.zeros(D))  # padding row: skipped, like torch
    assert torch.equal(grad[2], torch.zeros(D))  # never looked up
    assert wrapped.amtl.h_aml[-1].weight.grad.abs().sum() > 0


def test_bag_rejects_what_torch_rejects() -> None:
    wrapped = MaskedEmbeddingBag(nn.EmbeddingBag(N, D, mode="max"), scrambled_amtl())
    values, offsets = jagged(BAGS)
    with pytest.raises((ValueError, RuntimeError), match="per_sample_weights"):
        wrapped(values, offsets, per_sample_weights=torch.ones(values.numel()))
    with pytest.raises((ValueError, RuntimeError), match="offsets"):
        wrapped(values)


def test_bag_int32_ids_and_offsets() -> None:
    base = nn.EmbeddingBag(N, D, mode="sum")
    wrapped = MaskedEmbeddingBag(base, AMTL(torch.randint(0, 9, (N,)), D)).eval()
    values, offsets = jagged(BAGS)
    got = wrapped(values.int(), offsets.int())
    assert torch.equal(got, base(values, offsets))
