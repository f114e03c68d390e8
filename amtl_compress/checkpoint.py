"""Reading and writing weights: safetensors first, ``.pt`` only with ``weights_only=True``.

A pickle can run code when it is loaded, so ``.pt``/``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
Checkpoints this tool writes are safetensors with the model spec (docs/design.md) in their
metadata under ``amtl_compress.model``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from amtl_compress._io import atomic_save_safetensors
from amtl_compress.errors import CheckpointError
from amtl_compress.models.factory import build_model, check_factory
from amtl_compress.surgery.rotate import rotate_tables_, rotations_in

SPEC_KEY = "amtl_compress.model"
#: Model spec keys that say how the model is called, beside how it is built (docs/design.md).
CALL_KEYS = ("adapter", "output")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_MAX_KEYS_SHOWN = 3


def load_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state_dict from ``.safetensors`` or (weights only) ``.pt``/``.pth``/``.bin``.

    A pickle may hold the state_dict itself or a dict with a ``"state_dict"`` key (as
    facebookresearch/dlrm's ``dlrm_s_pytorch.py --save-model`` writes it: its other entries,
    optimizer state and numpy-scalar metrics, are read and ignored). Only tensors, plain
    containers and numpy scalars are unpickled. Tensors are loaded on the CPU.

    Returns:
        (state_dict, metadata): parameter name -> tensor, and the safetensors metadata ({} for
        pickles).

    Raises:
        CheckpointError: missing file, unknown suffix, unreadable or corrupt file, a pickle that
            holds more than weights (refused unread: it could run code), non-tensor values.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"checkpoint `{p}` has an unknown suffix `{suffix or '(none)'}`: "
            "use `.safetensors` (preferred) or a torch.save file `.pt`/`.pth`/`.bin`"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint `{p}` does not exist: check the path")
    if suffix == ".safetensors":
        return _load_safetensors(p)
    return _load_pickle(p), {}


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())  # safe_open is not iterable
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors' Rust errors share no public base class
        raise CheckpointError(
            f"cannot read checkpoint `{path}` as safetensors ({_first_line(exc)}): "
            "the file is corrupt or truncated; write it again"
        ) from None


def _numpy_scalar_globals() -> list[Any]:
    """The numpy globals that numpy scalars in a pickle ask for, and nothing else.

    dlrm_s_pytorch.py saves its metrics (``test_acc``, ``train_loss``) as numpy scalars, which
    unpickle as ``numpy._core.multiarray.scalar(numpy.dtype(...), bytes)`` (``numpy.core...``
    when written by numpy 1.x): these build a number from its bytes and run no other code. Arrays
    (``_reconstruct``, ``ndarray``) stay refused.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtype_classes = {type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"}
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *sorted(dtype_classes, key=lambda c: c.__name__),
    ]


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only, plus numpy scalars (dlrm's metrics); everything else stays refused.
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only turns everything but tensors and plain containers into this error.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"`{found.group(1)}`" if found else "objects other than tensors"
        raise CheckpointError(
            f"refused to unpickle `{path}`: it asks for {what}, and unpickling that may run "
            "code; convert it to safetensors in a trusted environment, or save only "
            "`model.state_dict()`"
        ) from None
    except Exception as exc:  # zip, EOF and storage errors all mean an unreadable file
        raise CheckpointError(
            f"cannot read checkpoint `{path}` ({type(exc).__name__}: {_first_sentence(exc)}): "
            "the file is corrupt or not a torch.save file"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint `{path}` holds a `{type(obj).__name__}`, not a state_dict: "
            "save `model.state_dict()` (or a dict with a `state_dict` key)"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint `{path}` entry `{key}` holds a `{type(value).__name__}`, not a "
                "tensor: save `model.state_dict()` (or a dict with a `state_dict` key)"
            )
    return dict(obj)


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    model_spec: dict[str, Any] | None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``state_dict`` to a safetensors file atomically, with the model spec in metadata.

    Tensors that share storage (tied weights) are cloned, since safetensors stores each tensor's
    bytes once and refuses aliases; loading them back into the model re-ties nothing but loads
    equal values into each name.

    Args:
        path: the output file; ``.safetensors`` suffix required.
        state_dict: name -> tensor (any device; written from the CPU).
        model_spec: the spec (``models.factory.model_spec_for``) stored as JSON under the metadata
            key ``amtl_compress.model``, or None to store none.
        metadata: extra string -> string metadata.

    Raises:
        CheckpointError: a suffix other than ``.safetensors``.
        ValueError: non-string metadata, or metadata that uses the spec key.
    """
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"cannot save checkpoint `{p}`: this tool writes safetensors only; "
            "name the file `*.safetensors`"
        )
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"checkpoint metadata `{k}` must map str to str, got {type(v)}")
    if SPEC_KEY in meta:
        raise ValueError(f"metadata key `{SPEC_KEY}` is reserved: pass the spec as model_spec")
    if model_spec is not None:
        meta[SPEC_KEY] = json.dumps(model_spec)  # key order kept: it fixes the field order
    atomic_save_safetensors(_untie(state_dict), p, metadata=meta or None)


def _untie(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for name, t in state_dict.items():
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        # Any second view of one storage (a tied weight, a slice) gets its own copy.
        out[name] = t.clone() if storage in seen and t.numel() else t
        seen.add(storage)
    return out


def load_model(
    path: str | os.PathLike[str], factory: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint belongs to and load its weights strictly.

    The model comes from ``factory`` (``"package.module:function"``) if given, else from the
    spec in the checkpoint's metadata; with both, the returned spec keeps what the stored one
    records of the model's call (``adapter``, ``output``: models/adapters/call.py). A table with
    a ``<path>.rotation`` key in the file (a run fine-tuned with ``AMTLConfig(ordering="pca")``)
    becomes a ``RotatedEmbedding(Bag)``.

    Returns:
        (model, spec): the model in eval mode on the CPU, and the spec that rebuilds it.

    Raises:
        CheckpointError: as :func:`load_state_dict`; no spec and no factory; a spec that cannot
            be built; missing or unexpected keys or shape mismatches (first few named).
    """
    state, metadata = load_state_dict(path)
    if factory is not None:
        check_factory(factory)
        spec: dict[str, Any] = {"kind": "factory", "factory": factory}
        try:
            stored = json.loads(metadata.get(SPEC_KEY, "{}"))
        except json.JSONDecodeError:
            stored = {}
        if isinstance(stored, dict):
            spec.update({k: stored[k] for k in CALL_KEYS if isinstance(stored.get(k), str)})
    elif SPEC_KEY in metadata:
        try:
            spec = json.loads(metadata[SPEC_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(
                f"checkpoint `{path}` has a model spec that is not JSON: "
                "pass `model_factory=package.module:function`"
            ) from None
        if not isinstance(spec, dict):
            raise CheckpointError(
                f"checkpoint `{path}` has a model spec that is not a JSON object: "
                "pass `model_factory=package.module:function`"
            )
    else:
        raise CheckpointError(
            f"checkpoint `{path}` does not say how to build its model (no `{SPEC_KEY}` "
            "metadata): pass `model_factory=package.module:function`"
        )
    model = build_model(spec)
    # A model fine-tuned with dimension ordering saves `<table>.rotation` (core/rotation.py).
    rotate_tables_(model, rotations_in(state, model))
    _check_fits(model, state, path)
    model.load_state_dict(state, strict=True)
    return model.eval(), spec


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], path: object) -> None:
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    shapes = [
        f"`{k}` is {tuple(state[k].shape)} in the file but {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:
        more = f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""
        problems.append(shapes[0] + more)
    if problems:
        raise CheckpointError(
            f"checkpoint `{path}` does not fit its model: {'; '.join(problems)}. "
            "Pass the `model_factory=package.module:function` that built this checkpoint"
        )


def _some(keys: list[str]) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:_MAX_KEYS_SHOWN])
    return shown + (
        f" (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    )


@dataclass(frozen=True)
class TableInfo:
    """One embedding table, as ``inspect`` lists it.

    Attributes:
        name: module path, e.g. ``embeddings.user_id`` (no ``.weight``).
        rows: N.
        dim: D.
        dtype: the weight's dtype, e.g. ``"float32"``.
        bytes: N * D * element size, in bytes.
        kind: ``"Embedding"``, ``"EmbeddingBag"``, or ``"unknown"`` (guessed from a bare
            state_dict).
    """

    name: str
    rows: int
    dim: int
    dtype: str
    bytes: int
    kind: str


def embedding_tables(
    source: nn.Module | Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> list[TableInfo]:
    """List the embedding tables of a model or a state_dict, in module order.

    - ``source`` a model: every ``nn.Embedding`` / ``nn.EmbeddingBag`` module.
    - ``source`` a state_dict and ``model`` given: ``<path>.weight`` tensors whose module in
      ``model`` is an embedding; sizes come from the state_dict.
    - ``source`` a state_dict alone (best effort): 2-D ``<path>.weight`` tensors whose module path
      has a part containing ``emb`` (case-insensitive), kind ``"unknown"``.
    """
    if isinstance(source, nn.Module):
        return [
            _info(name, m.weight, type(m).__name__)
            for name, m in source.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        ]
    tables = []
    modules = dict(model.named_modules()) if model is not None else None
    for key, t in source.items():
        if not key.endswith(".weight") or t.dim() != 2:
            continue
        name = key[: -len(".weight")]
        if modules is not None:
            m = modules.get(name)
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                tables.append(_info(name, t, type(m).__name__))
        elif any("emb" in part.lower() for part in name.split(".")):
            tables.append(_info(name, t, "unknown"))
    return tables


def _info(name: str, weight: torch.Tensor, kind: str) -> TableInfo:
    rows, dim = weight.shape
    return TableInfo(
        name=name,
        rows=int(rows),
        dim=int(dim),
        dtype=str(weight.dtype).removeprefix("torch."),
        bytes=int(rows * dim * weight.element_size()),
        kind=kind,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _first_sentence(exc: BaseException) -> str:
    # torch's messages continue with advice that does not apply here (e.g. weights_only=False).
    return _first_line(exc).split(". ")[0].rstrip(".")
