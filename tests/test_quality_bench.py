"""The length rules and bookkeeping of bench/quality.py (the bench itself takes minutes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
_spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def zipf_counts(n: int = 1000) -> torch.Tensor:
    return (10_000 / torch.arange(1, n + 1).double() ** 1.1).long()[torch.randperm(n)]


@pytest.mark.parametrize("budget", [0.6, 0.4, 0.25, 0.15])
def test_freq_rule_spends_the_budget_on_the_most_frequent_rows(budget):
    counts = zipf_counts()
    lengths = quality.freq_rule(budget, 16)("f", counts)
    assert set(lengths.unique().tolist()) <= {1, 16}
    ratio = lengths.sum().item() / (counts.numel() * 16)
    assert budget - 15 / (16 * 1000) <= ratio <= budget
    full = lengths == 16
    assert counts[full].min() >= counts[~full].max()


@pytest.mark.parametrize("budget", [0.6, 0.4, 0.25, 0.15])
def test_mde_layout_fits_the_budget_and_follows_frequency(budget):
    counts = zipf_counts()
    lengths, block, dims = quality.mde_layout(counts, budget, 16)
    projections = sum(d * 16 for d in dims if d < 16)
    assert lengths.sum().item() + projections <= budget * counts.numel() * 16
    assert dims == sorted(dims, reverse=True)  # block 0 = most frequent rows
    assert torch.equal(lengths, torch.tensor(dims)[block])
    means = [counts[block == k].double().mean() for k in range(len(dims))]
    assert means == sorted(means, reverse=True)


def test_group_means_orders_rows_by_count():
    counts = torch.tensor([5, 0, 3, 9, 1, 7, 2])
    lengths = counts + 1  # longer for more frequent rows
    assert quality.group_means(lengths, counts) == [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0]


def test_fixed_prefix_masks_rotates_and_projects():
    weight = torch.arange(12.0).reshape(3, 4)
    rotation = torch.eye(4)[[1, 0, 3, 2]]
    table = quality.FixedPrefix(weight, torch.tensor([1, 2, 4]), rotation)
    rows = table(torch.tensor([0, 1, 2]))
    want = torch.tensor([[0.0, 0, 0, 0], [4, 5, 0, 0], [8, 9, 10, 11]]) @ rotation
    assert torch.equal(rows, want)
    mde = quality.FixedPrefix(weight, torch.tensor([1, 2, 4]), None, torch.tensor([0, 1, 1]), 2)
    with torch.no_grad():
        mde.projections[1].mul_(2.0)
    assert torch.equal(mde(torch.tensor([0, 1])), torch.tensor([[0.0, 0, 0, 0], [8, 10, 0, 0]]))
