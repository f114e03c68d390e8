"""`pack` and `load_packed_model` import the model factory's module before building on meta.

Both build the model under ``torch.device("meta")`` (no storage for the tables). A module that
runs tensor code when imported (torchrec calls ``Tensor.item()`` at import) must therefore be
imported outside that context, or the import fails with "cannot be called on meta tensors".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from amtl_compress._io import atomic_save_safetensors
from amtl_compress.lookup.load import load_packed_model
from amtl_compress.storage.format import prefix_mask
from amtl_compress.storage.pack import pack

MODULE = "amtl_import_order_toy"
TOY = """
import torch
from torch import nn

# Tensor code at import, like torchrec's: raises under torch.device("meta").
_ONE = torch.ones(1).item()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.EmbeddingBag(20, 4, mode="sum")
        self.head = nn.Linear(4, 1)

    def forward(self, features):
        return self.head(self.table(features["ids"])).squeeze(1)


def build():
    return Toy()
"""


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A run directory whose spec names a factory module that is not imported yet."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(folder))
    namespace: dict = {}
    exec(compile(TOY, "toy", "exec"), namespace)  # the weights, without importing the module
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in namespace["build"]().state_dict().items()}
    lengths = torch.randint(1, 5, (20,))
    state["table.weight"][~prefix_mask(lengths, 4)] = 0.0
    run = tmp_path / "run"
    run.mkdir()
    spec = {"kind": "factory", "factory": f"{MODULE}:build"}
    atomic_save_safetensors(state, run / "model.safetensors",
                            {"amtl_compress.model": json.dumps(spec)})
    atomic_save_safetensors({"table": lengths}, run / "lengths.safetensors")
    (run / "config.json").write_text("{}")
    sys.modules.pop(MODULE, None)
    yield run, state
    sys.modules.pop(MODULE, None)


@pytest.mark.filterwarnings("ignore:AMTL_COMPRESS_KERNEL=reference")
def test_pack_and_load_packed_model_import_the_factory_first(
    run_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMTL_COMPRESS_KERNEL", "reference")  # this checks the wiring, not kernels
    run, state = run_dir
    pack(run, tmp_path / "packed", progress=False)
    sys.modules.pop(MODULE, None)  # load_packed_model imports it afresh, too
    model = load_packed_model(tmp_path / "packed")
    ids = torch.tensor([[1, 2], [3, 19]])
    expected = torch.nn.functional.embedding_bag(ids, state["table.weight"], mode="sum")
    assert torch.equal(model.table(ids), expected)
