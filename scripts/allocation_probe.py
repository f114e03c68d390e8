"""Does kept length follow frequency? One fine-tune per seed, scored on the VALIDATION split.

For every AMTL table of the run it prints Spearman's rho between each row's kept length and its
training count, the mean kept length of the 7 frequency groups G0..G6 (rows sorted by count and
split into 7 equal groups, as the paper's Fig. 3), and the best epoch's validation AUC.

    .venv/bin/python scripts/allocation_probe.py --task movielens --seeds 0 1 2
    .venv/bin/python scripts/allocation_probe.py --task synthetic --seeds 0 1 2 \
        --amtl '{"head": "plain"}'

MovieLens: the demo's data split and trained DLRM for each seed (``amtl-compress demo`` does the
same), cached under ``--work``; then ``finetune`` at budget 0.4 with the demo's defaults plus
the overrides given. Synthetic: the tests' fixture (tests/conftest.py: make_synthetic_ctr with
6000 rows, 400 users, 200 items, data seed 0; the DLRM trained 2 epochs at D = 8); only the
fine-tune's seed changes. dlrm_net: the DLRM_Net-interface task of docs/dlrm.md
(tests/dlrm_net.py, what ``bench/dlrm.py --seed S`` trains), fine-tuned through the dlrm adapter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from amtl_compress.core.amtl import AMTL, AMTLConfig
from amtl_compress.core.budget import solve_price
from amtl_compress.core.frequency import (
    NUM_FREQUENCY_GROUPS,
    frequency_group_means,
    rank_correlation,
)
from amtl_compress.data.counts import count_frequencies
from amtl_compress.training.config import FinetuneConfig, TrainConfig
from amtl_compress.training.finetune import finetune
from amtl_compress.training.train import train_dlrm


def prepare(task: str, seed: int, work: Path):
    """(splits, base checkpoint) of one seed, trained once and cached."""
    if task == "dlrm_net":
        from types import SimpleNamespace

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from dlrm_net import build_dlrm_net, make_dlrm_data, save_like_dlrm, train_like_dlrm

        root = work / f"dlrm_net-{seed}"
        base = root / "dlrm.pt"
        if not base.exists():  # what bench/dlrm.py --seed S trains
            make_dlrm_data(root, num_rows=20_000, seed=seed)
            torch.manual_seed(seed)
            model = build_dlrm_net()
            save_like_dlrm(model, train_like_dlrm(model, root / "train.parquet", seed=seed), base)
        return SimpleNamespace(train=root / "train.parquet", valid=root / "valid.parquet"), base
    if task == "movielens":
        from amtl_compress.data.movielens import build_ctr_dataset, fetch_movielens_100k
        from amtl_compress.models.dlrm import dlrm_config_for

        root = work / f"movielens-{seed}"
        ctr = build_ctr_dataset(fetch_movielens_100k(), root / "data", seed=seed)
        base = root / "base.safetensors"
        if not base.exists():
            train_dlrm(ctr.train, ctr.valid, base, TrainConfig(seed=seed),
                       dlrm_config=dlrm_config_for(ctr), progress=False)
        return ctr, base
    from amtl_compress.data.synthetic import make_synthetic_ctr

    root = work / "synthetic"
    ctr = make_synthetic_ctr(root / "data", num_rows=6000, num_users=400, num_items=200, seed=0)
    base = root / "base.safetensors"
    if not base.exists():
        torch.set_num_threads(1)
        train_dlrm(ctr.train, ctr.valid, base,
                   TrainConfig(embedding_dim=8, epochs=2, batch_size=512), progress=False)
    return ctr, base


def prior_reach(dim: int, ratios: tuple[float, ...] = (0.5, 0.3, 0.15)) -> None:
    """How far the frequency prior can move one row's length at the start of a budgeted run.

    For a fresh layer of width ``dim`` (every row on the warm-start ramp), the budget price mu
    that keeps each ratio, and the length a row keeps at mu, and at mu -/+ the prior's full
    reach (frequency_prior * B, B = the ramp's last step times D): the most frequent / rarest
    rows.
    """
    config = AMTLConfig()
    layer = AMTL(torch.tensor([1]), dim, config)
    logits = layer.logits(torch.tensor([0])).detach()
    ramp = layer.h_aml[-1].bias.detach().double()
    reach = config.frequency_prior * dim * float(ramp[-1] - ramp[-2])
    grid = torch.arange(1, dim + 1) / dim

    def length(price: float) -> int:
        return int((logits[0] - price * grid).argmax()) + 1

    print(f"D = {dim}: prior reach +-{reach:.3f}")
    for r in ratios:
        mu = solve_price(logits, torch.tensor([1]), r)
        print(f"  R = {r}: mu = {mu:.3f}; kept length {length(mu - reach)} (most frequent) / "
              f"{length(mu)} / {length(mu + reach)} (rarest)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("movielens", "synthetic", "dlrm_net"),
                        default="movielens")
    parser.add_argument("--prior-reach", type=int, metavar="D", default=None,
                        help="only print how far the frequency prior moves a row of width D")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--amtl", default="{}", help="JSON overrides of AMTLConfig")
    parser.add_argument("--budget-weight", type=float, default=None)
    parser.add_argument("--target-ratio", type=float, default=0.4)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--finetune", default="{}", help="JSON overrides of FinetuneConfig")
    parser.add_argument("--work", type=Path, default=Path("/tmp/allocation_probe"))
    args = parser.parse_args()
    if args.prior_reach is not None:
        prior_reach(args.prior_reach)
        return
    torch.set_num_threads(1)
    amtl = AMTLConfig(**json.loads(args.amtl))
    fields = ("user_id", "item_id")
    targets = {f: f for f in fields}
    extra_args = {}
    if args.task == "dlrm_net":  # docs/dlrm.md's model, through its adapter
        fields = tuple(f"cat_{i}" for i in range(4))
        targets = {f"emb_l.{i}": f for i, f in enumerate(fields)}
        extra_args = {"model_factory": "dlrm_net:build_dlrm_net", "adapter": "dlrm"}
    rows = []
    for seed in args.seeds:
        ctr, base = prepare(args.task, seed, args.work)
        extra = {}
        if args.budget_weight is not None:
            extra["budget_weight"] = args.budget_weight
        if args.epochs is not None:
            extra["epochs"] = args.epochs
        elif args.task == "synthetic":
            extra.update(epochs=2, batch_size=256)
        extra.update(json.loads(args.finetune))
        config = FinetuneConfig(fields=targets, target_ratio=args.target_ratio,
                                seed=seed, amtl=amtl, **extra)
        result = finetune(base, ctr.train, ctr.valid, args.work / "run", config,
                          resume=False, overwrite=True, progress=False, **extra_args)
        best = result.metrics["best_epoch"]
        auc = next(e["auc"] for e in result.metrics["epochs"] if e["epoch"] == best)
        line = {"seed": seed, "valid_auc": auc}
        state = load_file(str(Path(result.run_dir) / "amtl.safetensors"))
        for path, lengths in result.lengths.items():
            column = result.metrics["tables"][path]["column"]
            dim = int(result.metrics["tables"][path]["dim"])
            counts = count_frequencies(ctr.train, column, lengths.numel())
            line[column] = {
                "rho": rank_correlation(lengths, counts),
                "groups": frequency_group_means(lengths, counts),
                "ratio": float(lengths.double().mean()) / dim,
                # the price head's learned weight on the frequency prior, per branch
                "slope": [float(v) for k, v in sorted(state.items())
                          if k.startswith(path + ".") and k.endswith(".slope")],
            }
        rows.append(line)
        print(json.dumps(line), file=sys.stderr)
    print(f"task={args.task} amtl={args.amtl} finetune={args.finetune} "
          f"budget_weight={args.budget_weight} "
          f"seeds={args.seeds}")
    for f in fields:
        rhos = [r[f]["rho"] for r in rows]
        groups = [statistics.mean(r[f]["groups"][g] for r in rows)
                  for g in range(NUM_FREQUENCY_GROUPS)]
        print(f"  {f:8s} rho " + " ".join(f"{x:.3f}" for x in rhos)
              + f"  mean {statistics.mean(rhos):.3f}   G0..G6 "
              + " ".join(f"{g:.2f}" for g in groups)
              + ("   slope h/l " + " ".join("/".join(f"{x:.2f}" for x in r[f]["slope"])
                                          for r in rows) if rows[0][f]["slope"] else ""))
    aucs = [r["valid_auc"] for r in rows]
    print("  valid AUC " + " ".join(f"{a:.4f}" for a in aucs)
          + f"  mean {statistics.mean(aucs):.4f}")


if __name__ == "__main__":
    main()
