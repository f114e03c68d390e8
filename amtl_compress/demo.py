"""``amtl-compress demo``: the whole path on MovieLens-100k, a few minutes on two CPU cores.

Train the reference DLRM (the fixed-dimension baseline), fine-tune AMTL on user_id and item_id at
a memory budget, pack the result in float32 and int8, and compare all of them on the held-out
test split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from amtl_compress.checkpoint import load_model
from amtl_compress.core.frequency import NUM_FREQUENCY_GROUPS
from amtl_compress.data.dataset import TabularData
from amtl_compress.data.movielens import build_ctr_dataset, fetch_movielens_100k
from amtl_compress.lookup.load import load_packed_model
from amtl_compress.models.dlrm import dlrm_config_for
from amtl_compress.run_dir import RunDir
from amtl_compress.storage.pack import pack
from amtl_compress.training.config import FinetuneConfig, TrainConfig
from amtl_compress.training.finetune import finetune
from amtl_compress.training.loop import evaluate
from amtl_compress.training.train import train_dlrm

DEMO_FIELDS = ("user_id", "item_id")


@dataclass(frozen=True)
class DemoTables:
    """What the demo prints, as rows of strings.

    ``comparison``: test AUC, logloss, average kept dims and table bytes of the trained model,
    the fine-tuned one and its packed forms. Table bytes count the user_id and item_id tables
    only: dense float32 for the trained and the fine-tuned (masked, not yet packed) models, the
    packed files' values + offsets (+ int8 scale/bias) for the packed ones.

    ``kept_by_frequency``: per table, the mean kept length of G0 (rarest rows) .. G6 (most
    frequent rows) and Spearman's rho between kept length and training count (the paper's
    Fig. 3; metrics.json of the run holds the same figures).
    """

    comparison: list[list[str]]
    kept_by_frequency: list[list[str]]


def run_demo(
    out: str | os.PathLike[str],
    target_ratio: float = 0.4,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DemoTables:
    """Run the demo into ``out``; returns the tables it prints (:class:`DemoTables`)."""
    out = Path(out)
    source = Path(data_dir) if data_dir is not None else fetch_movielens_100k()
    ctr = build_ctr_dataset(source, out / "data", seed=seed)
    base = out / "base.safetensors"
    train_dlrm(
        ctr.train, ctr.valid, base, TrainConfig(seed=seed), dlrm_config=dlrm_config_for(ctr),
        progress=progress,
    )
    result = finetune(
        base, ctr.train, ctr.valid, out / "amtl",
        FinetuneConfig(fields={f: f for f in DEMO_FIELDS}, target_ratio=target_ratio, seed=seed),
        resume=False, overwrite=True, progress=progress,
    )
    reports = {
        dtype: pack(result.run_dir, out / f"packed-{dtype}", dtype=dtype, overwrite=True,
                    progress=progress)
        for dtype in ("float32", "int8")
    }
    test = TabularData.open(ctr.test)
    tables = result.metrics["tables"]
    dense_bytes = sum(t["rows"] * t["dim"] * 4 for t in tables.values())
    avg = {t["column"]: f"{t['avg_kept_dim']:.2f}" for t in tables.values()}
    dim = str(dlrm_config_for(ctr).embedding_dim)
    models = [
        ("FBE (trained)", load_model(base)[0], [dim] * len(DEMO_FIELDS), dense_bytes),
        (f"AMTL (budget {target_ratio:g})", load_model(RunDir(result.run_dir).model_file)[0],
         [avg[f] for f in DEMO_FIELDS], dense_bytes),
    ]
    for dtype, report in reports.items():
        models.append((f"  packed {dtype}", load_packed_model(report.out_dir),
                       [avg[f] for f in DEMO_FIELDS], report.bytes_after))
    rows = [["model (test split)", "AUC", "logloss", *(f"avg dim {f}" for f in DEMO_FIELDS),
             "table bytes", "bytes ratio"]]
    for name, model, dims, nbytes in models:
        scores = evaluate(model, test.batches(4096))
        rows.append([name, f"{scores['auc']:.4f}", f"{scores['logloss']:.4f}", *dims,
                     f"{nbytes:,}", f"{nbytes / dense_bytes:.3f}"])
    groups = [["kept dims by training count", *(f"G{i}" for i in range(NUM_FREQUENCY_GROUPS)),
               "Spearman"]]
    for table in tables.values():
        groups.append([table["column"], *(f"{g:.2f}" for g in table["kept_dim_by_frequency_group"]),
                       f"{table['spearman_with_count']:.2f}"])
    return DemoTables(comparison=rows, kept_by_frequency=groups)
