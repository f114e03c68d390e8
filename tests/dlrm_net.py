"""A model with facebookresearch/dlrm's ``DLRM_Net`` interface, its data and its checkpoint file.

Written here from the interface of ``dlrm_s_pytorch.py`` (not copied): ``emb_l``, an
``nn.ModuleList`` of ``nn.EmbeddingBag(n, m, mode="sum", sparse=True)``; ``bot_l`` / ``top_l``,
``nn.Sequential`` MLPs of Linear + ReLU with a Sigmoid after the layer ``sigmoid_top``;
``forward(dense_x, lS_o, lS_i)`` calling each table as ``E(indices, offsets,
per_sample_weights=None)``; the "dot" interaction of the bottom output with every table's bag;
an output of probabilities (B, 1). ``save_like_dlrm`` writes the dict ``dlrm_s_pytorch.py
--save-model`` writes (numpy-scalar metrics, optimizer state).

Also a small task for it (``make_dlrm_data``: columns ``dense_0..3``, ``cat_0..3`` with ``cat_3``
multi-hot and id 0 a real row) and the training dlrm does (SGD on sparse gradients, BCE on the
probabilities). Used by tests/test_adapters_dlrm.py and bench/dlrm.py. A helper, no tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

#: The task's tables (rows) and widths; build_dlrm_net() builds the model for it.
ROWS = (300, 120, 40, 25)
DIM = 8
NUM_DENSE = 4
MULTI_HOT = 3  # cat_3 is a list column (0-3 ids, id 0 a real row)


class DLRM_Net(nn.Module):  # noqa: N801 - the class name users have
    """DLRM_Net's interface (module docstring); only the single-device path."""

    def __init__(
        self,
        m_spa: int,
        ln_emb: Sequence[int],
        ln_bot: Sequence[int],
        ln_top: Sequence[int],
        arch_interaction_op: str = "dot",
        arch_interaction_itself: bool = False,
        sigmoid_bot: int = -1,
        sigmoid_top: int = -1,
        loss_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.arch_interaction_op = arch_interaction_op
        self.arch_interaction_itself = arch_interaction_itself
        self.loss_threshold = loss_threshold
        self.emb_l = nn.ModuleList()
        for n in ln_emb:
            table = nn.EmbeddingBag(int(n), int(m_spa), mode="sum", sparse=True)
            bound = float(np.sqrt(1.0 / n))
            nn.init.uniform_(table.weight, -bound, bound)
            self.emb_l.append(table)
        self.v_W_l = [None] * len(self.emb_l)
        self.bot_l = self.create_mlp(ln_bot, sigmoid_bot)
        self.top_l = self.create_mlp(ln_top, sigmoid_top)

    @staticmethod
    def create_mlp(ln: Sequence[int], sigmoid_layer: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(len(ln) - 1):
            n, m = int(ln[i]), int(ln[i + 1])
            linear = nn.Linear(n, m, bias=True)
            nn.init.normal_(linear.weight, 0.0, float(np.sqrt(2.0 / (m + n))))
            nn.init.normal_(linear.bias, 0.0, float(np.sqrt(1.0 / m)))
            layers.append(linear)
            layers.append(nn.Sigmoid() if i == sigmoid_layer else nn.ReLU())
        return nn.Sequential(*layers)

    def apply_emb(self, lS_o, lS_i) -> list[torch.Tensor]:  # noqa: N803 - dlrm's names
        bags = []
        for k, indices in enumerate(lS_i):
            E = self.emb_l[k]  # noqa: N806
            w = self.v_W_l[k]
            per_sample_weights = None if w is None else w.gather(0, indices)
            bags.append(E(indices, lS_o[k], per_sample_weights=per_sample_weights))
        return bags

    def interact_features(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        if self.arch_interaction_op == "cat":
            return torch.cat([x, *ly], dim=1)
        batch, d = x.shape
        t = torch.cat([x, *ly], dim=1).view(batch, -1, d)
        z = torch.bmm(t, t.transpose(1, 2))
        f = z.shape[1]
        shift = 1 if self.arch_interaction_itself else 0
        # The lower triangle (with the diagonal if arch_interaction_itself), row by row.
        li, lj = torch.tril_indices(f, f, offset=shift - 1)
        return torch.cat([x, z[:, li, lj]], dim=1)

    def forward(self, dense_x, lS_o, lS_i):  # noqa: N803 - dlrm's names
        x = self.bot_l(dense_x)
        ly = self.apply_emb(lS_o, lS_i)
        p = self.top_l(self.interact_features(x, ly))
        if 0.0 < self.loss_threshold < 1.0:
            p = torch.clamp(p, min=self.loss_threshold, max=1.0 - self.loss_threshold)
        return p


def dlrm_net_for(rows: Sequence[int] = ROWS, dim: int = DIM, num_dense: int = NUM_DENSE,
                 **kwargs) -> DLRM_Net:
    """A DLRM_Net as dlrm_s_pytorch.py configures it: bottom MLP num_dense-16-dim, top MLP
    (dim + interactions)-16-1 with the Sigmoid last (``sigmoid_top = len(ln_top) - 2``)."""
    f = len(rows) + 1
    ln_top = (dim + f * (f - 1) // 2, 16, 1)
    return DLRM_Net(dim, rows, (num_dense, 16, dim), ln_top,
                    sigmoid_top=len(ln_top) - 2, **kwargs)


def build_dlrm_net() -> DLRM_Net:
    """The factory (``--model dlrm_net:build_dlrm_net``): the model of :func:`make_dlrm_data`."""
    return dlrm_net_for()


def make_dlrm_data(out_dir: str | os.PathLike[str], num_rows: int = 20_000,
                   seed: int = 0) -> dict[str, Path]:
    """Write ``train/valid/test.parquet`` (80/10/10) of a planted task for :func:`build_dlrm_net`.

    Columns ``dense_0..3`` float32 N(0, 1); ``cat_0..2`` int64 Zipf ids of tables ``ROWS``;
    ``cat_3`` list<int64> of 0-3 ids in [0, ROWS[3]) (id 0 a real, frequent row); ``label``
    Bernoulli(sigmoid(logit)) of a rank-4 affinity of cat_0 and cat_1, per-id biases of
    cat_0..2, the mean of per-id biases of cat_3 and the dense features.
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def zipf(n: int, size: int) -> np.ndarray:
        w = np.arange(1, n + 1, dtype=np.float64) ** -1.1
        return rng.permutation(n)[rng.choice(n, size=size, p=w / w.sum())].astype(np.int64)

    ids = [zipf(ROWS[k], num_rows) for k in range(3)]
    u = rng.normal(size=(ROWS[0], 4))
    v = rng.normal(size=(ROWS[1], 4))
    bias0 = rng.normal(scale=0.6, size=ROWS[0])
    bias1 = rng.normal(scale=0.6, size=ROWS[1])
    bias2 = rng.normal(scale=0.7, size=ROWS[2])
    bias3 = rng.normal(scale=0.8, size=ROWS[3])
    bias3[0] = 1.5  # id 0 matters: a model that drops it as padding loses signal
    dense = rng.normal(size=(num_rows, NUM_DENSE)).astype(np.float32)
    lengths = rng.integers(0, 4, size=num_rows)
    lists = [zipf(ROWS[3], int(n)) for n in lengths]
    tag = np.array([bias3[x].mean() if len(x) else 0.0 for x in lists])
    logit = (1.5 * (u[ids[0]] * v[ids[1]]).sum(1) / 2.0 + bias0[ids[0]] + bias1[ids[1]]
             + bias2[ids[2]] + tag
             + 0.6 * dense[:, 0] - 0.4 * dense[:, 1] - 0.3)
    label = (rng.random(num_rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    columns = {f"dense_{j}": dense[:, j] for j in range(NUM_DENSE)}
    columns.update({f"cat_{k}": ids[k] for k in range(3)})
    table = pa.table({
        **columns,
        f"cat_{MULTI_HOT}": pa.array([x.tolist() for x in lists], type=pa.list_(pa.int64())),
        "label": label,
    })
    order = rng.permutation(num_rows)
    cut1, cut2 = int(0.8 * num_rows), int(0.9 * num_rows)
    paths = {}
    for name, rows in (("train", order[:cut1]), ("valid", order[cut1:cut2]),
                       ("test", order[cut2:])):
        paths[name] = out / f"{name}.parquet"
        pq.write_table(table.take(pa.array(np.sort(rows))), paths[name])
    return paths


def train_like_dlrm(model: DLRM_Net, train: str | os.PathLike[str], epochs: int = 5,
                    lr: float = 0.5, batch_size: int = 128, seed: int = 0) -> torch.optim.SGD:
    """Train as dlrm_s_pytorch.py does: SGD (sparse gradients for the tables), BCE on the
    model's probabilities. Returns the optimizer (its state goes into the checkpoint)."""
    from amtl_compress.data import open_data
    from amtl_compress.models.adapters.dlrm import dlrm_inputs

    torch.manual_seed(seed)
    data = open_data(train, list_padding=-1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.BCELoss()
    model.train()
    for epoch in range(epochs):
        for features, labels in data.batches(batch_size, shuffle=True, seed=seed + epoch):
            p = model(*dlrm_inputs(features)).reshape(-1)
            loss = loss_fn(p, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return optimizer


def save_like_dlrm(model: DLRM_Net, optimizer: torch.optim.Optimizer,
                   path: str | os.PathLike[str]) -> None:
    """``torch.save`` the dict dlrm_s_pytorch.py --save-model writes: numpy-scalar metrics
    (``test_acc``, ``train_loss``, ``total_loss``), counters, ``state_dict`` and
    ``opt_state_dict``."""
    torch.save({
        "epoch": 0,
        "iter": 100,
        "nepochs": 1,
        "nbatches": 100,
        "nbatches_test": 10,
        "train_loss": np.float32(0.52),
        "total_loss": np.float64(52.0),
        "test_acc": np.float64(0.75),
        "state_dict": model.state_dict(),
        "opt_state_dict": optimizer.state_dict(),
    }, path)
