"""Checkpoints: safetensors round trip, weights-only pickles, refusing code, strict loading."""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from amtl_compress.checkpoint import (
    SPEC_KEY,
    TableInfo,
    embedding_tables,
    load_model,
    load_state_dict,
    save_checkpoint,
)
from amtl_compress.errors import CheckpointError
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import model_spec_for

CONFIG = DLRMConfig(
    categorical={"user_id": 10, "item_id": 7},
    list_fields={"tags": 5},
    dense=("price",),
    embedding_dim=8,
    bottom_mlp=(8,),
    top_mlp=(6,),
)


def batch() -> dict[str, torch.Tensor]:
    return {
        "user_id": torch.tensor([0, 9, 3]),
        "item_id": torch.tensor([6, 0, 2]),
        "tags": torch.tensor([[1, 4], [0, 0], [2, 0]]),
        "price": torch.tensor([0.1, 2.0, -1.0]),
    }


class Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dlrm_round_trip_through_save_checkpoint_and_load_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DLRM(CONFIG).eval()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model.state_dict(), model_spec_for(model), metadata={"epoch": "3"})
    loaded, spec = load_model(path)
    assert spec == {"kind": "dlrm", "config": CONFIG.to_dict()}
    assert isinstance(loaded, DLRM) and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(batch()), model(batch()))
    _, meta = load_state_dict(path)
    assert meta["epoch"] == "3" and json.loads(meta[SPEC_KEY]) == spec
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_save_without_spec_then_load_needs_a_factory(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_checkpoint(path, DLRM(CONFIG).state_dict(), None)
    state, meta = load_state_dict(path)
    assert SPEC_KEY not in meta and "embeddings.user_id.weight" in state
    fix = "pass `model_factory=package.module:function`"
    with pytest.raises(CheckpointError, match=re.escape(fix)):
        load_model(path)


def test_save_checkpoint_rejects_bad_arguments(tmp_path: Path) -> None:
    state = {"w": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="name the file `\\*.safetensors`"):
        save_checkpoint(tmp_path / "m.pt", state, None)
    with pytest.raises(ValueError, match="is reserved"):
        save_checkpoint(tmp_path / "m.safetensors", state, None, metadata={SPEC_KEY: "{}"})
    with pytest.raises(ValueError, match="must map str to str"):
        save_checkpoint(tmp_path / "m.safetensors", state, None, metadata={"n": 3})  # type: ignore[dict-item]
    assert not (tmp_path / "m.safetensors").exists()


def test_tied_and_sliced_tensors_are_saved_as_copies(tmp_path: Path) -> None:
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    base = torch.arange(12.0)
    state = {
        "emb.weight": emb.weight,
        "head.weight": head.weight,
        "first": base[:6],
        "second": base[6:],
        "empty_a": torch.zeros(0),
        "empty_b": torch.zeros(0),
    }
    path = tmp_path / "tied.safetensors"
    save_checkpoint(path, state, None)
    loaded, _ = load_state_dict(path)
    assert torch.equal(loaded["emb.weight"], loaded["head.weight"])
    assert loaded["second"].tolist() == [6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    assert loaded["empty_b"].shape == (0,)
    assert emb.weight.data_ptr() == head.weight.data_ptr()  # the caller's tensors untouched


def test_pt_state_dict_loads_with_weights_only(tmp_path: Path) -> None:
    model = DLRM(CONFIG)
    raw = tmp_path / "model.pt"
    torch.save(model.state_dict(), raw)
    state, meta = load_state_dict(raw)
    assert meta == {} and set(state) == set(model.state_dict())
    wrapped = tmp_path / "lightning.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 4}, wrapped)
    state2, _ = load_state_dict(wrapped)
    assert torch.equal(state2["embeddings.user_id.weight"], model.embeddings["user_id"].weight)
    # A pickle carries no model spec: the model has to come from a factory.
    with pytest.raises(CheckpointError, match="no `amtl_compress.model` metadata"):
        load_model(wrapped)


def test_pt_loads_into_a_factory_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ckpt_factory_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from amtl_compress.models.dlrm import DLRM, DLRMConfig

            def build():
                return DLRM(DLRMConfig(categorical={"u": 4, "i": 3}, embedding_dim=2))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = __import__(name)
        trained = module.build()
        path = tmp_path / "user.bin"
        torch.save(trained.state_dict(), path)
        model, spec = load_model(path, factory=f"{name}:build")
        assert spec == {"kind": "factory", "factory": f"{name}:build"}
        assert torch.equal(model.embeddings["u"].weight, trained.embeddings["u"].weight)
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("how", ["pickle.dump", "torch.save"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"boom": Evil(marker)}
    if how == "pickle.dump":
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save({"weight": torch.zeros(2), **payload}, path)
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(path)
    msg = str(exc.value)
    assert "refused to unpickle" in msg and "may run code" in msg and "safetensors" in msg
    assert "system`" in msg  # names the global it would have called
    assert "\n" not in msg
    assert not marker.exists()


def test_non_tensor_values_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="entry `epoch` holds a `int`, not a tensor"):
        load_state_dict(path)
    path2 = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path2)
    with pytest.raises(CheckpointError, match="holds a `list`, not a state_dict"):
        load_state_dict(path2)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown suffix `\.ckpt`"):
        load_state_dict(tmp_path / "model.ckpt")
    corrupt_pt = tmp_path / "corrupt.pt"
    corrupt_pt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*corrupt.pt"):
        load_state_dict(corrupt_pt)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.ones(100)}, None)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as exc:
        load_state_dict(truncated)
    assert "\n" not in str(exc.value)


