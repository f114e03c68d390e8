import json

import pytest
import torch
from safetensors.torch import load_file

from amtl_compress.checkpoint import load_model
from amtl_compress.errors import ConfigError, NoMatchingModuleError, OutputExistsError
from amtl_compress.training.config import FinetuneConfig, parse_field
from amtl_compress.training.finetune import finetune
from tests.reliability_helpers import interrupt_at_step

FIELDS = {"user_id": "user_id", "item_id": "item_id"}


def _config(**kw):
    base = dict(fields=FIELDS, epochs=2, batch_size=512, target_ratio=0.5, save_every=3)
    base.update(kw)
    return FinetuneConfig(**base)


def test_parse_field():
    assert parse_field("user_id") == ("user_id", "user_id")
    assert parse_field("embeddings.u=user_id") == ("embeddings.u", "user_id")
    bad = r"^bad `fields` entry `x=`; use `MODULE=COLUMN` or a bare name used for both$"
    with pytest.raises(ConfigError, match=bad):
        parse_field("x=")


def test_run_directory_contents(synthetic, baseline, tmp_path):
    out = tmp_path / "run"
    result = finetune(baseline, synthetic.train, synthetic.valid, out, _config(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "amtl.safetensors", "config.json", "lengths.safetensors", "metrics.json",
        "model.safetensors",
    ]
    assert not (tmp_path / "run.resume").exists()
    lengths = load_file(str(out / "lengths.safetensors"))
    assert set(lengths) == {"embeddings.user_id", "embeddings.item_id"}
    model, _ = load_model(out / "model.safetensors")
    for path, lens in lengths.items():
        assert lens.dtype == torch.int64
        assert int(lens.min()) >= 1 and int(lens.max()) <= 8
        weight = dict(model.named_modules())[path].weight
        # Merged: every value past a row's length is exactly zero.
        cols = torch.arange(weight.shape[1])
        assert torch.all(weight[cols[None, :] >= lens[:, None]] == 0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["before"]) == {"auc", "logloss"}
    # Epoch 0 is the model cut to the budget before any step: a candidate like the others.
    assert [(e["epoch"], e["step"]) for e in metrics["epochs"]] == [(0, 0), (1, 10), (2, 20)]
    assert metrics["epochs"][0]["meets_budget"] is True
    best = max(metrics["epochs"], key=lambda e: e["auc"])
    assert metrics["best_epoch"] == best["epoch"]
    table = metrics["tables"]["embeddings.user_id"]
    expected = float(lengths["embeddings.user_id"].double().mean())
    assert table["avg_kept_dim"] == pytest.approx(expected)
    config = json.loads((out / "config.json").read_text())
    assert FinetuneConfig.from_dict(config["finetune"]) == _config()
    assert result.metrics == metrics


def test_dense_parameters_stay_as_trained_unless_given_an_lr(synthetic, baseline, tmp_path):
    trained, _ = load_model(baseline)
    dense = {n: p for n, p in trained.named_parameters() if not n.startswith("embeddings.")}
    assert dense  # the fixture's DLRM has MLPs
    for dense_lr, same in ((0.0, True), (1e-2, False)):
        out = tmp_path / f"run-{dense_lr}"
        result = finetune(baseline, synthetic.train, synthetic.valid, out,
                          _config(dense_lr=dense_lr, epochs=1, target_ratio=None),
                          progress=False)
        assert result.metrics["best_epoch"] == 1  # without a budget there is no epoch 0
        tuned = dict(load_model(out / "model.safetensors")[0].named_parameters())
        assert all(torch.equal(tuned[n], p) for n, p in dense.items()) is same
        # The tables are fine-tuned either way.
        assert not torch.equal(tuned["embeddings.item_id.weight"],
                               trained.embeddings.item_id.weight)


def test_budget_is_met_on_the_kept_epoch(synthetic, baseline, tmp_path):
    result = finetune(
        baseline, synthetic.train, synthetic.valid, tmp_path / "run",
        _config(epochs=3, target_ratio=0.4), progress=False,
    )
    for table in result.metrics["tables"].values():
        assert abs(table["memory_ratio"] - 0.4) <= 0.02


def test_resume_after_interruption_matches_uninterrupted_run(
    synthetic, baseline, tmp_path, monkeypatch
):
    config = _config()
    full = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "a", config,
                    progress=False)

    restore = interrupt_at_step(monkeypatch, 14)  # mid-epoch 2, after a save at step 12
    with pytest.raises(KeyboardInterrupt):
        finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "b", config,
                 progress=False)
    assert not (tmp_path / "b").exists() and (tmp_path / "b.resume" / "state.json").exists()
    restore()
    resumed = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "b", config,
                       progress=False)
    for path in full.lengths:
        assert torch.equal(full.lengths[path], resumed.lengths[path])
    assert resumed.metrics["after"] == full.metrics["after"]


def test_errors_before_any_work(synthetic, baseline, tmp_path):
    with pytest.raises(NoMatchingModuleError, match="no_such_table"):
        finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "r",
                 _config(fields={"no_such_table": "user_id"}), progress=False)
    (tmp_path / "exists").mkdir()
    exists = r"exists; pass `overwrite=True` or choose another `out`$"
    with pytest.raises(OutputExistsError, match=exists):
        finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "exists", _config(),
                 progress=False)
    assert not (tmp_path / "r").exists()
