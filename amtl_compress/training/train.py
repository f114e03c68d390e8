"""Train the reference DLRM from scratch: the fixed-dimension (FBE) baseline checkpoint.

Under torchrun the training is data-parallel, like ``finetune`` (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from amtl_compress.checkpoint import save_checkpoint
from amtl_compress.data import CTRData, open_data
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import model_spec_for
from amtl_compress.training.config import TrainConfig
from amtl_compress.training.distributed import World, process_group, wrap_ddp
from amtl_compress.training.loop import bce_step, evaluate, read_batches, sync_batch

__all__ = ["TrainConfig", "fit", "infer_dlrm_config", "train_dlrm"]


def infer_dlrm_config(datasets: list[CTRData], config: TrainConfig) -> DLRMConfig:
    """A DLRM for the columns of ``datasets``: a table per integer column sized max id + 1."""
    first = datasets[0]

    def rows(column: str) -> int:
        return max(d.max_id(column) for d in datasets) + 1

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
    train_data: CTRData,
    valid_data: CTRData,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    world: World | None = None,
) -> dict[str, float]:
    """Train ``model`` with Adam on BCE, keep the epoch with the best validation AUC.

    Args:
        world: the ranks of a data-parallel run: each rank trains on its shard of
            ``train_data`` (``batch_size`` rows per step each) with ``model`` in DDP, and the
            validation scores cover all of ``valid_data``. None: a single process.

    Returns:
        The kept epoch's validation metrics plus ``"epoch"`` (1-based).
    """
    world = World() if world is None else world
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    ddp = wrap_ddp(model, world)
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    steps = train_data.num_batches(batch_size, world.rank, world.size)
    for epoch in range(epochs):
        model.train()
        batches = train_data.batches(
            batch_size, shuffle=True, seed=seed * 100_003 + epoch, rank=world.rank,
            world_size=world.size,
        )
        bar = tqdm(
            read_batches(batches, steps), total=steps, desc=f"train epoch {epoch + 1}/{epochs}",
            file=sys.stderr, disable=not progress or not world.is_main, dynamic_ncols=True,
        )
        for item in bar:
            sync_batch(item, world)  # raises, on every rank, a batch one rank could not read
            features, labels = item  # type: ignore[misc]
            loss = bce_step(ddp, optimizer, features, labels, world=world)
            bar.set_postfix(loss=f"{loss:.4f}")
        scores = evaluate(model, valid_data.batches(batch_size), world)
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
    config: TrainConfig = TrainConfig(),  # noqa: B008 (frozen dataclass: immutable)
    dlrm_config: DLRMConfig | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train the reference DLRM on ``data`` and save it to ``out`` (safetensors with its spec).

    Under torchrun every rank calls this with the same arguments; rank 0 writes ``out``.

    Args:
        dlrm_config: the architecture; inferred from the data's columns when omitted.

    Returns:
        Validation metrics of the saved (best) epoch (the same on every rank).
    """
    with process_group() as world:
        # A call, so that fit's DDP model is gone when the process group is torn down.
        return _train_dlrm(world, data, valid, Path(out), config, dlrm_config, progress)


def _train_dlrm(
    world: World,
    data: str | os.PathLike[str],
    valid: str | os.PathLike[str],
    out: Path,
    config: TrainConfig,
    dlrm_config: DLRMConfig | None,
    progress: bool,
) -> dict[str, float]:
    with world.errors_agreed():  # one rank's error (e.g. its shard) stops all, reported once
        torch.manual_seed(config.seed)
        train_data = open_data(data, label=config.label)
        valid_data = open_data(valid, label=config.label)
        train_data.num_batches(config.batch_size, world.rank, world.size)  # a shard each
        if dlrm_config is None:
            dlrm_config = infer_dlrm_config([train_data, valid_data], config)
        model = DLRM(dlrm_config).to(world.device)
    metrics = fit(
        model, train_data, valid_data, config.epochs, config.batch_size, config.lr,
        config.seed, progress, world,
    )
    with world.errors_agreed():
        if world.is_main:
            save_checkpoint(
                out, model.state_dict(), model_spec_for(dlrm_config),
                {"amtl_compress.train": str(dataclasses.asdict(config))},
            )
    return metrics
