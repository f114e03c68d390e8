"""The CLI says library errors with its own flags: the translation, and the exact lines printed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from amtl_compress.cli import app, cli_message
from tests.reliability_helpers import interrupt_at_step

runner = CliRunner(mix_stderr=False)

OPTIONS = {"overwrite", "out", "resume", "lr", "amtl_lr", "target_ratio", "field", "model",
           "counts", "label"}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("pass `overwrite=True` or choose another `out`",
         "pass --overwrite or choose another --out"),
        ("or pass `resume=False` to start over", "or pass --no-resume to start over"),
        ("use `target_ratio=0.4`", "use --target-ratio 0.4"),
        ("lower `lr` or `amtl_lr`", "lower --lr or --amtl-lr"),
        ("no `fields` given", "no --field given"),
        ("pass `model_factory=pkg.mod:build`", "pass --model pkg.mod:build"),
        ("the `counts_file`", "the --counts"),
        # Not options: paths, columns, modules, placeholders stay as they are.
        ("`runs/a` has no `model.safetensors`", "`runs/a` has no `model.safetensors`"),
        ("bad `fields` entry `x=`; use `MODULE=COLUMN`",
         "bad --field entry `x=`; use `MODULE=COLUMN`"),
        ("column `user_id` of `embeddings.user_id`", "column `user_id` of `embeddings.user_id`"),
        # A label column is often named `label`: a bare `label` is never read as the option.
        ("label column `label` is not 0/1", "label column `label` is not 0/1"),
        ("`label=clicked`", "--label clicked"),
        ("`--overwrite` and `nope=1`", "`--overwrite` and `nope=1`"),
    ],
)
def test_cli_message_turns_python_parameters_into_flags(message: str, expected: str) -> None:
    assert cli_message(message, OPTIONS) == expected


def _finetune(baseline, synthetic, out, *extra: str):
    return runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid",
        str(synthetic.valid), "--out", str(out), "--epochs", "2", "--batch-size", "512",
        "--save-every", "3", "-q", *extra,
    ])


def test_error_lines_are_pinned(synthetic, baseline, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    result = _finetune(baseline, synthetic, out, "--field", "user_id")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: output directory `{out}` exists; pass --overwrite or choose another --out\n"
    )

    result = _finetune(baseline, synthetic, tmp_path / "r", "--field", "x=")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: bad --field entry `x=`; use `MODULE=COLUMN` or a bare name used for both\n"
    )
    assert not (tmp_path / "r").exists()


def test_resume_with_other_options_is_refused(synthetic, baseline, tmp_path, monkeypatch):
    out = tmp_path / "run"
    restore = interrupt_at_step(monkeypatch, 5)  # after the save at step 3
    result = _finetune(baseline, synthetic, out, "--field", "user_id")
    assert result.exit_code == 130
    state = tmp_path / "run.resume"
    assert result.stderr == (
        f"Interrupted; progress is saved in `{state}`: rerun the same command to resume "
        "(or add --no-resume to start over)\n"
    )
    restore()
    result = _finetune(baseline, synthetic, out, "--field", "user_id", "--lr", "0.02")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: `{state}` holds an interrupted run with a different configuration; rerun with "
        "the same options, or pass --no-resume to start over\n"
    )


def test_cli_and_launch_import_without_torch():
    # Ctrl-C may cut `import torch` short; what reports it must not need torch.
    code = ("import sys, amtl_compress.cli, amtl_compress.training.launch; "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == "False"


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="checks the error printed without CUDA")
def test_eval_device_cuda_without_cuda_is_one_line(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path / "test.parquet"), "--checkpoint",
                                 str(tmp_path / "base.safetensors"), "--device", "cuda"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --device cuda but CUDA is not available (")
    assert result.stderr.endswith("); pass --device cpu\n") and result.stderr.count("\n") == 1
