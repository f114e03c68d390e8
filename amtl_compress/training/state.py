"""Resumable training state: model + optimiser tensors in safetensors, the rest in JSON.

No pickle is involved, so a state directory can be read back without trusting it to run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from amtl_compress._io import atomic_save_safetensors, atomic_write_text
from amtl_compress.errors import RunDirError

_STATE_TENSORS = "state.safetensors"
_STATE_JSON = "state.json"


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(
    directory: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
) -> None:
    """Write the resumable state of a run into ``directory`` (tensors first, JSON last).

    The JSON names the tensor file's step, so a crash between the two writes is detected on load
    rather than silently mixing two steps.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_save_safetensors(tensors, directory / _STATE_TENSORS, {"step": str(progress["step"])})
    atomic_write_text(
        directory / _STATE_JSON, json.dumps({"optimizer": opt_meta, **progress}, indent=1)
    )


def load_state(
    directory: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote; returns the ``progress`` dict."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / _STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / _STATE_TENSORS))
    except (OSError, ValueError) as exc:
        raise RunDirError(
            f"cannot read the resume state in `{directory}` ({exc}); "
            "delete that directory to start the run from the beginning"
        ) from exc
    with open(directory / _STATE_TENSORS, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    if header.get("__metadata__", {}).get("step") != str(meta["step"]):
        raise RunDirError(
            f"the resume state in `{directory}` is inconsistent (tensors and progress are from "
            "different steps); delete that directory to start the run from the beginning"
        )
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(
        _unflatten_optimizer(
            {k: v for k, v in tensors.items() if k.startswith("optimizer.")}, meta.pop("optimizer")
        )
    )
    torch.set_rng_state(tensors["rng.torch"])
    return meta
