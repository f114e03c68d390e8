"""Dimension ordering (AMTLConfig(ordering="pca")): the rotation, its modules, checkpoints and the
packed format version 2."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from amtl_compress.checkpoint import load_model, save_checkpoint
from amtl_compress.core.amtl import AMTLConfig
from amtl_compress.core.rotation import (
    RotatedEmbedding,
    RotatedEmbeddingBag,
    float16_exact,
    onto_principal_axes,
    principal_axes,
    rotate_rows,
    unrotated,
    with_rotation,
)
from amtl_compress.errors import ConfigError, PackedFormatError, SurgeryError
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import model_spec_for
from amtl_compress.storage.format import read_packed_table, source_digest, write_packed_table
from amtl_compress.storage.header import read_header
from amtl_compress.surgery import amtl_layers, attach_amtl_, detach_amtl
from amtl_compress.training.finetune import FinetuneConfig


def test_orderings_are_defined_once() -> None:
    from amtl_compress.core import amtl, rotation

    assert amtl._ORDERINGS is rotation.ORDERINGS == ("none", "pca")


def correlated_table(n: int = 200, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows whose energy sits in a random 3-dim subspace plus small noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :3]
    return torch.randn(n, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0]) @ basis.T + 0.01 * (
        torch.randn(n, d, generator=g)
    )


def test_principal_axes_are_orthogonal_and_order_energy():
    w = correlated_table()
    r = principal_axes(w)
    assert r.dtype == torch.float32 and r.shape == (8, 8)
    assert torch.allclose(r @ r.T, torch.eye(8), atol=1e-5)
    energy = (w @ r.T).pow(2).sum(0)  # column energies of W Q
    assert torch.all(energy[:-1] >= energy[1:] - 1e-4)
    # The first 3 rotated dims hold nearly all the energy; the raw first 3 dims do not.
    assert energy[:3].sum() / energy.sum() > 0.999
    assert w[:, :3].pow(2).sum() / w.pow(2).sum() < 0.9


def is_float16_exact(rotation: torch.Tensor) -> bool:
    return torch.equal(float16_exact(rotation), rotation)


@pytest.mark.parametrize("d", [8, 64])
def test_onto_principal_axes_rounds_r_to_float16_and_keeps_the_table(d: int):
    w = correlated_table(n=500, d=d, seed=2)
    q_t = principal_axes(w)
    rotated, r = onto_principal_axes(w)
    assert r.dtype == torch.float32 and rotated.dtype == w.dtype and rotated.shape == w.shape
    assert is_float16_exact(r) and not torch.equal(r, q_t)  # a float32 pack stores it in F16
    # R is Q^T to float16 rounding: nearly orthogonal, singular values within 2^-11 sqrt(D) of 1.
    assert (r - q_t).abs().max().item() <= 2**-12
    sv = torch.linalg.svdvals(r.double())
    assert (sv - 1).abs().max().item() <= 2**-11 * d**0.5
    # W' R gives W back as closely as the old W Q Q^T did (float32 rounding).
    old = rotate_rows(w @ q_t.T, q_t)
    new = rotate_rows(rotated, r)
    assert (new - w).abs().max().item() <= max(2 * (old - w).abs().max().item(), 1e-6)
    # The principal axes keep their order: the column energies of W' still decrease.
    energy = rotated.pow(2).sum(0)
    assert torch.all(energy[:-1] >= energy[1:] - 1e-4)
    assert energy[:3].sum() / energy.sum() > 0.999


def test_onto_principal_axes_composes_an_earlier_rotation_float16_exactly():
    w = correlated_table(n=300, d=8, seed=4)
    first, r0 = onto_principal_axes(w)
    second, r = onto_principal_axes(first, r0)
    assert is_float16_exact(r)
    assert (rotate_rows(second, r) - w).abs().max().item() < 1e-6
    # The composition is the axes of the effective table W' R0 = W: R again, to R0's rounding.
    assert (r - r0).abs().max().item() < 1e-3


def test_rotated_modules_share_weights_and_round_trip():
    table = nn.Embedding(10, 4)
    r = principal_axes(torch.randn(50, 4))
    rotated = with_rotation(table, r)
    assert isinstance(rotated, RotatedEmbedding) and rotated.weight is table.weight
    ids = torch.tensor([[1, 2], [3, 9]])
    assert torch.equal(rotated(ids), rotate_rows(table(ids), r))
    assert set(rotated.state_dict()) == {"weight", "rotation"}
    plain, back = unrotated(rotated)
    assert type(plain) is nn.Embedding and plain.weight is table.weight and torch.equal(back, r)
    assert set(plain.state_dict()) == {"weight"}
    bag = with_rotation(nn.EmbeddingBag(10, 4, mode="mean"), r)
    assert isinstance(bag, RotatedEmbeddingBag) and bag(ids).shape == (2, 4)
    with pytest.raises(SurgeryError, match="already rotated"):
        with_rotation(rotated, r)


def test_ordering_is_validated():
    with pytest.raises(ConfigError, match="`ordering`"):
        AMTLConfig(ordering="svd")
    assert AMTLConfig.from_dict(AMTLConfig(ordering="pca").to_dict()).ordering == "pca"
    assert FinetuneConfig().amtl.ordering == "pca"  # the recipe docs/benchmarks.md measured
    with pytest.raises(ValueError, match="budget_weight"):
        FinetuneConfig(budget_weight=-1.0)


class Model(nn.Module):
    def __init__(self, mode: str = "sum") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.user = nn.Embedding(30, 8)
        self.tags = nn.EmbeddingBag(20, 8, mode=mode, padding_idx=0)
        with torch.no_grad():
            self.user.weight.copy_(correlated_table(30, 8, seed=1))

    def forward(self, ids: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        return self.user(ids) * self.tags(tags)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 30, (16,), generator=g), torch.randint(0, 20, (16, 3), generator=g)


def counts(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % 7


def test_pca_attach_keeps_outputs_and_detach_keeps_them_bitwise():
    model = Model()
    before = model(*inputs())
    attach_amtl_(model, {"user": counts(30), "tags": counts(20)}, AMTLConfig(ordering="pca"))
    model.eval()
    assert torch.allclose(model(*inputs()), before, atol=1e-5)
    assert all(is_float16_exact(m.rotation) for m in (model.user, model.tags))
    # The stored table is now W R^-1 (about W Q): its energy sits in the leading dims.
    energy = model.user.weight.detach().pow(2).sum(0)
    assert energy[:3].sum() / energy.sum() > 0.99
    layers = amtl_layers(model)
    with torch.no_grad():  # shorten rows, as a budget would
        for layer in layers.values():
            layer.price.fill_(3.0)
    masked = model(*inputs())
    assert not torch.allclose(masked, before, atol=1e-3)
    model, lengths = detach_amtl(model, merge=True)
    assert isinstance(model.user, RotatedEmbedding) and isinstance(model.tags, RotatedEmbeddingBag)
    assert int(lengths["user"].min()) < 8
    assert torch.equal(model(*inputs()), masked)


def test_pca_rejects_max_bags_before_touching_the_model():
    model = Model(mode="max")
    weight = model.user.weight.detach().clone()
    with pytest.raises(SurgeryError, match="mode `max`"):
        attach_amtl_(model, {"user": counts(30), "tags": counts(20)}, AMTLConfig(ordering="pca"))
    assert type(model.user) is nn.Embedding and torch.equal(model.user.weight, weight)


def test_reattaching_a_rotated_table_composes_the_rotations():
    model = Model()
    before = model(*inputs())
    attach_amtl_(model, {"user": counts(30)}, AMTLConfig(ordering="pca"))
    model, _ = detach_amtl(model)
    attach_amtl_(model, {"user": counts(30)}, AMTLConfig(ordering="pca"))
    assert torch.allclose(model(*inputs()), before, atol=1e-5)
    model, _ = detach_amtl(model)
    assert isinstance(model.user, RotatedEmbedding) and is_float16_exact(model.user.rotation)
    assert torch.allclose(model(*inputs()), before, atol=1e-5)


def test_rotated_checkpoint_loads_with_its_rotation(tmp_path: Path):
    config = DLRMConfig(categorical={"user_id": 12, "item_id": 9}, embedding_dim=4)
    model = DLRM(config).eval()
    batch = {"user_id": torch.arange(6), "item_id": torch.arange(6) % 9}
    before = model(batch)
    attach_amtl_(model, {"user_id": counts(12)}, AMTLConfig(ordering="pca"))
    model, _ = detach_amtl(model)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model.state_dict(), model_spec_for(config))
    loaded, _ = load_model(path)
    assert isinstance(loaded.embeddings["user_id"], RotatedEmbedding)
    assert type(loaded.embeddings["item_id"]) is nn.Embedding
    assert torch.equal(loaded(batch), model(batch))
    assert torch.allclose(loaded(batch), before, atol=1e-5)


def rotated_table(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]])
    rotation = principal_axes(torch.randn(10, 3))
    write_packed_table(
        path, torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0, 2, 3]), embedding_dim=3,
        field="emb", source_sha256=source_digest(weight), rotation=rotation,
    )
    return weight, rotation


def test_rotated_table_round_trips_its_rotation(tmp_path: Path):
    path = tmp_path / "t.safetensors"
    _, rotation = rotated_table(path)
    table = read_packed_table(path)
    assert table.metadata["format_version"] == "4"
    assert torch.equal(table.rotation, rotation)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    # Layout: the rotation, values, then the uint8 lengths (largest item size first).
    assert header["rotation"] == {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 36]}
    assert header["values"]["data_offsets"] == [36, 48]
    assert header["lengths"] == {"dtype": "U8", "shape": [2], "data_offsets": [48, 50]}
    plain = tmp_path / "v1.safetensors"
    write_packed_table(
        plain, torch.tensor([1.0]), torch.tensor([0, 1]), embedding_dim=2, field="emb",
        source_sha256="0" * 64,
    )
    unrotated = read_packed_table(plain)
    assert "rotation" not in read_header(plain).tensors and unrotated.rotation is None


def test_reader_rejects_a_rotated_table_without_a_proper_rotation(tmp_path: Path):
    path = tmp_path / "t.safetensors"
    rotated_table(path)
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header["rotation"]["shape"] = [9]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    path.write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + n :]))
    with pytest.raises(PackedFormatError, match="tensor `rotation` has shape"):
        read_packed_table(path)
    with pytest.raises(PackedFormatError, match="non-finite"):
        write_packed_table(
            tmp_path / "nan.safetensors", torch.tensor([1.0]), torch.tensor([0, 1]),
            embedding_dim=1, field="emb", source_sha256="0" * 64,
            rotation=torch.tensor([[float("nan")]]),
        )


def test_budget_penalty_reaches_rows_no_batch_touches():
    """bce_step's penalty (finetune's budget_weight term) trains the AMTL layer even for rows
    that never appear in a batch, pushing them shorter, and bce_step still returns the BCE."""
    from amtl_compress.training.loop import bce_step

    model = Model()
    attach_amtl_(model, {"user": counts(30)}, AMTLConfig(temperature=1.0))
    layer = amtl_layers(model)["user"]
    with torch.no_grad():
        layer.price.fill_(2.0)
    model.train()
    ids, tags = torch.zeros(8, dtype=torch.int64), torch.ones(8, 3, dtype=torch.int64)
    batch_model = nn.Module()
    batch_model.forward = lambda features: model(features["ids"], features["tags"]).sum(-1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    untouched = torch.arange(1, 30)  # rows 1..29 never appear in the batch
    before = layer.mask(untouched).sum().item()
    start = layer.expected_ratio().item()
    labels = torch.ones(8)
    for _ in range(20):
        with torch.no_grad():
            plain = torch.nn.functional.binary_cross_entropy_with_logits(
                batch_model({"ids": ids, "tags": tags}), labels
            ).item()
        loss = bce_step(batch_model, optimizer, {"ids": ids, "tags": tags}, labels,
                        penalty=lambda: layer.price * layer.expected_ratio())
        assert loss == pytest.approx(plain, abs=1e-6)  # the BCE, not BCE + penalty (~2)
    assert layer.expected_ratio().item() < start - 0.05
    assert layer.mask(untouched).sum().item() < before
