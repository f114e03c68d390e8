"""The run directory that :func:`~amtl_compress.storage.pack.pack` reads, checked up front.

A run directory (docs/design.md) holds ``model.safetensors`` (every tensor of the fine-tuned
model, its tables' tails zeroed, and the model spec under :data:`SPEC_KEY` in the metadata) and
``lengths.safetensors`` (one (N,) int64 tensor of kept lengths per AMTL table, keyed by the
table's module path). The file names and the spec key are :mod:`amtl_compress.run_dir`'s, the one
owner of the run-directory contract.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amtl_compress.errors import AmtlError, RunDirError
from amtl_compress.models.factory import build_model
from amtl_compress.run_dir import RUN_FIX, SPEC_KEY
from amtl_compress.storage.header import Header, read_header, read_tensor


def check_lengths(lengths: torch.Tensor, n: int, d: int, what: str) -> None:
    """Raise RunDirError unless ``lengths`` is int64/int32 (n,) with every value in [1, d]."""
    if lengths.dtype not in (torch.int64, torch.int32) or tuple(lengths.shape) != (n,):
        raise RunDirError(
            f"{what} is {lengths.dtype}{list(lengths.shape)}, expected int64 [{n}] to match the "
            f"table; {RUN_FIX}"
        )
    if n and (int(lengths.min()) < 1 or int(lengths.max()) > d):
        bad = int(((lengths < 1) | (lengths > d)).nonzero()[0, 0])
        raise RunDirError(
            f"{what}: row {bad} has length {int(lengths[bad])}, outside [1, D={d}]; {RUN_FIX}"
        )


def model_spec(header: Header, model_file: Path) -> Any:
    """The model spec (parsed JSON) stored under :data:`SPEC_KEY` in the model file's metadata."""
    raw = header.metadata.get(SPEC_KEY)
    if raw is None:
        raise RunDirError(f"`{model_file}` has no `{SPEC_KEY}` metadata (model spec); {RUN_FIX}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise RunDirError(
            f"`{model_file}` metadata `{SPEC_KEY}` is not JSON ({e}); {RUN_FIX}"
        ) from e


def read_lengths(
    lengths_file: Path, model_header: Header, model_file: Path
) -> dict[str, torch.Tensor]:
    """Table path -> (N,) int64 kept lengths, each checked against ``<path>.weight``'s (N, D)."""
    header = read_header(lengths_file, RunDirError, RUN_FIX)
    if not header.tensors:
        raise RunDirError(f"`{lengths_file}` lists no tables; {RUN_FIX}")
    lengths: dict[str, torch.Tensor] = {}
    for path, entry in header.tensors.items():
        weight = model_header.tensors.get(f"{path}.weight")
        if weight is None:
            raise RunDirError(
                f"`{lengths_file}` names table `{path}` but `{model_file}` has no "
                f"`{path}.weight`; {RUN_FIX}"
            )
        if len(weight.shape) != 2:
            raise RunDirError(
                f"`{model_file}` tensor `{path}.weight` has shape {list(weight.shape)}, not (N, D)"
            )
        if entry.dtype not in ("I64", "I32"):
            raise RunDirError(f"`{lengths_file}` tensor `{path}` is {entry.dtype}, expected I64")
        tensor = read_tensor(lengths_file, entry)
        check_lengths(tensor, *weight.shape, f"`{lengths_file}` tensor `{path}`")
        lengths[path] = tensor.to(torch.int64)
    return lengths


def module_kinds(
    spec: Any, shapes: dict[str, tuple[int, ...]], model_file: Path
) -> dict[str, str]:
    """Module class name per table path, from the model spec built on the meta device.

    The state_dict alone cannot tell an Embedding from an EmbeddingBag. Building on ``meta``
    allocates no storage, so this stays cheap for tables larger than RAM. Building imports the
    spec's factory (user code), so it runs only when packing, never at import.
    """
    try:
        skeleton = build_model(spec, device="meta")
    except AmtlError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise RunDirError(
            f"`{model_file}`: cannot build its model spec to check the tables "
            f"({type(e).__name__}: {reason}); make the model's factory importable"
        ) from e
    kinds: dict[str, str] = {}
    for path, shape in shapes.items():
        try:
            module = skeleton.get_submodule(path)
        except AttributeError:
            module = None
        if isinstance(module, nn.EmbeddingBag):
            kinds[path] = "EmbeddingBag"
        elif isinstance(module, nn.Embedding):
            kinds[path] = "Embedding"
        else:
            raise RunDirError(
                f"`{model_file}`: the model spec has no Embedding/EmbeddingBag at `{path}`; "
                f"{RUN_FIX}"
            )
        dims = (module.num_embeddings, module.embedding_dim)
        if dims != tuple(shape):
            raise RunDirError(
                f"`{model_file}` tensor `{path}.weight` is {list(shape)} but the model spec "
                f"builds {list(dims)}; {RUN_FIX}"
            )
    return kinds


def read_rotations(
    header: Header, model_file: Path, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Table path -> its ``<path>.rotation`` tensor in the run's model file, if it has one."""
    return {
        path: read_tensor(model_file, header.tensors[f"{path}.rotation"])
        for path in shapes
        if f"{path}.rotation" in header.tensors
    }
