"""The run directory contract: what ``finetune`` writes and ``pack``, ``eval`` and the demo read.

A run directory ``<out>`` holds exactly five files (docs/design.md):

- ``model.safetensors``: the fine-tuned model with AMTL merged in (every value past a row's
  length is zero), with its model spec in the metadata key :data:`SPEC_KEY`;
- ``lengths.safetensors``: module path -> int64 (N,) row lengths in [1, D];
- ``amtl.safetensors``: ``<module path>.<param>`` -> the AMTL layers' tensors;
- ``config.json``: what the run was asked (paths, model spec, tables, the FinetuneConfig);
- ``metrics.json``: what it measured (scores before/after, epochs, per-table ratios).

An interrupted run leaves its resumable state beside it, in ``<out>.resume`` (:func:`resume_dir`),
whose :data:`STATE_FILE` is the one file a resume reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from amtl_compress._io import atomic_directory, atomic_save_safetensors, atomic_write_text
from amtl_compress.checkpoint import SPEC_KEY, save_checkpoint
from amtl_compress.core.frequency import frequency_group_means, rank_correlation
from amtl_compress.errors import RunDirError

__all__ = [
    "AMTL_FILE", "CONFIG_FILE", "LENGTHS_FILE", "METRICS_FILE", "MODEL_FILE", "RESUME_SUFFIX",
    "RUN_FILES", "RUN_FIX", "SPEC_KEY", "STATE_COPY", "STATE_FILE", "RunDir", "resume_dir",
    "table_report", "write_run_dir",
]

MODEL_FILE = "model.safetensors"
LENGTHS_FILE = "lengths.safetensors"
AMTL_FILE = "amtl.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
#: The five files of a run directory, in the order they are written.
RUN_FILES = (MODEL_FILE, LENGTHS_FILE, AMTL_FILE, CONFIG_FILE, METRICS_FILE)

#: ``<out>`` + this suffix is the directory of an interrupted run's resumable state.
RESUME_SUFFIX = ".resume"
#: The resumable state (tensors, with the progress JSON in its metadata) in the resume directory.
STATE_FILE = "state.safetensors"
#: A readable copy of the progress JSON, written after :data:`STATE_FILE`; never read back.
STATE_COPY = "state.json"

#: The fix a reader's error gives for an incomplete run directory.
RUN_FIX = "re-run `finetune` to write a complete run directory"


def resume_dir(out: str | os.PathLike[str]) -> Path:
    """Where a run writing ``out`` keeps its resumable state: ``<out>.resume``, a sibling."""
    out = Path(out)
    return out.with_name(out.name + RESUME_SUFFIX)


class RunDir:
    """A run directory to read; no file is opened until asked for.

    ``RunDir(path).model_file`` etc. are the paths of the five files; :meth:`check` says which
    are missing; ``read_*`` load them.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def lengths_file(self) -> Path:
        return self.path / LENGTHS_FILE

    @property
    def amtl_file(self) -> Path:
        return self.path / AMTL_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def check(self, *names: str) -> RunDir:
        """Raise RunDirError unless the directory exists with the files ``names`` (default: all
        five) in it; returns ``self``."""
        if not self.path.is_dir():
            raise RunDirError(
                f"run directory `{self.path}` does not exist; pass the `out` of `finetune`"
            )
        for name in names or RUN_FILES:
            if not (self.path / name).is_file():
                raise RunDirError(f"`{self.path}` has no `{name}`; {RUN_FIX}")
        return self

    def read_lengths(self) -> dict[str, torch.Tensor]:
        """module path -> int64 (N,) row lengths."""
        return load_file(str(self.check(LENGTHS_FILE).lengths_file))

    def read_config(self) -> dict[str, Any]:
        """The parsed ``config.json``."""
        return _read_json(self.check(CONFIG_FILE).config_file)

    def read_metrics(self) -> dict[str, Any]:
        """The parsed ``metrics.json``."""
        return _read_json(self.check(METRICS_FILE).metrics_file)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RunDirError(f"`{path}` is not valid JSON ({exc}); {RUN_FIX}") from None


def table_report(
    lengths: dict[str, torch.Tensor],
    fields: dict[str, str],
    dims: dict[str, int],
    counts: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], float]:
    """Per-table summary for ``metrics.json`` and the overall kept fraction.

    Args:
        lengths: module path -> int64 (N,) row lengths in [1, D].
        fields: module path -> data column.
        dims: module path -> D.
        counts: module path -> int64 (N,) training counts; adds how kept length follows them.

    Returns:
        (module path -> {column, rows, dim, avg_kept_dim, memory_ratio, collapsed} plus, with
        ``counts``, ``kept_dim_by_frequency_group`` (G0 rarest .. G6 most frequent rows, the
        paper's Fig. 3), ``spearman_with_count`` and ``unseen_rows`` (rows with count 0);
        kept values / all values over every table, 1.0 when there is none).
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
        if counts is not None:
            count = counts[path].to(lens.device)
            per_table[path]["kept_dim_by_frequency_group"] = frequency_group_means(lens, count)
            per_table[path]["spearman_with_count"] = rank_correlation(lens, count)
            per_table[path]["unseen_rows"] = int((count == 0).sum())
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
        spec: its model spec (docs/design.md), stored under :data:`SPEC_KEY`.
        lengths: module path -> int64 (N,).
        amtl_state: ``<module path>.<param>`` -> AMTL layer tensor.
        run_config, metrics: the JSON documents ``config.json`` and ``metrics.json``.
    """
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_checkpoint(tmp / MODEL_FILE, model.state_dict(), spec)
        atomic_save_safetensors(lengths, tmp / LENGTHS_FILE)
        atomic_save_safetensors(amtl_state, tmp / AMTL_FILE)
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(run_config, indent=2))
        atomic_write_text(tmp / METRICS_FILE, json.dumps(metrics, indent=2))
