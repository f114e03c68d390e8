"""Which fine-tuning recipe? Validation AUC on the planted task (bench/planted.py) per setting.

For one seed of the planted task (data and trained model as ``bench/quality.py --task synthetic``
builds them, cached under ``--work``), it fine-tunes with the bench's recipe (1 epoch over the
first 25 % of the training split, batch 65,536) at each learning rate given, and scores the
VALIDATION split (the bench reports the test split; choices are made here, never there):

- ``FBE fine-tuned``: the trained model, no AMTL, same steps and parameter groups (the tables
  at each lr, the rest at ``--finetune``'s ``dense_lr`` or finetune's default): what the
  recipe costs by itself;
- ``AMTL @R``: ``finetune`` at each ``--budgets`` ratio, with ``--amtl`` overrides; its
  frequencies counted on the fine-tuning share (what ``finetune`` does by default), or with
  ``--counts train`` on the whole training split (``counts_file``), as the tiers count them;
  the mean kept length per frequency group (G0..G6) of each table is printed to stderr;
- ``freq tiers @R``: the training-free bar of the bench, at AMTL's budget (value bytes);
- ``log count @R``: no tiers, every row its own ``clip(round(a log2(2 + count)), 1, D)``;
- ``planted dims @R``: the oracle, every row ``clip(round(a d(r)), 1, D)`` from the generator's
  true dims d(r) (truth.npz). Both bisect ``a`` to the same value bytes as the tiers.

    nice -n 10 .venv/bin/python scripts/recipe_probe.py --lrs 1e-2 3e-3 1e-3 --budgets 0.3 0.15
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import planted  # noqa: E402
import quality  # noqa: E402

from amtl_compress.checkpoint import load_model  # noqa: E402
from amtl_compress.core.amtl import AMTLConfig  # noqa: E402
from amtl_compress.training.finetune import FinetuneConfig, finetune  # noqa: E402
from amtl_compress.training.loop import evaluate  # noqa: E402


def valid_auc(model: torch.nn.Module, data: dict) -> float:
    return evaluate(model.eval(), data["valid"].batches(65_536))["auc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", type=float, nargs="*", default=[1e-2, 3e-3, 1e-3])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.15])
    parser.add_argument("--amtl", default="{}", help="JSON overrides of AMTLConfig")
    parser.add_argument("--finetune", default="{}", help="JSON overrides of FinetuneConfig")
    parser.add_argument("--skip-fbe", action="store_true")
    parser.add_argument("--counts", choices=("finetune", "train"), default="finetune",
                        help="where AMTL's frequencies are counted (default: its own data)")
    parser.add_argument("--tiny", action="store_true", help="planted.TINY sizes (smoke run)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recipe_probe"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work / f"seed-{args.seed}"
    data = quality.prepare_synthetic(args.seed, work, args.tiny, reuse=True)
    if args.tiny:
        data["batch"] = 512
    rows = [("FBE (trained)", "-", valid_auc(load_model(data["base"])[0], data))]
    dense_bytes = sum(data["rows"][f] * data["dim"] * 4 for f in quality.FIELDS)
    for budget in args.budgets:
        lengths = quality.tier_rule(int(budget * dense_bytes), data["counts"], data["dim"])
        model = planted.pca_truncated(load_model(data["base"])[0], lengths)
        rows.append((f"freq tiers @{budget:g}", "-", valid_auc(model, data)))
        truth = np.load(Path(data["ctr"].train).parent / "truth.npz")
        for name, weights in (
                ("log count", {f: torch.log2(2.0 + data["counts"][f].double())
                               for f in quality.FIELDS}),
                ("planted dims", {f: torch.from_numpy(truth[f"dims_{f}"]).double()
                                  for f in quality.FIELDS})):
            lengths = quality.lengths_within(weights, int(budget * dense_bytes), data["dim"])
            model = planted.pca_truncated(load_model(data["base"])[0], lengths)
            rows.append((f"{name} @{budget:g}", "-", valid_auc(model, data)))
    amtl = AMTLConfig(**json.loads(args.amtl))
    overrides = json.loads(args.finetune)  # FinetuneConfig fields; dense_lr applies to FBE too
    counts_file = None
    if args.counts == "train":
        counts_file = work / "train-counts.safetensors"
        save_file({f: data["counts"][f] for f in quality.FIELDS}, str(counts_file))
    for lr in args.lrs:
        if not args.skip_fbe:
            start = time.time()
            tuned = quality.fit_same_steps(load_model(data["base"])[0], data, args.seed, lr=lr,
                                           dense_lr=overrides.get("dense_lr"))
            rows.append(("FBE fine-tuned", f"{lr:g}", valid_auc(tuned, data)))
            print(f"  FBE lr {lr:g}: {rows[-1][2]:.4f} ({time.time() - start:.0f} s)",
                  file=sys.stderr)
        for budget in args.budgets:
            start = time.time()
            config = FinetuneConfig(
                fields={f: f for f in quality.FIELDS}, target_ratio=budget, seed=args.seed,
                epochs=data["epochs"], batch_size=data["batch"], save_every=10**9, lr=lr,
                amtl=amtl, **overrides)
            result = finetune(data["base"], data["ft_train_path"], data["ctr"].valid,
                              work / "run", config, resume=False, overwrite=True,
                              progress=False, counts_file=counts_file)
            best = result.metrics["best_epoch"]
            auc = next(e["auc"] for e in result.metrics["epochs"] if e["epoch"] == best)
            rows.append((f"AMTL @{budget:g}", f"{lr:g}", auc))
            epochs = " ".join(f"{e['epoch']}: {e['auc']:.4f}" for e in result.metrics["epochs"])
            print(f"    epochs (valid AUC) {epochs}; kept {best}", file=sys.stderr)
            for table, report in result.metrics["tables"].items():
                groups = " ".join(f"{x:.1f}" for x in report["kept_dim_by_frequency_group"])
                print(f"    {table}: G0..G6 {groups}", file=sys.stderr)
            print(f"  AMTL @{budget:g} lr {lr:g}: {auc:.4f} ({time.time() - start:.0f} s)",
                  file=sys.stderr)
    print(f"planted seed {args.seed}, amtl={args.amtl} finetune={args.finetune} "
          "(validation AUC; the trained model first)")
    for name, lr, auc in rows:
        print(f"  {name:18s} lr {lr:>6s}  valid AUC {auc:.4f}  vs trained "
              f"{auc - rows[0][2]:+.4f}")


if __name__ == "__main__":
    main()
