"""What a fine-tuning run hands back: its result, and the warnings it can raise on the way."""

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


class BudgetWarning(UserWarning):
    """No epoch met the memory budget: the run was written from the best epoch all the same.

    An epoch meets the budget when the warmup is over and no budgeted table's realized ratio
    is more than ``BUDGET_TOLERANCE`` over its R (keeping less than R meets it).
    ``metrics.json`` then says ``"budget_met": false`` and lists the tables that missed
    (``"budget_missed"``).

    Attributes:
        missed: module path -> ``{"target": R, "realized": ratio of the kept epoch}``.
        epoch: the kept epoch (1-based).
        during_warmup: the kept epoch ended before the warmup was over.
    """

    def __init__(
        self, missed: dict[str, dict[str, float]], epoch: int, during_warmup: bool = False
    ) -> None:
        self.missed, self.epoch, self.during_warmup = missed, epoch, during_warmup
        parts = [
            f"`{path}` kept {m['realized']:.3f} for a target of {m['target']:.3f} "
            f"({m['realized'] - m['target']:+.3f})"
            for path, m in missed.items()
        ]
        if during_warmup:
            parts.append("the budget was still warming up at its end")
        super().__init__(
            f"no epoch met the memory budget; kept epoch {epoch}: {'; '.join(parts)} - "
            "train for more epochs, lower `budget_warmup` or raise `target_ratio`"
        )


#: Share of a table's rows absent from the counted data above which ``finetune`` warns.
UNSEEN_SHARE = 0.5


class UnseenRowsWarning(UserWarning):
    """Most rows of a table never occur in the data the frequencies were counted on.

    Rows with the same count share one frequency and so one length: every unseen row gets the
    rarest rows' length, whatever the model learned for it. It happens when the fine-tuning
    data is a small share of what the model was trained on; the training data's counts
    (``counts_file``, docs/data.md) then give lengths that follow frequency.

    Attributes:
        unseen: module path -> (rows with count 0, rows of the table).
    """

    def __init__(self, unseen: dict[str, tuple[int, int]]) -> None:
        self.unseen = unseen
        tables = "; ".join(
            f"`{path}`: {zero:,} of {rows:,} rows ({100 * zero / rows:.1f} %)"
            for path, (zero, rows) in unseen.items()
        )
        super().__init__(
            f"{tables} never occur in the fine-tuning data, so they all get the rarest rows' "
            "length; if the model was trained on more data, pass that data's counts as "
            "`counts_file` (docs/data.md)"
        )
