"""amtl-compress: shrink the embedding tables of trained recommendation models with AMTL.

The public API (imported lazily, so ``import amtl_compress`` stays cheap)::

    attach_amtl_(model, counts, AMTLConfig())   # wrap embedding tables in place
    budget = AMTLBudget(model, 0.4, total_steps=n)  # your own loop: loss + budget.penalty(),
                                                # budget.step() after each optimiser step
    detach_amtl(model)                          # -> (plain model, lengths per table)
    open_data(path)                             # one file in memory, or Parquet files streamed
    finetune(checkpoint, data, valid, out, FinetuneConfig(...))
    pack(run_dir, out_dir, dtype="float32")
    load_packed(model, packed_dir)              # drop-in PackedEmbedding / PackedEmbeddingBag
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AMTL": "amtl_compress.core.amtl",
    "AMTLConfig": "amtl_compress.core.amtl",
    "attach_amtl_": "amtl_compress.surgery.attach",
    "detach_amtl": "amtl_compress.surgery.attach",
    "AMTLBudget": "amtl_compress.training.budget",
    "FinetuneConfig": "amtl_compress.training.config",
    "finetune": "amtl_compress.training.finetune",
    "TrainConfig": "amtl_compress.training.config",
    "train_dlrm": "amtl_compress.training.train",
    "load_model": "amtl_compress.checkpoint",
    "count_frequencies": "amtl_compress.data.counts",
    "open_data": "amtl_compress.data.stream",
    "pack": "amtl_compress.storage.pack",
    "load_packed": "amtl_compress.lookup.load",
    "PackedEmbedding": "amtl_compress.lookup.modules",
    "PackedEmbeddingBag": "amtl_compress.lookup.modules",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'amtl_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
