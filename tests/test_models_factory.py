"""Model specs: building the DLRM and user models from `package.module:function`."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

from amtl_compress.errors import CheckpointError
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import build_model, model_spec_for

CONFIG = DLRMConfig(categorical={"a": 4, "b": 5}, embedding_dim=4)

USER_MODULE = """
import torch
from torch import nn

# Tensor code at import time, as torchrec runs: fails if imported under torch.device("meta").
_SCALE = torch.ones(1).item()

class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.out = nn.Linear(3, 1)

    @classmethod
    def build(cls):
        return cls()

def make():
    return Tower()

def broken():
    raise RuntimeError("no weights\\nsecond line")

def not_a_model():
    return 42

answer = 42
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_models_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_dlrm_spec_round_trip() -> None:
    spec = model_spec_for(DLRM(CONFIG))
    assert spec == {"kind": "dlrm", "config": CONFIG.to_dict()}
    assert model_spec_for(CONFIG) == spec
    model = build_model(spec)
    assert isinstance(model, DLRM) and model.config == CONFIG


def test_factory_spec_and_build(user_module: str) -> None:
    spec = model_spec_for(nn.Linear(2, 2), factory=f"{user_module}:make")
    assert spec == {"kind": "factory", "factory": f"{user_module}:make"}
    model = build_model(spec)
    assert type(model).__name__ == "Tower" and model.emb.weight.shape == (6, 3)
    nested = build_model({"kind": "factory", "factory": f"{user_module}:Tower.build"})
    assert type(nested).__name__ == "Tower"


def test_build_on_meta_imports_the_factory_module_first(user_module: str) -> None:
    # The module runs `.item()` at import; under torch.device("meta") that would raise.
    model = build_model({"kind": "factory", "factory": f"{user_module}:make"}, device="meta")
    assert model.emb.weight.is_meta and model.out.weight.is_meta
    assert build_model(model_spec_for(CONFIG), device="meta").embeddings["a"].weight.is_meta


def test_non_dlrm_model_needs_a_factory() -> None:
    with pytest.raises(CheckpointError, match="cannot describe a `Linear` model"):
        model_spec_for(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_colon", "not of the form `package.module:function`"),
        ("a.b:", "not of the form"),
        ("missing_module_xyz:make", "cannot import module `missing_module_xyz`"),
        ("{mod}:nothing", "has no attribute `nothing`"),
        ("{mod}:answer", "is not callable"),
        ("{mod}:broken", "raised RuntimeError: no weights;"),
        ("{mod}:not_a_model", "returned a `int`, not a torch.nn.Module"),
    ],
)
def test_factory_errors(user_module: str, factory: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as exc:
        build_model({"kind": "factory", "factory": factory.format(mod=user_module)})
    assert "\n" not in str(exc.value)


def test_bad_specs() -> None:
    with pytest.raises(CheckpointError, match="kind `torchrec` is unknown"):
        build_model({"kind": "torchrec"})
    with pytest.raises(CheckpointError, match="bad DLRM config: .*needs >= 2 vectors"):
        build_model({"kind": "dlrm", "config": {"categorical": {"a": 3}}})
