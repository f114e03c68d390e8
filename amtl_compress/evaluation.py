"""Side-by-side test metrics of a checkpoint, its fine-tuned run and its packed model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from amtl_compress.checkpoint import load_model
from amtl_compress.data.dataset import TabularData
from amtl_compress.lookup.load import load_packed_model
from amtl_compress.run_dir import RunDir
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
) -> list[EvalRow]:
    """AUC and logloss on ``test`` of each model given, in the order checkpoint, run, packed.

    Args:
        test: test data (Parquet or CSV).
        checkpoint: the original trained checkpoint.
        run_dir: a ``finetune`` run directory (its ``model.safetensors`` is the masked model).
        packed_dir: a ``pack`` output directory.
        factory: ``package.module:function`` for models whose files carry no spec.
    """
    data = TabularData.open(test, label=label)
    rows: list[EvalRow] = []
    sources = [
        ("checkpoint", checkpoint, lambda p: load_model(p, factory)[0]),
        ("fine-tuned", None if run_dir is None else RunDir(run_dir).model_file,
         lambda p: load_model(p, factory)[0]),
        ("packed", packed_dir, lambda p: load_packed_model(p, factory)),
    ]
    for name, path, build in sources:
        if path is None:
            continue
        path = Path(path)
        scores = evaluate(build(path), data.batches(batch_size))
        rows.append(EvalRow(name, path, scores["auc"], scores["logloss"], _disk_bytes(path)))
    return rows