def test_mismatched_checkpoint_names_the_first_keys(tmp_path: Path) -> None:
    model = DLRM(CONFIG)
    state = model.state_dict()
    spec = model_spec_for(model)
    state["extra.weight"] = torch.zeros(1)
    del state["top.0.bias"]
    state["embeddings.user_id.weight"] = torch.zeros(11, 8)
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, state, spec)
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert "missing keys `top.0.bias`" in msg
    assert "unexpected keys `extra.weight`" in msg
    assert "`embeddings.user_id.weight` is (11, 8) in the file but (10, 8) in the model" in msg
    assert "\n" not in msg


def test_bad_spec_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={SPEC_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="model spec that is not JSON"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not of the form"):
        load_model(path, factory="bad factory")


def test_embedding_tables_from_model_and_state_dict() -> None:
    model = DLRM(CONFIG)
    tables = embedding_tables(model)
    assert tables == [
        TableInfo("embeddings.user_id", 10, 8, "float32", 10 * 8 * 4, "Embedding"),
        TableInfo("embeddings.item_id", 7, 8, "float32", 7 * 8 * 4, "Embedding"),
        TableInfo("embeddings.tags", 5, 8, "float32", 5 * 8 * 4, "EmbeddingBag"),
    ]
    state = {k: v.half() if "user" in k else v for k, v in model.state_dict().items()}
    with_model = embedding_tables(state, model=model)
    assert [(t.name, t.kind, t.dtype, t.bytes) for t in with_model][0] == (
        "embeddings.user_id", "Embedding", "float16", 10 * 8 * 2,
    )  # fmt: skip
    assert len(with_model) == 3
    guessed = embedding_tables(state)
    # Best effort: 2-D weights under a path naming an embedding; the MLP weights are left out.
    assert [t.name for t in guessed] == [t.name for t in tables]
    assert {t.kind for t in guessed} == {"unknown"}


def test_saved_file_is_plain_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"a": torch.arange(3)}, {"kind": "factory", "factory": "m:f"})
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["a"]
        assert json.loads(f.metadata()[SPEC_KEY]) == {"kind": "factory", "factory": "m:f"}
