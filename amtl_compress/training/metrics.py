"""Click-through-rate metrics: ROC AUC and logloss.

Both take raw logits so that callers never apply a sigmoid twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def roc_auc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores given their average rank).

    Args:
        logits: float (B,), any monotone score.
        labels: float or int (B,), values in {0, 1}.

    Returns:
        AUC in [0, 1]; ``nan`` when only one class is present.
    """
    scores = logits.detach().double().flatten()
    y = labels.detach().flatten().bool()
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    # Average rank for ties: every member of a tie group gets the mean of its positions.
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank per group
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy (natural log) of ``sigmoid(logits)`` against ``labels``.

    Args:
        logits: float (B,).
        labels: float or int (B,), values in {0, 1}.
    """
    return float(
        F.binary_cross_entropy_with_logits(logits.detach().double(), labels.detach().double())
    )
