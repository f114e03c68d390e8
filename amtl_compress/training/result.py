"""What a fine-tuning run hands back: its result, and the warning of a collapsed table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class FinetuneResult:
    """What :func:`~amtl_compress.training.finetune.finetune` produced.

    Attributes:
        run_dir: the run directory written (run_dir.py).
        metrics: the contents of its ``metrics.json``.
        lengths: module path -> int64 (N,) row lengths, as in ``lengths.safetensors``.
    """

    run_dir: Path
    metrics: dict[str, Any]
    lengths: dict[str, torch.Tensor]


class CollapseWarning(UserWarning):
    """Fine-tuning cut every row of a table to length 1: the AMTL layer collapsed.

    Such a table keeps one value per row, which is rarely what the budget asked for; it usually
    means the memory price or the learning rate of the AMTL layers was too high.
    """

    def __init__(self, tables: list[str]) -> None:
        self.tables = tables
        names = ", ".join(f"`{t}`" for t in tables)
        super().__init__(
            f"AMTL collapsed every row of {names} to length 1; raise `target_ratio` or lower "
            "`amtl_lr` and fine-tune again"
        )
