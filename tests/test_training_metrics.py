import math

import torch

from amtl_compress.training.metrics import logloss, roc_auc


def brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 7, (300,), generator=g).float()  # many ties
    labels = torch.randint(0, 2, (300,), generator=g)
    assert math.isclose(
        roc_auc(scores, labels), brute_force_auc(scores.tolist(), labels.tolist()), rel_tol=1e-12
    )


def test_auc_extremes_and_single_class():
    labels = torch.tensor([0, 0, 1, 1])
    assert roc_auc(torch.tensor([0.0, 1.0, 2.0, 3.0]), labels) == 1.0
    assert roc_auc(torch.tensor([3.0, 2.0, 1.0, 0.0]), labels) == 0.0
    assert math.isnan(roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1])))


def test_logloss_matches_formula():
    logits = torch.tensor([-2.0, 0.0, 3.0])
    labels = torch.tensor([0.0, 1.0, 1.0])
    p = torch.sigmoid(logits.double())
    expected = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert math.isclose(logloss(logits, labels), float(expected), rel_tol=1e-12)
