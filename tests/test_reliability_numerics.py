"""Numerical faults: a non-finite loss stops training with one line and keeps the last good
state; an AMTL layer that cut every row to length 1 is reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import amtl_compress.training.finetune as finetune_mod
from amtl_compress.cli import app
from amtl_compress.data.counts import count_frequencies
from amtl_compress.errors import TrainingError
from amtl_compress.training.finetune import FinetuneConfig, UnseenRowsWarning, finetune

runner = CliRunner(mix_stderr=False)


def _state_step(resume: Path) -> int:
    with safe_open(str(resume / "state.safetensors"), framework="pt") as f:
        return int(f.metadata()["step"])


def test_non_finite_loss_stops_with_one_line_and_keeps_a_good_state(
    synthetic, baseline, tmp_path: Path
) -> None:
    # An absurd learning rate: the weights grow by ~1e30 per step until the logits overflow.
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid", str(synthetic.valid),
        "--field", "user_id", "--out", str(out), "--epochs", "1", "--batch-size", "256",
        "--save-every", "5", "--lr", "1e30", "-q",
    ])
    assert result.exit_code == 1, result.output
    err = result.stderr
    assert err.startswith("Error: the training loss became ") and err.count("\n") == 1, err
    resume = tmp_path / "run.resume"
    assert f"saved in `{resume}`" in err and "lower the learning rate" in err
    assert not out.exists()
    # The state is the one just before the faulty step, saved then (the periodic save every 5
    # steps never came), and every tensor in it is finite.
    step = int(err.split("before step ")[1].split(" ")[0]) - 1
    assert 0 < step < 5 and _state_step(resume) == step
    tensors = load_file(str(resume / "state.safetensors"))
    assert all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())


def test_optimizer_overflow_is_a_one_line_training_error(synthetic, baseline, tmp_path) -> None:
    # At lr 1e38 Adam's step size itself overflows float32 inside optimizer.step().
    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid", str(synthetic.valid),
        "--field", "user_id", "--out", str(tmp_path / "run"), "--epochs", "1", "--lr", "1e38",
        "-q",
    ])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: the optimiser step overflowed float32")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_weights_gone_bad_do_not_overwrite_the_last_good_state(
    synthetic, baseline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = finetune_mod.bce_step
    calls = {"n": 0}

    def poisoned_step(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # after the save at step 5: the weights went NaN, then the loss
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            raise TrainingError("the training loss became nan")
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(finetune_mod, "bce_step", poisoned_step)
    config = FinetuneConfig(fields={"user_id": "user_id"}, epochs=1, batch_size=256, save_every=5)
    with pytest.raises(TrainingError, match="the last good state is in"):
        finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run", config,
                 progress=False)
    resume = tmp_path / "run.resume"
    assert _state_step(resume) == 5
    tensors = load_file(str(resume / "state.safetensors"))
    assert all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())


def test_collapse_to_length_one_is_reported(synthetic, baseline, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # D = 8, so a budget of 1/8 can only be met by cutting every row to one value.
    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid", str(synthetic.valid),
        "--field", "user_id", "--field", "item_id", "--target-ratio", "0.125", "--out", str(out),
        "--epochs", "1", "--batch-size", "512", "-q",
    ])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "Warning: AMTL collapsed every row of `embeddings.user_id`, `embeddings.item_id` to "
        "length 1; raise --target-ratio or lower --amtl-lr and fine-tune again\n"
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collapsed"] == ["embeddings.user_id", "embeddings.item_id"]
    assert all(t["collapsed"] and t["avg_kept_dim"] == 1.0 for t in metrics["tables"].values())
    lengths = load_file(str(out / "lengths.safetensors"))
    assert all(bool((v == 1).all()) for v in lengths.values())


def test_no_collapse_flag_when_rows_keep_more_than_one_value(
    synthetic, baseline, tmp_path: Path
) -> None:
    with pytest.warns() as record:
        result = finetune(
            baseline, synthetic.train, synthetic.valid, tmp_path / "run",
            FinetuneConfig(fields={"user_id": "user_id"}, epochs=1, batch_size=512,
                           target_ratio=0.5),
            progress=False,
        )
        finetune_mod.warnings.warn("sentinel", UserWarning)  # pytest.warns needs one warning
    assert [str(w.message) for w in record] == ["sentinel"]
    assert result.metrics["collapsed"] == []
    assert result.metrics["tables"]["embeddings.user_id"]["collapsed"] is False


def _first_rows(path: Path, rows: int, out: Path) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(path).slice(0, rows), out)
    return out


def test_unseen_rows_are_reported_before_training(synthetic, baseline, tmp_path: Path) -> None:
    # 200 rows of data cannot show most of the 400 users: those all share one frequency.
    small = _first_rows(synthetic.train, 200, tmp_path / "small.parquet")
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(small), "--valid", str(synthetic.valid),
        "--field", "user_id", "--field", "item_id", "--target-ratio", "0.5", "--out", str(out),
        "--epochs", "1", "--batch-size", "64", "-q",
    ])
    assert result.exit_code == 0, result.output
    counts = {f: count_frequencies(small, f, n) for f, n in (("user_id", 400), ("item_id", 200))}
    unseen = {f: int((c == 0).sum()) for f, c in counts.items()}
    assert unseen["user_id"] > 200  # the fixture's premise
    warned = [line for line in result.stderr.splitlines() if "never occur" in line]
    assert len(warned) == 1 and warned[0].startswith("Warning: `embeddings.user_id`: ")
    assert f"{unseen['user_id']:,} of 400 rows" in warned[0]
    assert warned[0].endswith("pass that data's counts as --counts (docs/data.md)")
    assert ("`embeddings.item_id`" in warned[0]) == (unseen["item_id"] > 100)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tables"]["embeddings.user_id"]["unseen_rows"] == unseen["user_id"]


def test_no_unseen_rows_warning_with_the_training_counts(
    synthetic, baseline, tmp_path: Path
) -> None:
    small = _first_rows(synthetic.train, 200, tmp_path / "small.parquet")
    config = FinetuneConfig(fields={"user_id": "user_id"}, epochs=1, batch_size=64,
                            target_ratio=0.5)
    with pytest.warns(UnseenRowsWarning) as record:
        finetune(baseline, small, synthetic.valid, tmp_path / "a", config, progress=False)
    (warning,) = [w.message for w in record if isinstance(w.message, UnseenRowsWarning)]
    zero, rows = warning.unseen["embeddings.user_id"]
    assert rows == 400 and zero > 200
    counts = tmp_path / "counts.safetensors"
    save_file({"user_id": count_frequencies(synthetic.train, "user_id", 400)}, str(counts))
    with pytest.warns() as record:
        finetune(baseline, small, synthetic.valid, tmp_path / "b", config, progress=False,
                 counts_file=counts)
        finetune_mod.warnings.warn("sentinel", UserWarning)  # pytest.warns needs one warning
    assert [str(w.message) for w in record] == ["sentinel"]
