"""finetune -> pack -> load_packed on the reference DLRM, including an EmbeddingBag table."""

import pytest
import torch

from amtl_compress.checkpoint import load_model
from amtl_compress.core.rotation import RotatedLookup
from amtl_compress.data.dataset import TabularData
from amtl_compress.evaluation import compare
from amtl_compress.lookup.load import load_packed_model
from amtl_compress.lookup.modules import PackedEmbedding, PackedEmbeddingBag
from amtl_compress.storage.header import read_header
from amtl_compress.storage.pack import pack
from amtl_compress.training.config import FinetuneConfig
from amtl_compress.training.finetune import finetune
from amtl_compress.training.loop import predict


@pytest.fixture(scope="module")
def run_dir(synthetic, baseline, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    config = FinetuneConfig(
        fields={"user_id": "user_id", "item_id": "item_id", "tags": "tags"},
        epochs=1, batch_size=512, target_ratio=0.5,
    )
    finetune(baseline, synthetic.train, synthetic.valid, out, config, progress=False)
    return out


def test_packed_fp32_is_bitwise_the_masked_finetuned_model(synthetic, run_dir, tmp_path):
    report = pack(run_dir, tmp_path / "packed", dtype="float32", progress=False)
    dense, _ = load_model(run_dir / "model.safetensors")
    packed = load_packed_model(tmp_path / "packed")
    # finetune's default dimension ordering rotates every table, with a rotation of float16
    # values, which the float32 files store as F16 (2 bytes an entry), losslessly.
    for entry in report.tables:
        assert read_header(entry.file).tensors["rotation"].dtype == "F16"
        assert entry.stored.rotation == entry.embedding_dim**2 * 2
    assert isinstance(packed.embeddings["user_id"], RotatedLookup)
    assert isinstance(packed.embeddings["user_id"].table, PackedEmbedding)
    assert isinstance(packed.embeddings["tags"].table, PackedEmbeddingBag)
    test = TabularData.open(synthetic.test)
    want, _ = predict(dense, test.batches(1000))
    got, _ = predict(packed, test.batches(1000))
    assert torch.equal(want, got)


@pytest.mark.parametrize("dtype, auc_tol", [("float16", 1e-3), ("int8", 5e-3)])
def test_lossy_packing_stays_close_and_is_smaller(synthetic, run_dir, tmp_path, dtype, auc_tol):
    pack(run_dir, tmp_path / "fp32", dtype="float32", progress=False)
    pack(run_dir, tmp_path / dtype, dtype=dtype, progress=False)
    rows = compare(synthetic.test, run_dir=run_dir, packed_dir=tmp_path / dtype)
    finetuned, lossy = rows
    assert abs(finetuned.auc - lossy.auc) <= auc_tol
    exact = compare(synthetic.test, packed_dir=tmp_path / "fp32")[0]
    assert lossy.bytes < exact.bytes < finetuned.bytes
