"""Helpers shared by the ``test_reliability_*`` files and the resume tests: CLI subprocesses,
synthetic run directories, an interrupted fine-tune."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from amtl_compress._io import atomic_save_safetensors
from amtl_compress.checkpoint import save_checkpoint
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.models.factory import model_spec_for

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: one thread each (bitwise-repeatable, no oversubscription
    on 2 cores) and the repository on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("AMTL_COMPRESS_DEBUG", None)
    return env


def start_cli(*args: str) -> subprocess.Popen:
    """Start ``python -m amtl_compress ARGS`` with stdout/stderr captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "amtl_compress", *args], cwd=REPO, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m amtl_compress ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "amtl_compress", *args], cwd=REPO, env=cli_env(),
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Poll ``condition`` every 5 ms until it holds (True) or ``proc`` exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.005)
    raise TimeoutError("condition not reached in time")


def make_run_dir(run: Path, rows: int, dim: int = 32, seed: int = 0) -> None:
    """Write a run directory (docs/design.md) for a reference DLRM whose AMTL table
    ``embeddings.user_id`` has ``rows`` rows (``embeddings.item_id`` stays dense).

    The table's tails past each row's random length are zeroed, as ``finetune`` leaves them.
    """
    gen = torch.Generator().manual_seed(seed)
    config = DLRMConfig(
        categorical={"user_id": rows, "item_id": 8}, embedding_dim=dim, top_mlp=(4,)
    )
    with torch.device("meta"):
        state = DLRM(config).state_dict()
    tensors = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
    lengths = torch.randint(1, dim + 1, (rows,), generator=gen)
    weight = tensors["embeddings.user_id.weight"]
    weight[torch.arange(dim)[None, :] >= lengths[:, None]] = 0
    run.mkdir(parents=True)
    save_checkpoint(run / "model.safetensors", tensors, model_spec_for(config))
    atomic_save_safetensors({"embeddings.user_id": lengths}, run / "lengths.safetensors")


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of ``directory`` (not recursive) by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def saved_step(state_file: Path) -> int | None:
    """The ``step`` a finetune resume state holds, or None when there is none (yet)."""
    from safetensors import safe_open

    try:
        with safe_open(str(state_file), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # missing, or replaced between open and read: no readable state now
        return None


def interrupt_at_step(monkeypatch, step: int) -> Callable[[], None]:
    """Make ``finetune``'s ``step``-th optimiser step (1-based, counted over every call from now)
    raise KeyboardInterrupt, as a Ctrl-C would; returns a function that puts the real step back."""
    import amtl_compress.training.finetune as finetune_mod

    real_step, calls = finetune_mod.bce_step, {"n": 0}

    def interrupted_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(finetune_mod, "bce_step", interrupted_step)
    return lambda: monkeypatch.setattr(finetune_mod, "bce_step", real_step)
