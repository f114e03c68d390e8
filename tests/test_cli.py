import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from amtl_compress.cli import app

runner = CliRunner(mix_stderr=False)


def test_train_finetune_inspect(synthetic, tmp_path):
    base = tmp_path / "base.safetensors"
    result = runner.invoke(app, [
        "train", str(synthetic.train), "--valid", str(synthetic.valid), "--out", str(base),
        "--embedding-dim", "8", "--epochs", "1", "--batch-size", "512", "-q",
    ])
    assert result.exit_code == 0, result.output
    assert "valid AUC" in result.stdout and base.exists()

    result = runner.invoke(app, ["inspect", str(base)])
    assert result.exit_code == 0, result.output
    assert "embeddings.user_id" in result.stdout and "400" in result.stdout

    out = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", str(base), "--data", str(synthetic.train), "--valid", str(synthetic.valid),
        "--field", "user_id", "--field", "embeddings.item_id=item_id", "--out", str(out),
        "--target-ratio", "0.5", "--epochs", "1", "--batch-size", "512", "-q",
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tables"]) == {"embeddings.user_id", "embeddings.item_id"}
    assert "avg kept dim" in result.stdout and "embeddings.item_id" in result.stdout


def test_known_errors_are_one_line_with_exit_code_1(synthetic, baseline, tmp_path):
    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid",
        str(synthetic.valid), "--field", "nope", "--out", str(tmp_path / "r"), "-q",
    ])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "nope" in result.stderr and "embeddings.user_id" in result.stderr
    assert not (tmp_path / "r").exists()

    result = runner.invoke(app, ["inspect", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ")


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "amtl_compress", "--help"], capture_output=True, text=True,
        check=False,
    )
    assert proc.returncode == 0
    for command in ("train", "finetune", "inspect", "demo"):
        assert command in proc.stdout


def test_pack_and_eval_commands(synthetic, baseline, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid",
        str(synthetic.valid), "--field", "user_id", "--out", str(run), "--epochs", "1",
        "--target-ratio", "0.5", "-q",
    ])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["pack", str(run), "--out", str(tmp_path / "p"), "-q"])
    assert result.exit_code == 0, result.output
    assert "embeddings.user_id" in result.stdout
    result = runner.invoke(app, ["pack", str(run), "--out", str(tmp_path / "p"), "-q"])
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    result = runner.invoke(app, [
        "eval", str(synthetic.test), "--checkpoint", str(baseline), "--run", str(run),
        "--packed", str(tmp_path / "p"),
    ])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:]] == ["checkpoint", "fine-tuned", "packed"]
    # fp32 packing is exact, so the fine-tuned and packed rows agree on AUC and logloss.
    assert lines[3].split()[1:3] == lines[4].split()[1:3]
    again = runner.invoke(app, [
        "eval", str(synthetic.test), "--packed", str(tmp_path / "p"), "--device", "cpu",
    ])
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[2].split() == lines[4].split()  # the default path
    if torch.cuda.is_available():  # the packed model on the GPU: the same metrics
        on_gpu = runner.invoke(app, [
            "eval", str(synthetic.test), "--packed", str(tmp_path / "p"), "--device", "cuda",
        ])
        assert on_gpu.exit_code == 0, on_gpu.output
        got = [float(x) for x in on_gpu.stdout.splitlines()[2].split()[1:3]]
        assert got == pytest.approx([float(x) for x in lines[4].split()[1:3]], abs=2e-4)


def test_finetune_defaults_are_the_configs_defaults():
    import inspect

    from amtl_compress.cli import finetune
    from amtl_compress.core.amtl import AMTLConfig
    from amtl_compress.training.config import FinetuneConfig

    params = inspect.signature(finetune).parameters
    default = AMTLConfig()
    for name in ("ordering", "price_rule", "price_scale"):
        assert params[name].default == getattr(default, name), name
    config = FinetuneConfig()
    for name in ("epochs", "batch_size", "lr", "dense_lr", "amtl_lr", "budget_warmup"):
        assert params[name].default == getattr(config, name), name


def test_finetune_price_rule_options(synthetic, baseline, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid", str(synthetic.valid),
        "--field", "user_id", "--out", str(out), "--target-ratio", "0.5", "--epochs", "1",
        "--batch-size", "512", "--price-rule", "rank", "--price-scale", "0.5", "-q",
    ])
    assert result.exit_code == 0, result.output
    amtl = json.loads((out / "config.json").read_text())["finetune"]["amtl"]
    assert (amtl["price_rule"], amtl["price_scale"], amtl["version"]) == ("rank", 0.5, 3)

    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid", str(synthetic.valid),
        "--field", "user_id", "--out", str(tmp_path / "bad"), "--price-rule", "count", "-q",
    ])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "--price-rule" in result.stderr and "log_count" in result.stderr
    assert not (tmp_path / "bad").exists()
