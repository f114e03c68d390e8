"""The shared pieces of every training loop: evaluation and one optimisation epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from amtl_compress.errors import TrainingError
from amtl_compress.training.metrics import logloss, roc_auc

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict(model: nn.Module, batches: Iterator[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``batches``.

    Returns:
        (logits float32 (rows,), labels float32 (rows,)), concatenated in batch order.
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for features, y in batches:
            logits.append(model(features).float().reshape(-1))
            labels.append(y.float().reshape(-1))
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]:
    """AUC and logloss of ``model`` on ``batches``: ``{"auc": ..., "logloss": ...}``."""
    logits, labels = predict(model, batches)
    return {"auc": roc_auc(logits, labels), "logloss": logloss(logits, labels)}


def bce_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> float:
    """One optimiser step on the binary cross-entropy (plus ``penalty()``); returns the BCE.

    ``penalty``, if given, returns a scalar tensor added to the loss before ``backward`` (the
    memory budget's Lagrangian term, training/finetune.py).

    Raises:
        TrainingError: the loss is NaN or inf. The step is not applied, so the model keeps its
            last good state.
    """
    optimizer.zero_grad(set_to_none=True)
    logits = model(features).reshape(-1)
    loss = F.binary_cross_entropy_with_logits(logits, labels.float())
    total = loss if penalty is None else loss + penalty()
    if not torch.isfinite(total):
        raise TrainingError(
            f"the training loss became {float(loss.detach())}; the last good state is kept - "
            "lower the learning rate (--lr / --amtl-lr) or check the data for extreme values"
        )
    total.backward()
    try:
        optimizer.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise TrainingError(
            "the optimiser step overflowed float32; the last good state is kept - lower the "
            "learning rate (--lr / --amtl-lr)"
        ) from None
    return float(loss.detach())
