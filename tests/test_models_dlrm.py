"""The reference DLRM: config validation and JSON round trip, forward shapes and semantics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from amtl_compress.errors import ConfigError, DataError
from amtl_compress.models.dlrm import DLRM, DLRMConfig

CONFIG = DLRMConfig(
    categorical={"user_id": 10, "item_id": 7},
    list_fields={"tags": 5},
    dense=("price", "age"),
    embedding_dim=8,
    bottom_mlp=(16, 8),
    top_mlp=(12,),
)


def batch(b: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "user_id": torch.randint(0, 10, (b,), generator=g),
        "item_id": torch.randint(0, 7, (b,), generator=g),
        "tags": torch.tensor([[1, 2, 0], [0, 0, 0], [4, 0, 0], [3, 3, 1]])[:b],
        "price": torch.rand(b, generator=g),
        "age": torch.rand(b, generator=g),
        "ignored": torch.zeros(b),
    }


def test_config_json_round_trip() -> None:
    text = json.dumps(CONFIG.to_dict())
    back = DLRMConfig.from_dict(json.loads(text))
    assert back == CONFIG
    assert list(back.categorical) == ["user_id", "item_id"]  # order fixes the interaction order
    assert back.num_vectors == 4


def test_config_from_lists_equals_from_tuples() -> None:
    listy = DLRMConfig(categorical={"a": 3}, dense=["x"], bottom_mlp=[16], embedding_dim=16)
    assert listy == DLRMConfig(categorical={"a": 3}, dense=("x",), bottom_mlp=(16,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categorical": {"a.b": 3, "c": 2}}, "field name `a.b`"),
        ({"categorical": {"keys": 3, "c": 2}}, "field name `keys`"),
        ({"categorical": {"training": 3, "c": 2}}, "field name `training`"),
        ({"categorical": {"a": 3}, "list_fields": {"a": 3}}, "field `a` is listed twice"),
        ({"categorical": {"a": 0, "b": 2}}, "table `a` needs >= 1 row"),
        ({"categorical": {"a": 2}, "list_fields": {"t": 1}}, "list table `t` needs >= 2 rows"),
        ({"categorical": {"a": 2}, "dense": ("x",), "bottom_mlp": (4,)}, "must end with"),
        ({"categorical": {"a": 2}}, "needs >= 2 vectors"),
        ({"categorical": {"a": 2, "b": 2}, "embedding_dim": 0}, "embedding_dim must be >= 1"),
        ({"categorical": {"a": 2, "b": 2}, "top_mlp": (0,)}, "widths must be >= 1"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DLRMConfig(**kwargs)


def test_bottom_mlp_is_dropped_without_dense_features() -> None:
    cfg = DLRMConfig(categorical={"a": 2, "b": 2}, bottom_mlp=(64, 16))
    assert cfg.bottom_mlp == ()
    assert len(DLRM(cfg).bottom) == 0


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown DLRMConfig keys \['dims'\]"):
        DLRMConfig.from_dict({**CONFIG.to_dict(), "dims": 3})
    with pytest.raises(ConfigError, match="`categorical` is missing"):
        DLRMConfig.from_dict({"embedding_dim": 4})
    with pytest.raises(ConfigError, match="DLRMConfig `version` 2 is not supported"):
        DLRMConfig.from_dict({**CONFIG.to_dict(), "version": 2})


def test_config_errors_are_config_errors_and_value_errors() -> None:
    with pytest.raises(ConfigError) as info:
        DLRMConfig(categorical={"a": 2})
    assert isinstance(info.value, ValueError)


def test_config_round_trips_through_json() -> None:
    text = json.dumps(CONFIG.to_dict())
    assert DLRMConfig.from_dict(json.loads(text)) == CONFIG
    legacy = {k: v for k, v in CONFIG.to_dict().items() if k != "version"}
    assert DLRMConfig.from_dict(legacy) == CONFIG  # written before configs had a version


def test_modules_live_under_embeddings() -> None:
    model = DLRM(CONFIG)
    assert isinstance(model.embeddings["user_id"], nn.Embedding)
    assert isinstance(model.embeddings["tags"], nn.EmbeddingBag)
    assert model.embeddings["tags"].mode == "mean" and model.embeddings["tags"].padding_idx == 0
    assert torch.all(model.embeddings["tags"].weight[0] == 0)
    names = {n for n, _ in model.named_modules()}
    assert {"embeddings.user_id", "embeddings.item_id", "embeddings.tags"} <= names
    assert model.embeddings["user_id"].weight.shape == (10, 8)
    # The interaction index buffers are derived, not weights: they stay out of checkpoints.
    assert not any("pair" in k for k in model.state_dict())


def test_forward_shape_and_dtype() -> None:
    torch.manual_seed(0)
    logits = DLRM(CONFIG)(batch())
    assert logits.shape == (4,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_top_mlp_input_is_bottom_output_plus_pairwise_dots() -> None:
    model = DLRM(CONFIG)
    f = 4  # bottom output + 3 tables
    assert model.top[0].in_features == 8 + f * (f - 1) // 2
    no_dense = DLRM(DLRMConfig(categorical={"a": 3, "b": 3, "c": 3}, embedding_dim=4))
    assert no_dense.top[0].in_features == 3


def test_interaction_is_the_dot_product_of_embeddings() -> None:
    cfg = DLRMConfig(categorical={"a": 3, "b": 3}, embedding_dim=4, top_mlp=())
    model = DLRM(cfg)
    # With no hidden top layers the logit is w * <e_a, e_b> + bias: check it by hand.
    x = {"a": torch.tensor([0, 2]), "b": torch.tensor([1, 1])}
    ea, eb = model.embeddings["a"].weight[x["a"]], model.embeddings["b"].weight[x["b"]]
    lin = model.top[0]
    expected = lin.weight[0, 0] * (ea * eb).sum(1) + lin.bias[0]
    assert torch.allclose(model(x), expected)


def test_list_field_is_a_mean_over_non_padding_ids() -> None:
    cfg = DLRMConfig(categorical={"a": 3}, list_fields={"t": 5}, embedding_dim=4, top_mlp=())
    model = DLRM(cfg)
    x = {"a": torch.tensor([1, 1]), "t": torch.tensor([[2, 4, 0, 0], [2, 4, 4, 0]])}
    w = model.embeddings["t"].weight
    ea = model.embeddings["a"].weight[1]
    bags = torch.stack([(w[2] + w[4]) / 2, (w[2] + 2 * w[4]) / 3])
    lin = model.top[0]
    assert torch.allclose(model(x), lin.weight[0, 0] * (bags * ea).sum(1) + lin.bias[0], atol=1e-6)


def test_forward_gradients_reach_every_table() -> None:
    model = DLRM(CONFIG)
    model(batch()).sum().backward()
    for name, table in model.embeddings.items():
        assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0, name


def test_missing_batch_column_is_a_data_error() -> None:
    x = batch()
    del x["item_id"]
    with pytest.raises(DataError, match="no column `item_id`"):
        DLRM(CONFIG)(x)


def test_swapping_a_table_keeps_the_interaction_order() -> None:
    torch.manual_seed(0)
    model = DLRM(CONFIG).eval()
    x = batch()
    before = model(x)
    # A wrapper replacing a table (as surgery does) must not reorder the interaction terms.
    old = model.embeddings["user_id"]
    del model.embeddings["user_id"]
    model.embeddings["user_id"] = old
    assert list(model.embeddings) == ["item_id", "tags", "user_id"]
    assert torch.equal(model(x), before)
