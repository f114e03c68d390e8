"""``amtl-compress demo``: the whole path on MovieLens-100k in a few minutes on 2 CPU cores.

Train the reference DLRM (the fixed-dimension baseline), fine-tune AMTL on user_id and item_id at
a memory budget, and compare both on the held-out test split.
"""

from __future__ import annotations

import os
from pathlib import Path

from amtl_compress.checkpoint import load_model
from amtl_compress.data.dataset import TabularData
from amtl_compress.data.movielens import build_ctr_dataset, fetch_movielens_100k
from amtl_compress.training.finetune import FinetuneConfig, finetune
from amtl_compress.training.loop import evaluate
from amtl_compress.training.train import TrainConfig, train_dlrm

DEMO_FIELDS = ("user_id", "item_id")


def run_demo(
    out: str | os.PathLike[str],
    target_ratio: float = 0.4,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[list[str]]:
    """Run the demo into ``out``; returns the before/after table as rows of strings."""
    out = Path(out)
    source = Path(data_dir) if data_dir is not None else fetch_movielens_100k()
    ctr = build_ctr_dataset(source, out / "data", seed=seed)
    base = out / "base.safetensors"
    train_dlrm(
        ctr.train, ctr.valid, base, TrainConfig(seed=seed), dlrm_config=ctr.dlrm_config(),
        progress=progress,
    )
    result = finetune(
        base, ctr.train, ctr.valid, out / "amtl",
        FinetuneConfig(fields={f: f for f in DEMO_FIELDS}, target_ratio=target_ratio, seed=seed),
        resume=False, overwrite=True, progress=progress,
    )
    test = TabularData.open(ctr.test)
    rows = [["model (test split)", "AUC", "logloss", *(f"avg dim {f}" for f in DEMO_FIELDS),
             "memory ratio"]]
    base_model, _ = load_model(base)
    dim = ctr.dlrm_config().embedding_dim
    scores = evaluate(base_model, test.batches(4096))
    rows.append(["FBE (trained)", f"{scores['auc']:.4f}", f"{scores['logloss']:.4f}",
                 *(f"{dim:.2f}" for _ in DEMO_FIELDS), "1.000"])
    tuned, _ = load_model(result.run_dir / "model.safetensors")
    scores = evaluate(tuned, test.batches(4096))
    tables = result.metrics["tables"]
    avg = {t["column"]: t["avg_kept_dim"] for t in tables.values()}
    rows.append([f"AMTL (budget {target_ratio:g})", f"{scores['auc']:.4f}",
                 f"{scores['logloss']:.4f}", *(f"{avg[f]:.2f}" for f in DEMO_FIELDS),
                 f"{result.metrics['memory_ratio']:.3f}"])
    return rows
