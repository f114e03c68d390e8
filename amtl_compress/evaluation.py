"""Side-by-side test metrics of a checkpoint, its fine-tuned run and its packed model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from amtl_compress.checkpoint import CALL_KEYS, load_model
from amtl_compress.data.dataset import TabularData
from amtl_compress.lookup.load import load_packed_model, resolve_device
from amtl_compress.models.adapters.call import (
    adapter_list_padding,
    check_model_call,
    first_batch,
    recorded_output,
    resolve_adapter,
)
from amtl_compress.run_dir import RunDir
from amtl_compress.storage.manifest import read_manifest
from amtl_compress.training.loop import evaluate


@dataclass(frozen=True)
class EvalRow:
    """Test metrics of one model. ``bytes`` counts its weight files on disk."""

    name: str
    path: Path
    auc: float
    logloss: float
    bytes: int


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def compare(
    test: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    packed_dir: str | os.PathLike[str] | None = None,
    factory: str | None = None,
    label: str = "label",
    batch_size: int = 4096,
    adapter: str | None = None,
    output: str | None = None,
    device: str = "cpu",
) -> list[EvalRow]:
    """AUC and logloss on ``test`` of each model given, in the order checkpoint, run, packed.

    Args:
        test: test data (Parquet or CSV).
        checkpoint: the original trained checkpoint.
        run_dir: a ``finetune`` run directory (its ``model.safetensors`` is the masked model).
        packed_dir: a ``pack`` output directory.
        factory: ``package.module:function`` for models whose files carry no spec.
        adapter, output: how to call the models and what they return, as in ``finetune``; None
            or ``"auto"``: what each file's model spec records, else detected.
        device: where the models run, e.g. ``"cuda"`` (packed tables then use the Triton
            lookup kernels); checked before anything is read.

    Raises:
        ConfigError: ``device`` is not one this process can use (e.g. no CUDA).
    """
    target = resolve_device(device)
    rows: list[EvalRow] = []
    opened: dict[int, TabularData] = {}  # list padding -> the test data opened with it

    def packed(p: Path) -> tuple[nn.Module, dict[str, Any]]:
        spec = read_manifest(p).model
        if factory is not None:  # as load_model: the factory builds, the spec says how to call
            spec = {"kind": "factory", "factory": factory,
                    **{k: spec[k] for k in CALL_KEYS if isinstance(spec, dict) and k in spec}}
        return load_packed_model(p, factory, device=target), spec

    def dense(p: Path) -> tuple[nn.Module, dict[str, Any]]:
        model, spec = load_model(p, factory)
        return model.to(target), spec

    sources = [
        ("checkpoint", checkpoint, dense),
        ("fine-tuned", None if run_dir is None else RunDir(run_dir).model_file, dense),
        ("packed", packed_dir, packed),
    ]
    for name, path, build in sources:
        if path is None:
            continue
        path = Path(path)
        model, spec = build(path)
        chosen = resolve_adapter(model, adapter, spec)
        padding = adapter_list_padding(chosen)
        if padding not in opened:
            opened[padding] = TabularData.open(test, label=label, list_padding=padding)
        data = opened[padding]
        batch = {k: v.to(target)
                 for k, v in first_batch(data.batches(min(batch_size, 1024))).items()}
        given = recorded_output(output, spec if isinstance(spec, dict) else None)
        call, _ = check_model_call(model, chosen, batch, given)
        scores = evaluate(model, data.batches(batch_size), call=call)
        rows.append(EvalRow(name, path, scores["auc"], scores["logloss"], _disk_bytes(path)))
    return rows
