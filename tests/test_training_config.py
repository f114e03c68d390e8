"""Every config follows one style: frozen, versioned, JSON round trip, ConfigError on bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from amtl_compress.core.amtl import AMTLConfig
from amtl_compress.errors import ConfigError
from amtl_compress.models.dlrm import DLRMConfig
from amtl_compress.training.config import FinetuneConfig, TrainConfig

CONFIGS = [
    AMTLConfig(),
    AMTLConfig(hidden_dims=(), twins=False, ordering="none"),
    FinetuneConfig(),
    FinetuneConfig(fields={"user_id": "user_id"}, target_ratio=0.4, final_temperature=0.5,
                   amtl=AMTLConfig(temperature=2.0)),
    TrainConfig(),
    TrainConfig(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(4,), lr=1e-2),
    DLRMConfig(categorical={"a": 3, "b": 4}),
]


#: Current version of each config; 1 unless listed (AMTLConfig 2: `head`, `frequency_prior`;
#: 3: `price_rule`; FinetuneConfig 2: `dense_lr`).
LATEST = {AMTLConfig: 3, FinetuneConfig: 2}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_config_round_trips_through_json(config) -> None:
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config
    assert data["version"] == LATEST.get(type(config), 1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_config_is_frozen(config) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.version = 2


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_from_dict_names_unknown_keys(config) -> None:
    name = type(config).__name__
    with pytest.raises(ConfigError, match=rf"^unknown {name} keys \['tau', 'zeta'\]; expected"):
        type(config).from_dict({**config.to_dict(), "zeta": 1, "tau": 2})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_from_dict_refuses_a_newer_version(config) -> None:
    name, latest = type(config).__name__, LATEST.get(type(config), 1)
    known = ", ".join(str(v) for v in range(1, latest + 1))
    expected = (
        rf"^{name} `version` {latest + 1} is not supported \(known: \[{known}\]\); "
        "upgrade amtl-compress"
    )
    with pytest.raises(ConfigError, match=expected):
        type(config).from_dict({**config.to_dict(), "version": latest + 1})


def test_one_default_ordering() -> None:
    assert AMTLConfig().ordering == "pca"
    assert FinetuneConfig().amtl == AMTLConfig()


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"top_mlp": (0,)}, "MLP widths"),
    ],
)
def test_train_config_validates(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ConfigError, match=culprit):
        TrainConfig(**kwargs)


def test_finetune_config_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="^`budget_weight` must be >= 0, got -1"):
        FinetuneConfig(budget_weight=-1)
    with pytest.raises(ConfigError, match="unknown AMTLConfig keys"):
        FinetuneConfig.from_dict({"amtl": {"tau": 1}})
    assert FinetuneConfig.from_dict({}) == FinetuneConfig()  # missing keys get their defaults


def test_finetune_config_dense_lr() -> None:
    assert FinetuneConfig().dense_lr == 0.0  # the tables only, by default
    with pytest.raises(ConfigError, match=r"^`dense_lr` must be a number >= 0, got -0.1; 0"):
        FinetuneConfig(dense_lr=-0.1)
    # A version 1 config (written before `dense_lr`) trained every parameter at `lr`.
    old = {k: v for k, v in FinetuneConfig(lr=3e-3).to_dict().items() if k != "dense_lr"}
    read = FinetuneConfig.from_dict({**old, "version": 1})
    assert (read.lr, read.dense_lr, read.version) == (3e-3, 3e-3, 1)
    assert FinetuneConfig.from_dict({"version": 1}).dense_lr == FinetuneConfig().lr
