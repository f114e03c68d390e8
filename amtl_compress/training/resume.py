"""Resuming an interrupted run: the state file, and the decision to resume or start over.

The state is model + optimiser tensors in safetensors, the rest (progress, the run's config) in
JSON. No pickle is involved, so a state directory can be read back without trusting it to run
code. Rank 0 writes it in ``<out>.resume`` (run_dir.py); under torchrun every rank reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from amtl_compress._io import atomic_save_safetensors, atomic_write_text
from amtl_compress.errors import RunDirError
from amtl_compress.run_dir import STATE_COPY as _STATE_JSON
from amtl_compress.run_dir import STATE_FILE as _STATE_TENSORS
from amtl_compress.training.distributed import World

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
        else:  # a state whose progress is only in the JSON copy
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


def resume_or_restart(
    state_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config_json: str,
    resume: bool,
    world: World,
) -> dict[str, Any]:
    """Load the state an interrupted run left in ``state_dir`` (every rank reads rank 0's file),
    or clear the directory; returns the progress to start from.

    Args:
        config_json: the run's config as sorted JSON; a saved state of another config refuses
            to resume.
        resume: False = start over whatever ``state_dir`` holds.
    """
    with world.errors_agreed():
        saved = None
        if resume and has_state(state_dir):
            saved = load_state(state_dir, model, optimizer)
            if saved.get("config") != config_json:
                raise RunDirError(
                    f"`{state_dir}` holds an interrupted run with a different configuration; "
                    "rerun with the same options, or pass `resume=False` to start over"
                )
            # A state without a world size comes from a single process.
            saved_world = saved.get("world_size", 1)
            if saved_world != world.size:
                raise RunDirError(
                    f"`{state_dir}` was saved by a run of {saved_world} process(es), this one has "
                    f"{world.size}; resume with as many (torchrun --nnodes x --nproc_per_node), "
                    "or pass `resume=False` to start over"
                )
    if world.active:
        steps = world.gather_rows(torch.tensor([-1 if saved is None else saved["step"]]))
        with world.errors_agreed():
            if len({int(s) for s in steps}) > 1:
                raise RunDirError(
                    f"the ranks do not see the same resume state in `{state_dir}` (saved step "
                    f"by rank: {[int(s) for s in steps]}, -1 = none); put `out` on a "
                    "filesystem every node shares"
                )
    if saved is not None:
        return saved
    with world.errors_agreed():
        if world.is_main and state_dir.exists():
            shutil.rmtree(state_dir)
    if world.active:
        _check_shared(state_dir, world)
    return {
        "step": 0, "history": [], "best": None, "config": config_json, "world_size": world.size,
    }


def _check_shared(state_dir: Path, world: World) -> None:
    """Fail now, not at the first resume, when rank 0's files are invisible to other ranks.

    Rank 0 writes the resume state and the best epoch's weights, and every rank reads them back
    (resume, end of run), so ``state_dir`` must be on a filesystem all ranks share.
    """
    with world.errors_agreed():
        if world.is_main:
            state_dir.mkdir(parents=True, exist_ok=True)
    with world.errors_agreed():
        if not state_dir.is_dir():
            raise RunDirError(
                f"rank {world.rank} does not see `{state_dir}`, which rank 0 created; put `out` "
                "on a filesystem every node shares"
            )
    with world.errors_agreed():
        if world.is_main:
            state_dir.rmdir()  # empty until the first save; a run that fails leaves nothing
