"""A planted CTR task on which per-row embedding lengths can matter: the synthetic quality task.

MovieLens-100k cannot tell compression methods apart (its tables are nearly rank 2). This
generator plants what the AMTL paper assumes (Sec. 2.2, 3.5): a row's information grows with
its frequency. Every parameter below was fixed, with its reason, before any compression method
ran on the task; the only run used while choosing them was the discrimination check
(``python bench/planted.py --check``: the trained model against uniform PCA truncation to
k = 16 of 64, no fine-tuning), which must lose >= 0.01 test AUC; it loses 0.0210 (seed 0).

Ground truth. Two tables, users (N_u rows) and items (N_i rows). Row r has a true vector
t_r in R^D that is non-zero only in its first d(r) coordinates of a shared orthonormal basis Q
(one random D x D rotation per table, so the planted axes are not the stored axes), with those
coordinates i.i.d. N(0, 1):

    d(r) = clip(round(DIM_SLOPE * log2(1 + c(r))), 1, D),   c(r) = expected training count

so a row seen ~1 time has 4 dims, ~10 times 14, ~100 times 27, ~1000 times 40, ~30,000 times
60 (nested: a frequent row's first dims play the same role as a rare row's). Each sample draws a
user and an item independently from Zipf laws (rank k with probability proportional to
k^-ZIPF, ranks shuffled onto ids) and gets

    logit = SCALE * <t_user, t_item> + N(0, NOISE^2),   label ~ Bernoulli(sigmoid(logit))

(the dot product is what the reference DLRM's interaction computes, so the task is learnable by
the model under test; the Gaussian term is noise no model can learn).

Why this separates the methods: all rows share the leading planted axes, so the principal axes
of the trained table recover them and a prefix in PCA order is the right thing to keep; but the
right prefix LENGTH differs per row. Uniform truncation to k cuts the frequent rows' dims
k..d(r) (which carry most of the samples' signal) and keeps dims of rare rows that their few
samples could not teach. Frequency tiers and AMTL can give frequent rows long prefixes and rare
rows short ones; whether AMTL's learned lengths beat a fixed frequency rule is the question.

Parameters (``PLANTED``):
    num_users 600,000, num_items 400,000: >= 1M rows over 2 tables (the paper's regime of large
        tables with a heavy tail), 64M float32 parameters at D = 64.
    dim 64: the brief's D; 25 % of it is k = 16.
    zipf 1.05: a heavy tail as in click logs: in the 6.4M training samples 73 % of the user
        rows and 60 % of the item rows are seen <= 2 times (30 % / 18 % never), while the top
        1,000 rows of each table take 62-64 % of the samples (seed 0). The mean d(r) is 6.0
        (users) / 7.5 (items): the planted information would fit in ~10 % of N x D if every
        row got exactly its length, while the head rows need 40-64 dims.
    dim_slope 4.0: d(r) spans 1..64 over the count range of the data (1 .. ~1e5), so every
        frequency group has a different right length and no fixed k suits all rows.
    scale 0.5: the logit of two rows with 16 shared dims has std 2, of two head rows with 64
        shared dims std 4: labels informative for the head, weak for the tail. The only
        parameter the discrimination check changed: at 0.25 the trained model reached test AUC
        0.6758 and PCA k = 16 0.6691 (loss 0.0067 < 0.01: the model could not learn the weak
        high dims); at 0.5 it reaches 0.7670 against 0.7460 (loss 0.0210; seed 0). The Bayes
        AUC of the planted logit is 0.889 at 0.5 (0.780 at 0.25), so the trained model is far
        from perfect: what it did learn is what the methods compete to keep.
    noise 0.5: unlearnable logit noise, so a perfect model does not reach AUC 1.
    samples 8,000,000 (80/10/10 train/valid/test): enough that the head rows' 40-64 dims are
        learnable (a row with d = 40 is seen ~1000 times) within the runtime budget.
    train_epochs 2, train_batch 16384, train_lr 0.01: the bench's own baseline training (sparse
        row updates, see :func:`train_base`; ~35 s an epoch on one core); the trained model is
        the reference every method starts from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from amtl_compress.checkpoint import load_model, save_checkpoint
from amtl_compress.core.rotation import principal_axes
from amtl_compress.data.dataset import TabularData
from amtl_compress.data.splits import CTRSplits
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import model_spec_for
from amtl_compress.training.loop import evaluate

FIELDS = ("user_id", "item_id")


@dataclass(frozen=True)
class PlantedConfig:
    """The generator's parameters (the module docstring gives the reason for each)."""

    num_users: int = 600_000
    num_items: int = 400_000
    dim: int = 64
    zipf: float = 1.05
    dim_slope: float = 4.0
    scale: float = 0.5
    noise: float = 0.5
    samples: int = 8_000_000
    train_epochs: int = 2
    train_batch: int = 16_384
    train_lr: float = 0.01


