"""Untrusted checkpoints through the CLI: code-running pickles are refused unread; broken
safetensors files and weights that do not fit the model are one-line errors with exit code 1."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amtl_compress.checkpoint import save_checkpoint
from amtl_compress.cli import app
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import model_spec_for

runner = CliRunner(mix_stderr=False)
CONFIG = DLRMConfig(categorical={"u": 10, "i": 6}, embedding_dim=4, top_mlp=(4,))


class _Reduce:
    """Unpickles to ``func(*args)``: the classic way a pickle runs code."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "payload,named",
    [
        (lambda m: _Reduce(os.system, f"touch {m}"), "system"),
        (lambda m: _Reduce(eval, f"open({str(m)!r}, 'w')"), "eval"),
        (lambda m: _Reduce(subprocess.call, ["touch", str(m)]), "call"),
        # A plain pickle of a tensor asks for torch's own unsafe loader first; refused as well.
        (lambda m: {"w": torch.zeros(2), "x": _Reduce(os.system, f"touch {m}")},
         {"pickle": "_load_from_bytes", "torch.save": "system"}),
    ],
    ids=["os.system", "builtins.eval", "subprocess.call", "nested in a state_dict"],
)
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
@pytest.mark.parametrize("command", ["inspect", "finetune"])
def test_code_running_pickle_is_refused_and_never_runs(
    tmp_path: Path, payload, named: str, writer: str, command: str
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = payload(marker)
    if writer == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path)
    if command == "inspect":
        err = _invoke("inspect", str(path))
    else:
        err = _invoke("finetune", str(path), "--data", "x.parquet", "--valid", "x.parquet",
                      "--field", "u", "--out", str(tmp_path / "run"), "--model", "m:build")
        assert not (tmp_path / "run").exists()
    named = named if isinstance(named, str) else named[writer]
    assert f"refused to unpickle `{path}`" in err and f"{named}`" in err
    assert "convert it to safetensors" in err
    assert not marker.exists()


def _safetensors(header: dict, data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + data


TWO = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
       "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
BROKEN = {
    "truncated data": _safetensors(TWO, bytes(12)),
    "truncated header": _safetensors(TWO, bytes(16))[:30],
    "under 8 bytes": b"\x10\x00",
    "header length past the end": struct.pack("<Q", 4096) + b"{}",
    "oversized header length": struct.pack("<Q", 2**63) + b"{}",
    "header not JSON": struct.pack("<Q", 8) + b"{{{{{{{{",
    "overlapping offsets": _safetensors(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(16)),
    "offsets past the end": _safetensors(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
    "offsets not matching shape": _safetensors(
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
    "unknown dtype": _safetensors(
        {"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "negative shape": _safetensors(
        {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
}


@pytest.mark.parametrize("raw", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_safetensors_is_a_one_line_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(raw)
    err = _invoke("inspect", str(path))
    assert f"`{path}`" in err and "corrupt or truncated" in err


def test_weights_of_the_wrong_shape_for_the_model(tmp_path: Path) -> None:
    model = DLRM(CONFIG)
    state = model.state_dict()
    state["embeddings.u.weight"] = torch.zeros(11, 4)
    del state["top.0.bias"]
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, state, model_spec_for(model))
    err = _invoke("inspect", str(path))
    assert "`embeddings.u.weight` is (11, 4) in the file but (10, 4) in the model" in err
    assert "missing keys `top.0.bias`" in err


def test_a_safetensors_file_cannot_name_code_to_run(tmp_path: Path) -> None:
    """A model spec in the metadata is data: a spec of unknown kind is refused, not interpreted."""
    path = tmp_path / "m.safetensors"
    state = DLRM(CONFIG).state_dict()
    save_checkpoint(path, state, {"kind": "pickle", "payload": "cos\nsystem\n"})
    err = _invoke("inspect", str(path))
    assert "pickle" in err
