"""Resumable training state: model + optimiser tensors in safetensors, the rest in JSON.

No pickle is involved, so a state directory can be read back without trusting it to run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from amtl_compress._io import atomic_save_safetensors, atomic_write_text
from amtl_compress.errors import RunDirError

_STATE_TENSORS = "state.safetensors"
_STATE_JSON = "state.json"
_PROGRESS_KEY = "amtl_compress.progress"


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
    """Write the resumable state of a run into ``directory`` in one atomic file write.

    The progress JSON travels in the tensor file's metadata, so a process killed at any point
    leaves either the previous state or the new one, never a mix of two steps. ``state.json``
    is a readable copy written afterwards; :func:`load_state` does not depend on it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    text = json.dumps({"optimizer": opt_meta, **progress}, indent=1)
    atomic_save_safetensors(
        tensors, directory / _STATE_TENSORS, {"step": str(progress["step"]), _PROGRESS_KEY: text}
    )
    atomic_write_text(directory / _STATE_JSON, text)


def has_state(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a state written by :func:`save_state`."""
    return (Path(directory) / _STATE_TENSORS).is_file()


def load_state(
    directory: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote into ``model`` and ``optimizer``.

    Returns:
        The ``progress`` dict given to :func:`save_state`.

    Raises:
        RunDirError: the state is unreadable or inconsistent (names the directory).
    """
    directory = Path(directory)
    try:
        with safe_open(str(directory / _STATE_TENSORS), framework="pt") as f:
            stored = dict(f.metadata() or {})
        tensors = load_file(str(directory / _STATE_TENSORS))
        if _PROGRESS_KEY in stored:
            meta = json.loads(stored[_PROGRESS_KEY])
        else:  # written before the progress moved into the tensor file
            meta = json.loads((directory / _STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise RunDirError(
            f"cannot read the resume state in `{directory}` ({_first_line(exc)}); "
            "delete that directory to start the run from the beginning"
        ) from exc
    if stored.get("step") != str(meta.get("step")):
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
