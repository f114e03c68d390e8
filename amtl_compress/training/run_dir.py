"""The run directory ``finetune`` writes (docs/design.md): its report and the atomic write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amtl_compress._io import atomic_directory, atomic_save_safetensors, atomic_write_text
from amtl_compress.checkpoint import save_checkpoint


def table_report(
    lengths: dict[str, torch.Tensor], fields: dict[str, str], dims: dict[str, int]
) -> tuple[dict[str, Any], float]:
    """Per-table summary for ``metrics.json`` and the overall kept fraction.

    Args:
        lengths: module path -> int64 (N,) row lengths in [1, D].
        fields: module path -> data column.
        dims: module path -> D.

    Returns:
        (module path -> {column, rows, dim, avg_kept_dim, memory_ratio, collapsed},
        kept values / all values over every table; 1.0 when there is none).
    """
    per_table: dict[str, Any] = {}
    kept = total = 0
    for path, lens in lengths.items():
        n, d = lens.numel(), dims[path]
        per_table[path] = {
            "column": fields[path],
            "rows": n,
            "dim": d,
            "avg_kept_dim": float(lens.double().mean()),
            "memory_ratio": float(lens.sum()) / (n * d),
            # Every row cut to one value: the layer collapsed (see CollapseWarning).
            "collapsed": bool(n and d > 1 and int(lens.max()) == 1),
        }
        kept += int(lens.sum())
        total += n * d
    return per_table, (kept / total if total else 1.0)


def write_run_dir(
    out: Path,
    overwrite: bool,
    model: nn.Module,
    spec: dict[str, Any],
    lengths: dict[str, torch.Tensor],
    amtl_state: dict[str, torch.Tensor],
    run_config: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """Write the five files of a run directory into ``out`` in one atomic directory swap.

    Args:
        model: the plain model after ``detach_amtl(merge=True)`` (any device).
        spec: its model spec (docs/design.md).
        lengths: module path -> int64 (N,).
        amtl_state: ``<module path>.<param>`` -> AMTL layer tensor.
        run_config, metrics: the JSON documents ``config.json`` and ``metrics.json``.
    """
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_checkpoint(tmp / "model.safetensors", model.state_dict(), spec)
        atomic_save_safetensors(lengths, tmp / "lengths.safetensors")
        atomic_save_safetensors(amtl_state, tmp / "amtl.safetensors")
        atomic_write_text(tmp / "config.json", json.dumps(run_config, indent=2))
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2))
