"""Shared fixtures: one tiny synthetic CTR data set and a trained baseline per test session."""

from __future__ import annotations

import pytest
import torch

from amtl_compress.data.synthetic import make_synthetic_ctr
from amtl_compress.training.train import TrainConfig, train_dlrm


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """CTRSplits of a 6k-row synthetic data set (Zipf user/item ids, a list and a dense column)."""
    return make_synthetic_ctr(
        tmp_path_factory.mktemp("synthetic"), num_rows=6000, num_users=400, num_items=200, seed=0
    )


@pytest.fixture(scope="session")
def baseline(synthetic, tmp_path_factory):
    """A trained reference-DLRM checkpoint (.safetensors) on ``synthetic``."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("baseline") / "base.safetensors"
    train_dlrm(
        synthetic.train, synthetic.valid, path,
        TrainConfig(embedding_dim=8, epochs=2, batch_size=512), progress=False,
    )
    return path
