"""The length rules and bookkeeping of bench/quality.py (the real bench takes minutes; the
synthetic task runs here on tiny sizes in seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
sys.path.insert(0, str(_PATH.parent))  # quality.py imports its sibling planted.py
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
    assert quality.frequency_group_means(lengths, counts) == [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0]


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


# The synthetic task (bench/planted.py), on the tiny sizes of planted.TINY.


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1])
def test_tier_rule_fits_the_bytes_and_follows_frequency(budget):
    counts = {"user_id": zipf_counts(), "item_id": zipf_counts(700)}
    dense = sum(c.numel() for c in counts.values()) * 64 * 4
    lengths = quality.tier_rule(int(budget * dense), counts, 64)
    kept_bytes = sum(int(v.sum()) for v in lengths.values()) * 4 + 2 * 64 * 64 * 4
    assert kept_bytes <= budget * dense
    for f, c in counts.items():
        order = torch.argsort(c)
        assert torch.all(lengths[f][order].diff() >= 0)  # never shorter for a more frequent row
        assert lengths[f].min() >= 1 and lengths[f].max() <= 64


def test_spearman_ranks_with_ties():
    counts = torch.tensor([0, 1, 1, 5, 9])
    assert quality.rank_correlation(counts * 2, counts) == pytest.approx(1.0)
    assert quality.rank_correlation(-counts, counts) == pytest.approx(-1.0)
    assert quality.rank_correlation(torch.ones(5), counts) == 0.0


def test_compare_at_bytes_takes_the_best_rival_at_or_under_its_bytes():
    rows = [
        {"method": "FBE (trained)", "group": "FBE", "bytes_ratio": 1.0, "diff": 0.0},
        {"method": "t8", "group": "truncate +pca", "bytes_ratio": 0.2, "diff": -0.01},
        {"method": "t16", "group": "truncate +pca", "bytes_ratio": 0.3, "diff": -0.002},
        {"method": "A", "group": "AMTL float32", "bytes_ratio": 0.25, "diff": -0.005},
    ]
    (cmp,) = quality.compare_at_bytes(rows)
    assert cmp["best_other"] == "t8" and cmp["margin"] == pytest.approx(0.005)


def test_planted_generator_is_seeded_and_plants_longer_rows_for_frequent_ids(tmp_path):
    import numpy as np

    sys.path.insert(0, str(_PATH.parent))
    import planted

    a = planted.make_planted(tmp_path / "a", 3, planted.TINY)
    b = planted.make_planted(tmp_path / "b", 3, planted.TINY)
    assert a.train.read_bytes() == b.train.read_bytes()
    truth = np.load(tmp_path / "a" / "truth.npz")
    for f in ("user_id", "item_id"):
        p, dims = truth[f"p_{f}"], truth[f"dims_{f}"]
        order = np.argsort(p)
        assert np.all(np.diff(dims[order]) >= 0) and dims.max() > dims.min()


def test_synthetic_task_smoke(tmp_path):
    """The whole synthetic task on the tiny sizes: every method, bytes as stored (seconds)."""
    rows, groups = quality.run_synthetic_seed(0, tmp_path / "seed0", tiny=True)
    by = {r["method"]: r for r in rows}
    d, n = 16, 3_000 + 2_000
    assert by["FBE (trained)"]["bytes"] == n * d * 4
    assert n * d < by["PTQ int8"]["bytes"] < by["PTQ float16"]["bytes"]
    assert by["truncate k=4 +pca"]["bytes"] == n * 4 * 4 + 2 * d * d * 4
    assert by["AMTL @0.3 float32"]["kept_ratio"] == pytest.approx(0.3, abs=0.05)
    assert by["AMTL @0.3 int8"]["bytes"] < by["AMTL @0.3 float32"]["bytes"]
    assert {"MDE @0.3", "freq tiers @0.25 +pca float32", "freq tiers @0.25 +pca int8"} <= set(by)
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)
    assert set(groups["amtl-0.3 rho"]) == {"user_id", "item_id"}
