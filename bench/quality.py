"""AUC against memory on MovieLens-100k: AMTL (+ packing) against the obvious alternatives.

Per seed: a seeded random 80/10/10 split of the ratings, the reference DLRM trained once (FBE,
D = 16), then every method below warm-started from that checkpoint and fine-tuned for the SAME
steps (3 epochs, Adam at finetune's default lr on the tables, the dense layers kept as trained
like finetune's default, the epoch with the best validation AUC kept),
so extra training is never credited to a compression method. "FBE fine-tuned lr 3e-3" adds the
baseline at the rate its training used; docs/benchmarks.md reports the targets against both.
Only the user_id and item_id tables are compressed; the other tables stay dense and are not
counted.

    FBE trained / FBE fine-tuned     the baseline, and the baseline given the same extra steps
    PTQ fp16 / int8                  post-training quantization of the full trained tables
    truncate k (+/- pca)             every row keeps its first k dims (optionally after the
                                     principal-axes rotation of core/rotation.py)
    freq rule                        rows with count >= t keep all D dims, the rest 1; t chosen
                                     for the budget
    MDE                              Ginart et al. 2019: 4 frequency blocks, block dim
                                     D (p_k / p_0)^alpha, alpha bisected for the budget; rows
                                     warm-started by truncation (after pca), a trainable
                                     d_k x D projection per block (counted in bytes)
    AMTL                             `finetune` (the library defaults) at budgets 0.6 .. 0.15,
                                     packed in float32 and int8 and evaluated from disk
    AML / AMTL-nSTE / AMTL no-pca    the ablations at budget 0.4, packed float32
    ... random start                 AMTL and MDE from re-initialised tables (paper Table 3)

Bytes count what each method must store for the two tables: dense float32 N x D for FBE;
N x D x 2 (fp16) or N x D + 8 N (int8 with per-row float32 scale/bias) for PTQ; kept values x 4
plus the D x D float32 rotation for truncation and the frequency rule; block tables plus
projections for MDE; and for AMTL the packed files' values + int64 offsets (+ int8 scale/bias)
+ rotation, exactly as `pack` reports.

    .venv/bin/python bench/quality.py                     # 3 seeds, ~4 min per seed on 2 cores
    .venv/bin/python bench/quality.py --seeds 1 --out /tmp/q --img-dir /tmp/q

Prints the table (mean +- std over seeds), writes results.json under --out and the two plots
(quality_tradeoff.png, quality_groups.png) under --img-dir. Not imported by the package.

``--task synthetic`` runs the planted task of bench/planted.py instead (1M rows over 2 tables,
D = 64, information per row planted to grow with log frequency; its parameters and their
reasons are in that module's docstring). Per seed: the data, the trained model (the reference,
"FBE (trained)"), and against it, each placed at the bytes it must store:

    FBE fine-tuned                   the trained model given the fine-tuning steps below
    PTQ fp16 / int8                  the full tables packed by `pack` (int8: per-row scale+bias)
    truncate k +pca                  uniform k of 64 after the principal-axes rotation, no
                                     training (values + the D x D rotation per table)
    freq tiers +pca                  rows binned by training count (tiers [0,1) [1,4) [4,32)
                                     [32,256) [256,inf)), tier length a log2(2 + its mean count)
                                     with a bisected for the value bytes, no training; packed
                                     by `pack` float32 and int8 like AMTL (same index, per-row
                                     parameters and rotation: bytes of the real files)
    MDE                              as above (4 blocks), fine-tuned for the same steps as AMTL
    AMTL                             `finetune` (library defaults; target_ratio 0.5 / 0.3 / 0.15,
                                     1 epoch at batch 65,536 of the first 25 % of the training
                                     split) -> `pack` float32 and int8 -> `load_packed_model`

The fine-tuning recipe is cut to 25 steps because a dense Adam step over the 64M table values
costs ~1.5 s on one core, and AMTL must run through `finetune` as a user would. Paired
differences are against the trained model of the same seed. Threads are set to 1 (2 shared
cores). Results are rewritten after every seed.

    nice -n 10 .venv/bin/python bench/quality.py --task synthetic     # 3 seeds
    .venv/bin/python bench/quality.py --task synthetic --quick --seeds 1 --out /tmp/s \
        --img-dir /tmp/s                                                 # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from amtl_compress._text import format_table
from amtl_compress.checkpoint import load_model, save_checkpoint
from amtl_compress.core.amtl import AMTLConfig
from amtl_compress.core.frequency import (
    NUM_FREQUENCY_GROUPS,
    frequency_group_means,
    rank_correlation,
)
from amtl_compress.core.rotation import principal_axes, rotate_rows
from amtl_compress.data.counts import count_frequencies
from amtl_compress.data.dataset import TabularData
from amtl_compress.data.movielens import build_ctr_dataset, fetch_movielens_100k
from amtl_compress.data.splits import CTRSplits
from amtl_compress.lookup.load import load_packed_model
from amtl_compress.models.dlrm import dlrm_config_for
from amtl_compress.models.factory import model_spec_for
from amtl_compress.storage.pack import pack
from amtl_compress.training.finetune import FinetuneConfig, finetune
from amtl_compress.training.loop import bce_step, evaluate
from amtl_compress.training.train import TrainConfig, train_dlrm

FIELDS = ("user_id", "item_id")
BUDGETS = (0.6, 0.4, 0.25, 0.15)
EPOCHS = 3
LR = FinetuneConfig().lr  # every method gets the library's fine-tuning recipe
DENSE_LR = FinetuneConfig().dense_lr
BATCH = 1024
GROUPS = NUM_FREQUENCY_GROUPS
MDE_BLOCKS = 4


# ---------------------------------------------------------------------------------------------
# Fixed-length baselines: one wrapper with a fixed per-row length, an optional rotation and
# optional per-block projections (MDE).


class FixedPrefix(nn.Module):
    """Row i keeps its first ``lengths[i]`` dims of ``weight`` (N, D), then optionally
    ``@ projections[block[i]]`` (MDE, each (D, D) with only the first d_k rows reachable) and
    ``@ rotation`` (D, D). ids int64 (B,) -> float32 (B, D)."""

    def __init__(
        self,
        weight: Tensor,
        lengths: Tensor,
        rotation: Tensor | None,
        blocks: Tensor | None = None,
        num_blocks: int = 0,
    ) -> None:
        super().__init__()
        d = weight.shape[1]
        self.weight = nn.Parameter(weight.clone())
        self.register_buffer("keep", torch.arange(d) < lengths.unsqueeze(1))
        self.register_buffer("rotation", rotation)
        self.register_buffer("blocks", blocks)
        self.projections = (
            nn.Parameter(torch.eye(d).repeat(num_blocks, 1, 1)) if num_blocks else None
        )

    def forward(self, ids: Tensor) -> Tensor:
        rows = torch.where(self.keep[ids], self.weight[ids], 0.0)
        if self.projections is not None:
            if ids.numel() * self.weight.shape[1] <= 1 << 20:
                rows = torch.bmm(rows.unsqueeze(1), self.projections[self.blocks[ids]]).squeeze(1)
            else:
                # a (B, D, D) gather of projections is GBs at the synthetic task's batch size:
                # the same product block by block
                blocks = self.blocks[ids]
                out = torch.zeros_like(rows)
                for k in range(self.projections.shape[0]):
                    mask = blocks == k
                    out = out.index_put((mask,), rows[mask] @ self.projections[k])
                rows = out
        return rows if self.rotation is None else rotate_rows(rows, self.rotation)


def fit_same_steps(model: nn.Module, data: dict, seed: int, lr: float | None = None,
                   dense_lr: float | None = None) -> nn.Module:
    """The task's epochs (EPOCHS for MovieLens) of Adam(lr) on BCE at its batch size, with
    finetune's batch order and parameter groups (the embedding modules at ``lr``, the dense
    layers at ``dense_lr``, finetune's default unless given); keep the best validation epoch.
    ``lr``: the task's fine-tuning lr (``data["lr"]``, else finetune's default)."""
    lr = lr if lr is not None else data.get("lr", LR)
    dense_lr = data.get("dense_lr", DENSE_LR) if dense_lr is None else dense_lr
    torch.manual_seed(seed)
    train, valid = data.get("ft_train", data["train"]), data["valid"]
    epochs, batch = data.get("epochs", EPOCHS), data.get("batch", BATCH)
    # finetune's groups: the embedding modules (tables, MDE's projections) at lr, the rest of
    # the model at dense_lr, frozen at 0 (the library's default).
    tables = [p for p in model.embeddings.parameters() if p.requires_grad]
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
    groups = [{"params": tables, "lr": lr}]
    if dense_lr > 0:
        groups.append({"params": dense, "lr": dense_lr})
    else:
        for p in dense:
            p.requires_grad_(False)
    optimizer = torch.optim.Adam(groups)
    best_auc, best_state = -math.inf, None
    for epoch in range(epochs):
        model.train()
        for features, labels in train.batches(batch, shuffle=True, seed=seed * 100_003 + epoch):
            bce_step(model, optimizer, features, labels)
        auc = evaluate(model, valid.batches(max(4096, batch)))["auc"]
        if auc > best_auc:
            best_auc = auc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


def fixed_method(
    data: dict,
    seed: int,
    lengths_of: Callable[[str, Tensor], Tensor],
    rotate: bool,
    random_start: bool = False,
    mde_blocks: Callable[[str], Tensor] | None = None,
) -> tuple[nn.Module, dict[str, Tensor]]:
    """Swap FixedPrefix tables (lengths from ``lengths_of(field, counts)``) into the trained
    model, fine-tune, return (model, lengths per field)."""
    model, _ = load_model(data["base"])
    if random_start:
        torch.manual_seed(seed + 1)
        model.reset_embeddings()
    lengths = {}
    for f in FIELDS:
        weight = model.embeddings[f].weight.detach()
        rotation = principal_axes(weight) if rotate else None
        if rotation is not None:
            weight = weight @ rotation.T
        lengths[f] = lengths_of(f, data["counts"][f])
        blocks = mde_blocks(f) if mde_blocks else None
        model.embeddings[f] = FixedPrefix(
            weight, lengths[f], rotation, blocks, MDE_BLOCKS if mde_blocks else 0
        )
    return fit_same_steps(model, data, seed), lengths


# ---------------------------------------------------------------------------------------------
# Length rules


def truncate_rule(k: int) -> Callable[[str, Tensor], Tensor]:
    return lambda f, counts: torch.full_like(counts, k)


def freq_rule(budget: float, dim: int) -> Callable[[str, Tensor], Tensor]:
    """The most frequent rows keep all D dims, the rest 1, as many full rows as the budget buys."""

    def lengths(f: str, counts: Tensor) -> Tensor:
        n = counts.numel()
        full = int((budget * n * dim - n) // (dim - 1))  # n + full (D - 1) <= budget N D
        out = torch.ones_like(counts)
        out[torch.argsort(counts, descending=True, stable=True)[: max(full, 0)]] = dim
        return out

    return lengths


def mde_layout(counts: Tensor, budget: float, dim: int) -> tuple[Tensor, Tensor, list[int]]:
    """MDE blocks by frequency rank (equal row counts) with block dims
    ``max(1, round(h (p_k / p_0)^alpha))`` (Ginart et al.'s power-law rule, p_k the block's mean
    access count): the largest head width h <= D for which some alpha in [0, 8] fits, alpha
    bisected so that block tables + projections <= budget N D values.

    Returns (lengths (N,), block id (N,), block dims, most frequent block first)."""
    n = counts.numel()
    order = torch.argsort(counts, descending=True, stable=True)
    block = torch.empty(n, dtype=torch.int64)
    for k, rows in enumerate(torch.tensor_split(order, MDE_BLOCKS)):
        block[rows] = k
    # +1 smoothing keeps blocks of unseen rows at a finite, positive probability
    p = torch.stack([(counts[block == k].double() + 1).mean() for k in range(MDE_BLOCKS)])
    sizes = torch.bincount(block, minlength=MDE_BLOCKS)
    limit = budget * n * dim

    def dims(alpha: float, head: int) -> list[int]:
        return [max(1, min(head, round(head * float(p[k] / p[0]) ** alpha)))
                for k in range(MDE_BLOCKS)]

    def cost(ds: list[int]) -> int:
        # a block at full width needs no projection
        return sum(int(sizes[k]) * d + (d * dim if d < dim else 0) for k, d in enumerate(ds))

    for head in range(dim, 0, -1):
        if cost(dims(8.0, head)) > limit:
            continue
        lo, hi = 0.0, 8.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if cost(dims(mid, head)) <= limit else (mid, hi)
        best = dims(hi, head)
        return torch.tensor(best, dtype=torch.int64)[block], block, best
    raise ValueError(f"budget {budget} is below one dim per row plus projections")


# ---------------------------------------------------------------------------------------------
# One seed


def prepare(seed: int, work: Path) -> dict:
    ctr = build_ctr_dataset(fetch_movielens_100k(), work / "data", seed=seed)
    base = work / "base.safetensors"
    train_dlrm(ctr.train, ctr.valid, base, TrainConfig(seed=seed),
               dlrm_config=dlrm_config_for(ctr), progress=False)
    model, _ = load_model(base)
    rows = {f: model.embeddings[f].num_embeddings for f in FIELDS}
    return {
        "ctr": ctr,
        "base": base,
        "dim": model.config.embedding_dim,
        "rows": rows,
        "counts": {f: count_frequencies(ctr.train, f, rows[f]) for f in FIELDS},
        "train": TabularData.open(ctr.train),
        "valid": TabularData.open(ctr.valid),
        "test": TabularData.open(ctr.test),
    }


def test_scores(model: nn.Module, data: dict) -> dict[str, float]:
    return evaluate(model, data["test"].batches(4096))


def record_fixed(data: dict, name: str, group: str, model: nn.Module,
                 lengths: dict[str, Tensor], extra_bytes: int) -> dict:
    """:func:`record` for a method that stores its kept values in float32 (field -> lengths
    (N,)) plus ``extra_bytes``."""
    kept = sum(int(lengths[f].sum()) for f in FIELDS)
    dense_values = sum(data["rows"][f] * data["dim"] for f in FIELDS)
    return record(name, group, model, data, kept * 4 + extra_bytes,
                  {f: float(lengths[f].double().mean()) for f in FIELDS}, kept / dense_values)


def record(name: str, group: str, model: nn.Module, data: dict, table_bytes: int,
           avg_dim: dict[str, float], kept_ratio: float) -> dict:
    scores = test_scores(model, data)
    dense = sum(data["rows"][f] * data["dim"] * 4 for f in FIELDS)
    return {"method": name, "group": group, **scores, "bytes": table_bytes,
            "bytes_ratio": table_bytes / dense, "kept_ratio": kept_ratio,
            "avg_dim": avg_dim}


def run_seed(seed: int, work: Path, quick: bool) -> tuple[list[dict], dict]:
    data = prepare(seed, work)
    d, rows, counts = data["dim"], data["rows"], data["counts"]
    dense_values = sum(rows[f] * d for f in FIELDS)
    rot_bytes = len(FIELDS) * d * d * 4
    full = {f: float(d) for f in FIELDS}
    out: list[dict] = []

    fixed_record = functools.partial(record_fixed, data)

    base, _ = load_model(data["base"])
    out.append(record("FBE (trained)", "FBE", base, data, dense_values * 4, full, 1.0))
    tuned = fit_same_steps(load_model(data["base"])[0], data, seed)
    out.append(record("FBE fine-tuned", "FBE", tuned, data, dense_values * 4, full, 1.0))
    tuned = fit_same_steps(load_model(data["base"])[0], data, seed, lr=3e-3)
    out.append(record("FBE fine-tuned lr 3e-3", "FBE", tuned, data, dense_values * 4, full, 1.0))

    # Post-training quantization of the full trained tables, through `pack` (all rows length D).
    ptq_run = work / "ptq-run"
    ptq_run.mkdir(exist_ok=True)
    shutil.copy(data["base"], ptq_run / "model.safetensors")
    from amtl_compress._io import atomic_save_safetensors

    atomic_save_safetensors(
        {f"embeddings.{f}": torch.full((rows[f],), d, dtype=torch.int64) for f in FIELDS},
        ptq_run / "lengths.safetensors",
    )
    for dtype in ("float16", "int8"):
        report = pack(ptq_run, work / f"ptq-{dtype}", dtype=dtype, overwrite=True, progress=False)
        out.append(record(f"PTQ {dtype}", "PTQ", load_packed_model(report.out_dir), data,
                          report.bytes_after, full, 1.0))

    budgets = BUDGETS[1:2] if quick else BUDGETS
    for budget in budgets:
        k = max(1, int(budget * d))
        for rotate in (False, True):
            model, lengths = fixed_method(data, seed, truncate_rule(k), rotate)
            name = f"truncate k={k}" + (" +pca" if rotate else "")
            out.append(fixed_record(name, "truncate +pca" if rotate else "truncate", model,
                                    lengths, rot_bytes if rotate else 0))
        model, lengths = fixed_method(data, seed, freq_rule(budget, d), True)
        out.append(fixed_record(f"freq rule @{budget:g} +pca", "freq rule", model, lengths,
                                rot_bytes))
        out.append(mde(data, seed, budget, fixed_record, f"MDE @{budget:g}", "MDE"))

    # AMTL through the library: finetune (defaults) -> pack -> load from disk -> test.
    for budget in budgets:
        run = amtl_run(data, work, f"amtl-{budget:g}", FinetuneConfig(
            fields={f: f for f in FIELDS}, target_ratio=budget, seed=seed))
        for dtype in ("float32", "int8"):
            out.append(packed_record(data, work, run, dtype, f"AMTL @{budget:g} {dtype}",
                                     f"AMTL {dtype}"))
    ablations = {
        "AML @0.4": AMTLConfig(twins=False, ordering="pca"),
        "AMTL-nSTE @0.4": AMTLConfig(straight_through=False, ordering="pca"),
        "AMTL no-pca @0.4": AMTLConfig(ordering="none"),
    }
    for name, amtl in ablations.items():
        run = amtl_run(data, work, name.split()[0], FinetuneConfig(
            fields={f: f for f in FIELDS}, target_ratio=0.4, seed=seed, amtl=amtl))
        out.append(packed_record(data, work, run, "float32", name, "ablation"))
    if not quick:
        # Table 3: the same recipes from re-initialised tables (the rest of the model trained).
        random_base = work / "random-base.safetensors"
        model, spec = load_model(data["base"])
        torch.manual_seed(seed + 1)
        model.reset_embeddings()
        save_checkpoint(random_base, model.state_dict(), model_spec_for(model.config))
        run = amtl_run(data, work, "amtl-random", FinetuneConfig(
            fields={f: f for f in FIELDS}, target_ratio=0.4, seed=seed), checkpoint=random_base)
        out.append(packed_record(data, work, run, "float32", "AMTL @0.4 random start",
                                 "random start"))
        out.append(mde(data, seed, 0.4, fixed_record, "MDE @0.4 random start", "random start",
                       random_start=True))

    groups = {}
    for name in ("amtl-0.4", "AML"):
        lengths = load_file(str(work / name / "lengths.safetensors"))
        groups[name] = {f: frequency_group_means(lengths[f"embeddings.{f}"], counts[f])
                        for f in FIELDS}
    return out, groups


def mde(data: dict, seed: int, budget: float, fixed_record: Callable, name: str, group: str,
        random_start: bool = False) -> dict:
    d = data["dim"]
    layouts = {f: mde_layout(data["counts"][f], budget, d) for f in FIELDS}
    model, lengths = fixed_method(
        data, seed, lambda f, c: layouts[f][0], True, random_start=random_start,
        mde_blocks=lambda f: layouts[f][1],
    )
    projections = sum(dk * d for f in FIELDS for dk in layouts[f][2] if dk < d)
    row = fixed_record(name, group, model, lengths, projections * 4)
    row["mde_dims"] = {f: layouts[f][2] for f in FIELDS}
    return row


def amtl_run(data: dict, work: Path, name: str, config: FinetuneConfig,
             checkpoint: Path | None = None) -> Path:
    ctr = data["ctr"]
    result = finetune(checkpoint or data["base"], ctr.train, ctr.valid, work / name, config,
                      resume=False, overwrite=True, progress=False)
    return result.run_dir


def packed_record(data: dict, work: Path, run: Path, dtype: str, name: str, group: str) -> dict:
    report = pack(run, work / f"{run.name}-{dtype}", dtype=dtype, overwrite=True, progress=False)
    lengths = load_file(str(run / "lengths.safetensors"))
    kept = sum(int(v.sum()) for v in lengths.values())
    dense_values = sum(data["rows"][f] * data["dim"] for f in FIELDS)
    return record(name, group, load_packed_model(report.out_dir), data, report.bytes_after,
                  {f: float(lengths[f"embeddings.{f}"].double().mean()) for f in FIELDS},
                  kept / dense_values)


# ---------------------------------------------------------------------------------------------
# The synthetic task (bench/planted.py): >= 1M rows, D = 64, information per row planted to grow
# with frequency. Budgets are kept-value ratios for AMTL / MDE and bytes ratios for the
# training-free truncations; every method is then placed at the bytes of what it must store.

SYN_AMTL_BUDGETS = (0.5, 0.3, 0.15)
SYN_TRUNCATE_K = (32, 20, 16, 10, 6)  # of D = 64: bytes ratios 0.50 .. 0.094
SYN_TIER_BUDGETS = (0.5, 0.3, 0.25, 0.15, 0.1)
SYN_FT_BATCH = 65_536  # fine-tuning batch (AMTL, MDE, FBE fine-tuned): 1 epoch of the subset
SYN_FT_SHARE = 0.25  # fine-tuning data = the first 25 % of the training split (1.6M samples)
TIER_EDGES = (1, 4, 32, 256)  # training-count tier edges: [0,1) [1,4) [4,32) [32,256) [256,inf)


def tier_rule(budget_bytes: int, counts: dict[str, Tensor], dim: int
              ) -> dict[str, Tensor]:
    """Frequency tiers, no training: rows binned by training count at TIER_EDGES; tier t of a
    table keeps ``clip(round(a * log2(2 + mean count of tier t)), 1, D)`` dims, one scale ``a``
    for both tables, the largest (bisected) whose kept values x 4 + the D x D rotations fit
    ``budget_bytes``. Length grows with log frequency: the textbook frequency rule, with no
    knowledge of the planted slope.

    Returns field -> lengths int64 (N,)."""
    edges = torch.tensor(TIER_EDGES)
    weights = {}
    for f, c in counts.items():
        tiers = torch.bucketize(c, edges, right=True)
        means = torch.stack([c[tiers == t].double().mean() if (tiers == t).any()
                             else torch.tensor(0.0, dtype=torch.float64)
                             for t in range(len(TIER_EDGES) + 1)])
        weights[f] = torch.log2(2.0 + means)[tiers]
    return lengths_within(weights, budget_bytes, dim)


def lengths_within(weights: dict[str, Tensor], budget_bytes: int, dim: int
                   ) -> dict[str, Tensor]:
    """``clip(round(a * weight), 1, D)`` per row (weights: field -> (N,) float64), one scale
    ``a`` for every table, the largest (bisected) whose kept values x 4 + the D x D rotations
    fit ``budget_bytes``. Returns field -> lengths int64 (N,)."""

    def lengths(a: float) -> dict[str, Tensor]:
        return {f: (a * w).round().clamp(1, dim).long() for f, w in weights.items()}

    def cost(a: float) -> int:
        return sum(int(v.sum()) for v in lengths(a).values()) * 4 + len(weights) * dim * dim * 4

    lo, hi = 0.0, float(dim)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget_bytes else (lo, mid)
    return lengths(lo)


def prepare_synthetic(seed: int, work: Path, tiny: bool, reuse: bool = False) -> dict:
    """The planted data and trained model of one seed; ``reuse``: keep those already in
    ``work`` when they were made from the same seed and config (scripts/recipe_probe.py)."""
    import planted
    import pyarrow.parquet as pq

    cfg = planted.TINY if tiny else planted.PLANTED
    start = time.time()
    made = work / "data" / "planted.json"
    base = work / "base.safetensors"
    if (reuse and base.exists() and made.exists()
            and json.loads(made.read_text()) == {"seed": seed, **asdict(cfg)}):
        ctr = CTRSplits.load(work / "data")
    else:
        ctr = planted.make_planted(work / "data", seed, cfg)
        base = planted.train_base(ctr, base, seed, cfg)
    table = pq.read_table(ctr.train)
    ft_train = work / "data" / "finetune.parquet"
    pq.write_table(table.slice(0, int(table.num_rows * SYN_FT_SHARE)), ft_train)
    rows = dict(ctr.categorical)
    print(f"  seed {seed}: data + trained model in {time.time() - start:.0f} s", file=sys.stderr)
    return {
        "ctr": ctr, "base": base, "dim": cfg.dim, "rows": rows, "ft_train_path": ft_train,
        "counts": {f: count_frequencies(ctr.train, f, rows[f]) for f in FIELDS},
        "train": TabularData.open(ctr.train), "ft_train": TabularData.open(ft_train),
        "valid": TabularData.open(ctr.valid), "test": TabularData.open(ctr.test),
        "epochs": 1, "batch": 512 if tiny else SYN_FT_BATCH,
    }


def run_synthetic_seed(seed: int, work: Path, tiny: bool, recipe: dict | None = None
                       ) -> tuple[list[dict], dict]:
    """Every method on one seed of the planted task; returns (rows, AMTL length groups).

    ``recipe``: ``{"lr": float | None, "dense_lr": float | None, "amtl": JSON str of AMTLConfig
    overrides}``, the fine-tuning lr of the tables and of the dense layers of every fine-tuned
    method (None: finetune's defaults) and AMTL's config."""
    import planted

    data = prepare_synthetic(seed, work, tiny)
    recipe = recipe or {}
    if recipe.get("lr") is not None:
        data["lr"] = recipe["lr"]
    if recipe.get("dense_lr") is not None:
        data["dense_lr"] = recipe["dense_lr"]
    data["amtl"] = AMTLConfig(**json.loads(recipe.get("amtl") or "{}"))
    d, rows, counts = data["dim"], data["rows"], data["counts"]
    dense_values = sum(rows[f] * d for f in FIELDS)
    rot_bytes = len(FIELDS) * d * d * 4
    full = {f: float(d) for f in FIELDS}
    out: list[dict] = []
    clock = time.time()

    def lap(what: str) -> None:
        nonlocal clock
        print(f"  seed {seed}: {what} ({time.time() - clock:.0f} s)", file=sys.stderr)
        clock = time.time()

    fixed_record = functools.partial(record_fixed, data)

    out.append(record("FBE (trained)", "FBE", load_model(data["base"])[0], data,
                      dense_values * 4, full, 1.0))
    tuned = fit_same_steps(load_model(data["base"])[0], data, seed)
    out.append(record("FBE fine-tuned", "FBE", tuned, data, dense_values * 4, full, 1.0))
    del tuned
    lap("FBE")
    out.extend(ptq_records(data, work, dense_values))
    lap("PTQ")
    for k in (4, 2) if tiny else SYN_TRUNCATE_K:
        lengths = {f: torch.full((rows[f],), k) for f in FIELDS}
        model = planted.pca_truncated(load_model(data["base"])[0], lengths)
        out.append(fixed_record(f"truncate k={k} +pca", "truncate +pca", model, lengths,
                                rot_bytes))
    for budget in (0.25,) if tiny else SYN_TIER_BUDGETS:
        lengths = tier_rule(int(budget * dense_values * 4), counts, d)
        for row in tier_packed_records(data, work, lengths, f"freq tiers @{budget:g} +pca"):
            row["groups"] = {f: frequency_group_means(lengths[f], counts[f]) for f in FIELDS}
            out.append(row)
    lap("truncation and tiers")
    groups = {}
    for budget in (0.3,) if tiny else SYN_AMTL_BUDGETS:
        out.append(mde(data, seed, budget, fixed_record, f"MDE @{budget:g}", "MDE"))
        lap(f"MDE @{budget:g}")
        name = f"amtl-{budget:g}"
        run = finetune(data["base"], data["ft_train_path"], data["ctr"].valid, work / name,
                       FinetuneConfig(fields={f: f for f in FIELDS}, target_ratio=budget,
                                      seed=seed, epochs=data["epochs"], batch_size=data["batch"],
                                      save_every=10**9, lr=data.get("lr", LR),
                                      dense_lr=data.get("dense_lr", DENSE_LR),
                                      amtl=data.get("amtl", AMTLConfig())),
                       resume=False, overwrite=True, progress=False).run_dir
        for dtype in ("float32", "int8"):
            out.append(packed_record(data, work, run, dtype, f"AMTL @{budget:g} {dtype}",
                                     f"AMTL {dtype}"))
            shutil.rmtree(work / f"{run.name}-{dtype}")  # 10s-100s of MB each
        lengths = load_file(str(run / "lengths.safetensors"))
        groups[name] = {f: frequency_group_means(lengths[f"embeddings.{f}"], counts[f])
                        for f in FIELDS}
        groups[name + " rho"] = {f: rank_correlation(lengths[f"embeddings.{f}"], counts[f])
                                 for f in FIELDS}
        shutil.rmtree(run / "state", ignore_errors=True)
        lap(f"AMTL @{budget:g}")
    return out, groups


def tier_packed_records(data: dict, work: Path, lengths: dict[str, Tensor], name: str
                        ) -> list[dict]:
    """The trained tables on their principal axes, row r cut to ``lengths[f][r]`` dims, written
    as a run directory and packed by `pack` (float32 and int8) like AMTL's runs: the tiers pay
    the same row index, per-row parameters and rotation as AMTL, bytes from the real files."""
    import planted

    from amtl_compress._io import atomic_save_safetensors

    model = load_model(data["base"])[0]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for f, keep in lengths.items():
        rotated, rotation = planted.pca_prefix(state[f"embeddings.{f}.weight"], keep)
        state[f"embeddings.{f}.weight"] = rotated.contiguous()
        state[f"embeddings.{f}.rotation"] = rotation.contiguous()
    run = work / "tiers-run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    save_checkpoint(run / "model.safetensors", state, model_spec_for(model.config))
    atomic_save_safetensors({f"embeddings.{f}": v.long() for f, v in lengths.items()},
                            run / "lengths.safetensors")
    out = [packed_record(data, work, run, dtype, f"{name} {dtype}", f"freq tiers {dtype}")
           for dtype in ("float32", "int8")]
    for dtype in ("float32", "int8"):
        shutil.rmtree(work / f"{run.name}-{dtype}")
    shutil.rmtree(run)
    return out


def ptq_records(data: dict, work: Path, dense_values: int) -> list[dict]:
    """Post-training fp16 / int8 of the full trained tables, packed by `pack` (every row length
    D) and evaluated from disk; bytes as `pack` reports them (the real files)."""
    from amtl_compress._io import atomic_save_safetensors

    d, rows = data["dim"], data["rows"]
    full = {f: float(d) for f in FIELDS}
    ptq_run = work / "ptq-run"
    ptq_run.mkdir(exist_ok=True)
    shutil.copy(data["base"], ptq_run / "model.safetensors")
    atomic_save_safetensors(
        {f"embeddings.{f}": torch.full((rows[f],), d, dtype=torch.int64) for f in FIELDS},
        ptq_run / "lengths.safetensors",
    )
    out = []
    for dtype in ("float16", "int8"):
        report = pack(ptq_run, work / f"ptq-{dtype}", dtype=dtype, overwrite=True, progress=False)
        out.append(record(f"PTQ {dtype}", "PTQ", load_packed_model(report.out_dir), data,
                          report.bytes_after, full, 1.0))
        shutil.rmtree(report.out_dir)
    return out


def compare_at_bytes(rows: list[dict], rivals: set[str] | None = None) -> list[dict]:
    """For each AMTL row, the best other method whose bytes are <= its bytes (equal bytes or
    fewer: the comparison AMTL must win), and the margin in paired difference to the reference.
    ``rivals``: the groups to compare with (default: every group but AMTL's and FBE)."""
    others = [r for r in rows if not r["group"].startswith("AMTL") and r["group"] != "FBE"
              and (rivals is None or r["group"] in rivals)]
    out = []
    for r in rows:
        if not r["group"].startswith("AMTL"):
            continue
        rivals = [o for o in others if o["bytes_ratio"] <= r["bytes_ratio"] + 1e-9]
        best = max(rivals, key=lambda o: o["diff"], default=None)
        out.append({"method": r["method"], "bytes_ratio": r["bytes_ratio"], "diff": r["diff"],
                    "best_other": best["method"] if best else None,
                    "best_other_diff": best["diff"] if best else None,
                    "margin": r["diff"] - best["diff"] if best else None})
    return out


# ---------------------------------------------------------------------------------------------
# Report


def summarise(per_seed: list[list[dict]], reference: str = "FBE fine-tuned") -> list[dict]:
    rows = []
    # Each seed has its own split, so the test AUC varies by ~0.008 between seeds; the paired
    # difference to the reference on the same split is the informative spread.
    tuned = [next(r for r in seed_rows if r["method"] == reference)["auc"]
             for seed_rows in per_seed]
    for i, first in enumerate(per_seed[0]):
        same = [seed_rows[i] for seed_rows in per_seed]
        aucs = [r["auc"] for r in same]
        diffs = [a - t for a, t in zip(aucs, tuned, strict=True)]
        rows.append({
            **{k: first[k] for k in ("method", "group")},
            "auc": statistics.mean(aucs),
            "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "diff": statistics.mean(diffs),
            "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "logloss": statistics.mean(r["logloss"] for r in same),
            "bytes": statistics.mean(r["bytes"] for r in same),
            "bytes_ratio": statistics.mean(r["bytes_ratio"] for r in same),
            "kept_ratio": statistics.mean(r["kept_ratio"] for r in same),
            "avg_dim": {f: statistics.mean(r["avg_dim"][f] for r in same) for f in FIELDS},
        })
    return rows


def print_table(rows: list[dict], seeds: int, versus: str = "vs FBE-ft") -> str:
    table = [[f"method (test, {seeds} seeds)", "AUC", "+-std", versus, "+-std",
              "logloss", *(f"avg dim {f}" for f in FIELDS), "kept", "table bytes", "bytes ratio"]]
    for r in rows:
        table.append([r["method"], f"{r['auc']:.4f}", f"{r['auc_std']:.4f}",
                      f"{r['diff']:+.4f}", f"{r['diff_std']:.4f}", f"{r['logloss']:.4f}",
                      *(f"{r['avg_dim'][f]:.2f}" for f in FIELDS), f"{r['kept_ratio']:.3f}",
                      f"{r['bytes']:,.0f}", f"{r['bytes_ratio']:.3f}"])
    text = format_table(table)
    print(text)
    return text


def plot_groups(plt: Any, groups: list[dict], series: list[tuple[str, str]], path: Path) -> None:
    """Bars of the mean kept dim of G0..G6 per table, one bar per (run name, label) of
    ``series``, averaged over the seeds' ``groups``."""
    fig, axes = plt.subplots(1, len(FIELDS), figsize=(9, 3.6), sharey=True)
    x = list(range(GROUPS))
    width = 0.8 / max(1, len(series))
    for ax, f in zip(axes, FIELDS, strict=True):
        for j, (name, label) in enumerate(series):
            means = [statistics.mean(g[name][f][i] for g in groups) for i in x]
            ax.bar([i - 0.4 + width * (j + 0.5) for i in x], means, width=width, label=label)
        ax.set_xticks(x, [f"G{i}" for i in x])
        ax.set_title(f"{f}: avg kept dim by frequency group")
        ax.set_xlabel("G0 = rarest 1/7 of rows ... G6 = most frequent")
    axes[0].set_ylabel("average kept dimension")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[dict], groups: list[dict], img_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"FBE": "k*", "PTQ": "kx", "truncate": "C7s--", "truncate +pca": "C0s--",
              "freq rule": "C2^--", "MDE": "C1v--", "AMTL float32": "C3o-",
              "AMTL int8": "C3D:", "ablation": "C4P", "random start": "C5X"}
    for group, style in styles.items():
        members = sorted((r for r in rows if r["group"] == group), key=lambda r: r["bytes_ratio"])
        if not members:
            continue
        xs = [r["bytes_ratio"] for r in members]
        ys = [r["diff"] for r in members]
        ax.errorbar(xs, ys, yerr=[r["diff_std"] for r in members], fmt=style, label=group,
                    capsize=2, markersize=6)
        if group in ("ablation", "random start", "PTQ"):
            for r in members:
                ax.annotate(r["method"], (r["bytes_ratio"], r["diff"]), fontsize=7,
                            xytext=(4, -3), textcoords="offset points")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.axhline(-0.001, color="k", lw=0.8, ls=":", label="FBE fine-tuned - 0.001")
    ax.set_xlabel("table bytes / FBE float32 bytes (user_id + item_id)")
    ax.set_ylabel("test AUC - FBE fine-tuned AUC (same split)\nmean over seeds, +-std")
    ax.set_title("MovieLens-100k: AUC against memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(img_dir / "quality_tradeoff.png", dpi=110)
    plt.close(fig)

    plot_groups(plt, groups, [("amtl-0.4", "AMTL @0.4"), ("AML", "AML @0.4")],
                img_dir / "quality_groups.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("movielens", "synthetic"), default="movielens",
                        help="movielens: MovieLens-100k (the default); synthetic: the planted "
                        "1M-row task of bench/planted.py")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 (split, init, order)")
    parser.add_argument("--out", type=Path, default=None,
                        help="work directory (data, checkpoints, runs, results.json); default "
                        "runs/bench-quality (movielens), runs/bench-quality-synthetic")
    parser.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    parser.add_argument("--lr", type=float, default=None,
                        help="synthetic: fine-tuning lr of AMTL, MDE and FBE fine-tuned "
                             "(default: finetune's)")
    parser.add_argument("--dense-lr", type=float, default=None,
                        help="synthetic: fine-tuning lr of the dense layers of AMTL, MDE and FBE "
                             "fine-tuned (default: finetune's, 0 = frozen)")
    parser.add_argument("--amtl", default="{}",
                        help='synthetic: JSON overrides of AMTLConfig, e.g. \'{"price_scale": 4}\'')
    parser.add_argument("--quick", action="store_true",
                        help="movielens: budget 0.4 only, no random-start rows; synthetic: the "
                        "tiny planted sizes (planted.TINY) and one budget per method (a smoke "
                        "run of seconds)")
    args = parser.parse_args()
    if args.task == "synthetic":
        main_synthetic(args)
        return
    out = args.out or Path("runs/bench-quality")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    per_seed, groups = [], []
    for seed in range(args.seeds):
        start = time.time()
        rows, g = run_seed(seed, out / f"seed{seed}", args.quick)
        per_seed.append(rows)
        groups.append(g)
        print(f"seed {seed}: {len(rows)} methods in {time.time() - start:.0f} s", file=sys.stderr)
    summary = summarise(per_seed)
    text = print_table(summary, args.seeds)
    print_groups(groups)
    # the bar on this task: AMTL against PCA truncation (raw or rotated) at <= bytes
    ctext = print_comparison(compare_at_bytes(summary, rivals={"truncate", "truncate +pca"}),
                             versus="vs FBE-ft", rival="best truncation at <= bytes")
    (out / "results.json").write_text(json.dumps(
        {"summary": summary, "per_seed": per_seed, "groups": groups, "table": text,
         "comparison": ctext}, indent=1))
    plot(summary, groups, args.img_dir)


def main_synthetic(args: argparse.Namespace) -> None:
    """The synthetic task: results (and the plots) are rewritten after every seed, so a run cut
    short still leaves the seeds it finished."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/planted.py
    # 2 shared cores: a second intra-op thread costs more in contention than it gives
    torch.set_num_threads(1)
    out = args.out or Path("runs/bench-quality-synthetic")
    per_seed, groups = [], []
    begin = time.time()
    for seed in range(args.seeds):
        start = time.time()
        rows, g = run_synthetic_seed(seed, out / f"seed{seed}", args.quick,
                                     recipe={"lr": args.lr, "dense_lr": args.dense_lr,
                                             "amtl": args.amtl})
        per_seed.append(rows)
        groups.append(g)
        print(f"seed {seed}: {len(rows)} methods in {time.time() - start:.0f} s", file=sys.stderr)
        summary = summarise(per_seed, reference="FBE (trained)")
        text = print_table(summary, len(per_seed), versus="vs trained")
        gtext = print_synthetic_groups(groups, summary)
        ctext = print_comparison(compare_at_bytes(summary))
        (out / "results.json").write_text(json.dumps(
            {"summary": summary, "per_seed": per_seed, "groups": groups, "table": text,
             "groups_table": gtext, "comparison": ctext, "seeds_done": len(per_seed),
             "seconds": time.time() - begin}, indent=1))
        plot_synthetic(summary, groups, args.img_dir, len(per_seed))
    print(f"total {time.time() - begin:.0f} s", file=sys.stderr)


def print_synthetic_groups(groups: list[dict], summary: list[dict]) -> str:
    """AMTL's mean kept length per frequency group G0..G6 and Spearman's rho (length vs count)
    per table, mean over seeds; the frequency tiers at 0.25 bytes for reference."""
    table = [["avg kept dim", *(f"G{i}" for i in range(GROUPS)), "Spearman rho"]]
    names = [k for k in groups[0] if not k.endswith(" rho")]
    for name in names:
        for f in FIELDS:
            means = [statistics.mean(g[name][f][i] for g in groups) for i in range(GROUPS)]
            rho = statistics.mean(g[name + " rho"][f] for g in groups)
            table.append([f"{name} {f}", *(f"{m:.2f}" for m in means), f"{rho:.3f}"])
    text = format_table(table)
    print(text)
    return text


def print_comparison(rows: list[dict], versus: str = "vs trained",
                     rival: str = "best other at <= bytes") -> str:
    table = [["AMTL point", "bytes ratio", versus, rival, "its diff", "margin"]]
    for r in rows:
        table.append([r["method"], f"{r['bytes_ratio']:.3f}", f"{r['diff']:+.4f}",
                      r["best_other"] or "-",
                      "-" if r["best_other_diff"] is None else f"{r['best_other_diff']:+.4f}",
                      "-" if r["margin"] is None else f"{r['margin']:+.4f}"])
    text = format_table(table)
    print(text)
    return text


def plot_synthetic(rows: list[dict], groups: list[dict], img_dir: Path, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"FBE": "k*", "PTQ": "kx", "truncate +pca": "C0s--",
              "freq tiers float32": "C2^--", "freq tiers int8": "C2v:", "MDE": "C1v--",
              "AMTL float32": "C3o-", "AMTL int8": "C3D:"}
    for group, style in styles.items():
        members = sorted((r for r in rows if r["group"] == group), key=lambda r: r["bytes_ratio"])
        if not members:
            continue
        ax.errorbar([r["bytes_ratio"] for r in members], [r["diff"] for r in members],
                    yerr=[r["diff_std"] for r in members], fmt=style, label=group, capsize=2,
                    markersize=6)
        if group in ("PTQ", "FBE"):
            for r in members:
                ax.annotate(r["method"], (r["bytes_ratio"], r["diff"]), fontsize=7,
                            xytext=(4, -3), textcoords="offset points")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.axvline(0.25, color="k", lw=0.6, ls=":")
    ax.set_xlabel("table bytes / trained float32 bytes (user_id + item_id, 1M rows, D = 64)")
    ax.set_ylabel(f"test AUC - trained model AUC (same seed)\nmean over {seeds} seed(s), +-std")
    ax.set_title("Planted synthetic task: AUC against stored bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(img_dir / "quality_synthetic_tradeoff.png", dpi=110)
    plt.close(fig)

    names = [k for k in groups[0] if not k.endswith(" rho")]
    plot_groups(plt, groups, [(n, n.replace("amtl-", "AMTL @")) for n in names],
                img_dir / "quality_synthetic_groups.png")


def print_groups(groups: list[dict]) -> None:
    table = [["avg kept dim", *(f"G{i}" for i in range(GROUPS))]]
    for name in ("amtl-0.4", "AML"):
        for f in FIELDS:
            means = [statistics.mean(g[name][f][i] for g in groups) for i in range(GROUPS)]
            table.append([f"{name} {f}", *(f"{m:.2f}" for m in means)])
    print(format_table(table))


if __name__ == "__main__":
    main()
