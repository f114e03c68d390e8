"""Train the reference DLRM from scratch: the fixed-dimension (FBE) baseline checkpoint."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amtl_compress.checkpoint import save_checkpoint
from amtl_compress.data.dataset import TabularData
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import model_spec_for
from amtl_compress.training.loop import bce_step, evaluate


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of baseline training.

    Args:
        embedding_dim: D of every table.
        bottom_mlp: hidden sizes of the bottom MLP on dense features (its output is D).
        top_mlp: hidden sizes of the top MLP (its output is one logit).
        epochs: passes over the training data.
        batch_size: rows per optimiser step.
        lr: Adam learning rate.
        seed: parameter init and data order.
        label: name of the label column.
    """

    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (32,)
    top_mlp: tuple[int, ...] = (64, 32)
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 3e-3
    seed: int = 0
    label: str = "label"


def infer_dlrm_config(datasets: list[TabularData], config: TrainConfig) -> DLRMConfig:
    """A DLRM for the columns of ``datasets``: a table per integer column sized max id + 1."""
    first = datasets[0]

    def rows(column: str) -> int:
        return max(int(d.column(column).max()) for d in datasets) + 1

    return DLRMConfig(
        categorical={c: rows(c) for c in first.categorical_columns},
        list_fields={c: rows(c) for c in first.list_columns},
        dense=tuple(first.dense_columns),
        embedding_dim=config.embedding_dim,
        bottom_mlp=(*config.bottom_mlp, config.embedding_dim),
        top_mlp=config.top_mlp,
    )


def fit(
    model: torch.nn.Module,
    train_data: TabularData,
    valid_data: TabularData,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` with Adam on BCE, keep the epoch with the best validation AUC.

    Returns:
        The kept epoch's validation metrics plus ``"epoch"`` (1-based).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    steps = train_data.num_batches(batch_size)
    for epoch in range(epochs):
        model.train()
        bar = tqdm(
            train_data.batches(batch_size, shuffle=True, seed=seed * 100_003 + epoch),
            total=steps, desc=f"train epoch {epoch + 1}/{epochs}", file=sys.stderr,
            disable=not progress, dynamic_ncols=True,
        )
        for features, labels in bar:
            bar.set_postfix(loss=f"{bce_step(model, optimizer, features, labels):.4f}")
        scores = evaluate(model, valid_data.batches(batch_size))
        if best is None or scores["auc"] > best["auc"]:
            best = {**scores, "epoch": epoch + 1}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert best is not None and best_state is not None  # epochs >= 1
    model.load_state_dict(best_state)
    return best


def train_dlrm(
    data: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: TrainConfig = TrainConfig(),
    dlrm_config: DLRMConfig | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train the reference DLRM on ``data`` and save it to ``out`` (safetensors with its spec).

    Args:
        dlrm_config: the architecture; inferred from the data's columns when omitted.

    Returns:
        Validation metrics of the saved (best) epoch.
    """
    torch.manual_seed(config.seed)
    train_data = TabularData.open(data, label=config.label)
    valid_data = TabularData.open(valid, label=config.label)
    if dlrm_config is None:
        dlrm_config = infer_dlrm_config([train_data, valid_data], config)
    model = DLRM(dlrm_config)
    metrics = fit(
        model, train_data, valid_data, config.epochs, config.batch_size, config.lr, config.seed,
        progress,
    )
    save_checkpoint(
        Path(out), model.state_dict(), model_spec_for(dlrm_config),
        {"amtl_compress.train": str(dataclasses.asdict(config))},
    )
    return metrics