PLANTED = PlantedConfig()
# A tiny variant for the smoke test (seconds); never used for reported numbers.
TINY = PlantedConfig(num_users=3_000, num_items=2_000, dim=16, samples=60_000,
                     train_epochs=1, train_batch=2048)


def _table(rng: np.random.Generator, rows: int, cfg: PlantedConfig, train_samples: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(probability per id (rows,), true vectors float32 (rows, D), intrinsic dims int64 (rows,),
    rank -> id permutation (rows,))."""
    p_rank = np.arange(1, rows + 1, dtype=np.float64) ** -cfg.zipf
    p_rank /= p_rank.sum()
    perm = rng.permutation(rows)  # rank k -> id perm[k]
    p = np.empty(rows)
    p[perm] = p_rank
    dims = np.clip(np.round(cfg.dim_slope * np.log2(1.0 + train_samples * p)), 1, cfg.dim)
    dims = dims.astype(np.int64)
    coords = rng.standard_normal((rows, cfg.dim), dtype=np.float32)
    coords *= np.arange(cfg.dim)[None, :] < dims[:, None]
    basis = np.linalg.qr(rng.standard_normal((cfg.dim, cfg.dim)))[0].astype(np.float32)
    return p, coords @ basis.T, dims, perm


def make_planted(out_dir: Path, seed: int, cfg: PlantedConfig = PLANTED) -> CTRSplits:
    """Write train/valid/test.parquet (user_id, item_id int64; label int64 0/1), splits.json and
    planted.json (the config, the seed) plus truth.npz (probabilities and intrinsic dims per id)
    into ``out_dir``. Same seed and config, same files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_train = int(cfg.samples * 0.8)
    n_valid = int(cfg.samples * 0.1)
    p_u, t_u, d_u, perm_u = _table(rng, cfg.num_users, cfg, n_train)
    p_i, t_i, d_i, perm_i = _table(rng, cfg.num_items, cfg, n_train)
    users = np.empty(cfg.samples, dtype=np.int64)
    items = np.empty(cfg.samples, dtype=np.int64)
    labels = np.empty(cfg.samples, dtype=np.int64)
    cdf_u = np.cumsum(np.sort(p_u)[::-1])
    cdf_i = np.cumsum(np.sort(p_i)[::-1])
    chunk = 1_000_000  # bounds the (chunk, D) gathers to 256 MB
    for start in range(0, cfg.samples, chunk):
        n = min(chunk, cfg.samples - start)
        u = perm_u[np.minimum(np.searchsorted(cdf_u, rng.random(n) * cdf_u[-1]),
                              cfg.num_users - 1)]
        i = perm_i[np.minimum(np.searchsorted(cdf_i, rng.random(n) * cdf_i[-1]),
                              cfg.num_items - 1)]
        logit = cfg.scale * np.einsum("bd,bd->b", t_u[u], t_i[i])
        logit += cfg.noise * rng.standard_normal(n)
        users[start:start + n], items[start:start + n] = u, i
        labels[start:start + n] = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    # the samples are i.i.d., so the first 80 % is a random split
    cuts = {"train": (0, n_train), "valid": (n_train, n_train + n_valid),
            "test": (n_train + n_valid, cfg.samples)}
    for name, (a, b) in cuts.items():
        pq.write_table(pa.table({"user_id": users[a:b], "item_id": items[a:b],
                                 "label": labels[a:b]}), out_dir / f"{name}.parquet")
    np.savez(out_dir / "truth.npz", p_user_id=p_u, p_item_id=p_i, dims_user_id=d_u,
             dims_item_id=d_i)
    (out_dir / "planted.json").write_text(json.dumps({"seed": seed, **asdict(cfg)}, indent=1))
    splits = CTRSplits(train=out_dir / "train.parquet", valid=out_dir / "valid.parquet",
                       test=out_dir / "test.parquet",
                       categorical={"user_id": cfg.num_users, "item_id": cfg.num_items})
    splits.save(out_dir)
    return splits


def train_base(splits: CTRSplits, out: Path, seed: int, cfg: PlantedConfig = PLANTED,
               progress: bool = False) -> Path:
    """Train the reference DLRM (D = cfg.dim, the two tables, no dense features) and save it as
    a library checkpoint at ``out``.

    Bench-only recipe, for speed at 1M rows: the tables take sparse gradients and
    torch.optim.SparseAdam (only the rows of a batch are updated: a dense Adam step over 64M
    parameters costs ~0.1 s on 2 cores), the MLP takes Adam; cfg.train_epochs passes of
    cfg.train_batch rows at cfg.train_lr; the epoch with the best validation AUC is kept.
    """
    torch.manual_seed(seed)
    model = DLRM(DLRMConfig(categorical=dict(splits.categorical), embedding_dim=cfg.dim))
    for f in FIELDS:
        model.embeddings[f].sparse = True
    tables = [model.embeddings[f].weight for f in FIELDS]
    others = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
    sparse_opt = torch.optim.SparseAdam(tables, lr=cfg.train_lr)
    dense_opt = torch.optim.Adam(others, lr=cfg.train_lr)
    train, valid = TabularData.open(splits.train), TabularData.open(splits.valid)
    loss_fn = nn.BCEWithLogitsLoss()
    best, best_state = -math.inf, None
    for epoch in range(cfg.train_epochs):
        model.train()
        start = time.time()
        for features, labels in train.batches(cfg.train_batch, shuffle=True,
                                              seed=seed * 1_000 + epoch):
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss_fn(model(features), labels).backward()
            sparse_opt.step()
            dense_opt.step()
        model.eval()
        auc = evaluate(model, valid.batches(65_536))["auc"]
        if progress:
            print(f"  base epoch {epoch}: valid AUC {auc:.4f} ({time.time() - start:.0f} s)",
                  file=sys.stderr)
        if auc > best:
            best = auc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    for f in FIELDS:
        model.embeddings[f].sparse = False
    save_checkpoint(out, model.state_dict(), model_spec_for(model.config))
    return out


@torch.no_grad()
def pca_prefix(weight: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """(rows (N, D) on the table's principal axes with row r cut to its first ``keep[r]`` dims,
    the (D, D) rotation R that maps them back: ``rows @ R``); what a truncated table stores."""
    rotation = principal_axes(weight)
    rotated = weight @ rotation.T
    rotated *= torch.arange(weight.shape[1]) < keep.unsqueeze(1)
    return rotated, rotation


@torch.no_grad()
def pca_truncated(model: nn.Module, lengths: dict[str, Tensor]) -> nn.Module:
    """``model`` with each table's rows cut to their first ``lengths[f]`` (N,) dims in the
    table's principal-axes basis (core/rotation.py) and rotated back: what a truncated table
    stores (kept values + the D x D rotation) decoded to D dims. Modifies ``model`` in place."""
    for f, keep in lengths.items():
        weight = model.embeddings[f].weight
        rotated, rotation = pca_prefix(weight, keep)
        weight.copy_(rotated @ rotation)
    return model


def check(out: Path, seed: int, cfg: PlantedConfig, k: int) -> dict:
    """The discrimination check: test AUC of the trained model and of uniform PCA truncation to
    k dims (no fine-tuning)."""
    start = time.time()
    splits = make_planted(out / "data", seed, cfg)
    print(f"generated in {time.time() - start:.0f} s", file=sys.stderr)
    start = time.time()
    base = train_base(splits, out / "base.safetensors", seed, cfg, progress=True)
    print(f"trained in {time.time() - start:.0f} s", file=sys.stderr)
    test = TabularData.open(splits.test)
    model, _ = load_model(base)
    trained = evaluate(model, test.batches(65_536))["auc"]
    rows = {f: model.embeddings[f].num_embeddings for f in FIELDS}
    truncated = evaluate(pca_truncated(model, {f: torch.full((rows[f],), k) for f in FIELDS}),
                         test.batches(65_536))["auc"]
    result = {"trained_auc": trained, f"pca_k{k}_auc": truncated, "loss": trained - truncated}
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="the planted task's discrimination check")
    parser.add_argument("--check", action="store_true", required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/planted-check"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the smoke-test sizes")
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 shared cores: a second thread costs more than it gives
    cfg = TINY if args.tiny else PLANTED
    check(args.out, args.seed, cfg, cfg.dim // 4)


if __name__ == "__main__":
    main()
