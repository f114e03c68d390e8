"""The synthetic CTR fixture: deterministic, contract-valid, Zipf frequencies, a learnable label."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from amtl_compress.data.counts import count_frequencies
from amtl_compress.data.dataset import TabularData
from amtl_compress.data.splits import CTRSplits
from amtl_compress.data.synthetic import make_synthetic_ctr, zipf_ids
from amtl_compress.models.dlrm import DLRM, dlrm_config_for


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> CTRSplits:
    return make_synthetic_ctr(tmp_path_factory.mktemp("syn"), seed=0)


def test_schema_and_contract(synthetic: CTRSplits) -> None:
    assert synthetic.categorical == {"user_id": 1000, "item_id": 500}
    assert synthetic.list_fields == {"tags": 21}
    assert synthetic.dense == ("activity",)
    assert CTRSplits.load(synthetic.train.parent) == synthetic
    sizes = []
    for path in (synthetic.train, synthetic.valid, synthetic.test):
        data = TabularData.open(path)
        assert data.categorical_columns == ("user_id", "item_id")
        assert data.dense_columns == ("activity",) and data.list_columns == ("tags",)
        for column, n in {**synthetic.categorical, **synthetic.list_fields}.items():
            data.validate_ids(column, n)
        sizes.append(data.num_rows)
    assert sizes == [16_000, 2_000, 2_000]


def test_same_seed_same_data_other_seed_other_data(synthetic: CTRSplits, tmp_path: Path) -> None:
    again = make_synthetic_ctr(tmp_path / "a", seed=0)
    other = make_synthetic_ctr(tmp_path / "b", seed=1)
    assert pq.read_table(again.train).equals(pq.read_table(synthetic.train))
    assert not pq.read_table(other.train).equals(pq.read_table(synthetic.train))


def test_frequencies_span_orders_of_magnitude(synthetic: CTRSplits) -> None:
    counts = count_frequencies(synthetic.train, "user_id", 1000)
    seen = counts[counts > 0]
    assert counts.max() >= 1000 and seen.min() <= 2
    assert counts.max() / torch.median(seen.double()) >= 50
    # The head is not the first rows of the table: ranks are shuffled onto ids.
    assert set(torch.topk(counts, 10).indices.tolist()) != set(range(10))


def test_zipf_ids_follow_the_power_law() -> None:
    rng = np.random.default_rng(0)
    ids = zipf_ids(rng, 100, 200_000, exponent=1.0)
    freq = np.sort(np.bincount(ids, minlength=100))[::-1]
    # P(rank k) ~ 1/k: rank 1 is about twice rank 2 and ten times rank 10.
    assert 1.8 < freq[0] / freq[1] < 2.2
    assert 8.5 < freq[0] / freq[9] < 11.5


def test_label_carries_the_planted_signal(synthetic: CTRSplits) -> None:
    train = TabularData.open(synthetic.train)
    activity, labels = train.features["activity"], train.labels
    assert 0.3 < labels.mean() < 0.7
    assert labels[activity > 1].mean() - labels[activity < -1].mean() > 0.2

    # Tiny ops: one thread is faster, and far faster when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scores, y = _train_and_score(synthetic, train)
    finally:
        torch.set_num_threads(threads)
    assert _auc(y, scores) > 0.65  # chance is 0.5; the Bayes rate is near 0.8


def _train_and_score(synthetic: CTRSplits, train: TabularData) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = DLRM(dlrm_config_for(synthetic, embedding_dim=8))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for epoch in range(3):  # 48 steps: big batches keep this test cheap
        for x, y in train.batches(1024, shuffle=True, seed=epoch):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    x, y = next(TabularData.open(synthetic.valid).batches(10_000))
    with torch.no_grad():
        return model(x), y


def test_generation_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_synthetic_ctr(tmp_path, num_rows=20_000)
    assert time.perf_counter() - start < 2.0  # budget 1 s; slack for loaded CI machines


def _auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    ranks = torch.empty_like(scores)
    ranks[torch.argsort(scores)] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    pos = labels.sum()
    neg = len(labels) - pos
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))
