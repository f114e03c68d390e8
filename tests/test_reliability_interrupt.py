"""Interrupted work: SIGKILL and SIGINT of ``finetune``, SIGKILL of ``pack`` (real subprocesses).

A fine-tuning run killed at any point and rerun with the same command must end exactly where an
uninterrupted run ends; a killed ``pack`` must leave the previous output as it was.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amtl_compress.errors import PackedFormatError, RunDirError
from amtl_compress.lookup.load import load_packed_model
from amtl_compress.storage.pack import pack
from amtl_compress.training.resume import load_state, save_state
from tests.reliability_helpers import (
    make_run_dir,
    run_cli,
    saved_step,
    start_cli,
    tree_bytes,
    wait_for,
)

SAVE_EVERY = 4


@pytest.fixture(scope="module")
def finetune_args(synthetic, baseline) -> list[str]:
    """``finetune`` arguments (all but ``--out``): 2 epochs of 38 steps, a save every 4 steps."""
    return [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid", str(synthetic.valid),
        "--field", "user_id", "--field", "item_id", "--target-ratio", "0.5", "--epochs", "2",
        "--batch-size", "128", "--save-every", str(SAVE_EVERY), "--seed", "3", "-q",
    ]


@pytest.fixture(scope="module")
def reference_run(finetune_args, tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_cli(*finetune_args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _assert_same_result(run: Path, reference: Path) -> None:
    lengths, expected = (load_file(str(p / "lengths.safetensors")) for p in (run, reference))
    assert lengths.keys() == expected.keys()
    for key in expected:
        assert torch.equal(lengths[key], expected[key]), key
    # The weights too, not only the lengths: resuming restored the optimiser and data order.
    model, expected_model = (load_file(str(p / "model.safetensors")) for p in (run, reference))
    for key in expected_model:
        assert torch.equal(model[key], expected_model[key]), key


def _stop_at(args: list[str], state: Path, last: int, target: int, delay: float,
             sig: int) -> subprocess.Popen:
    """Start ``args``; once it saved a step past ``last`` and at least ``target``, wait
    ``delay`` s and send ``sig``. Returns the stopped process.

    Asserts that the run resumed from ``last`` rather than starting over: no step it saved is
    earlier than ``last``.
    """
    proc = start_cli(*args)
    seen: list[int] = []

    def advanced() -> bool:
        step = saved_step(state)
        if step is not None:
            seen.append(step)
        return step is not None and step > last and step >= target

    assert wait_for(advanced, proc), "the run finished before it could be interrupted"
    time.sleep(delay)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert min(seen) >= last, (seen, last)
    return proc


def _interrupt_and_resume(args: list[str], out: Path, signals: list[int], seed: int) -> None:
    """Stop the run with each of ``signals`` in turn, at random steps, then let it finish."""
    rng = random.Random(seed)
    state = out.with_name(out.name + ".resume") / "state.safetensors"
    # Random steps, but well before the last of the 76, so the signal lands inside training
    # (one that lands after the run directory is written has nothing left to interrupt).
    targets = sorted(rng.sample(range(SAVE_EVERY, 40), len(signals)))
    last = 0
    for sig, target in zip(signals, targets, strict=True):
        # Then a random delay: the signal lands mid-step, mid-save or mid-validation.
        proc = _stop_at(args, state, last, target, rng.uniform(0.0, 0.03), sig)
        if sig == signal.SIGINT:
            _, err = proc.communicate()
            assert proc.returncode == 130, err
            assert err.strip() == (
                f"Interrupted; progress is saved in `{state.parent}`: rerun the same command to "
                "resume (or add --no-resume to start over)"
            )
        else:
            assert proc.returncode == -signal.SIGKILL
        assert not out.exists()
        step = saved_step(state)
        assert step is not None and step >= last
        last = step
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert not state.parent.exists()


def test_sigkill_and_sigint_then_resume_match_an_uninterrupted_run(
    finetune_args, reference_run, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _interrupt_and_resume(
        [*finetune_args, "--out", str(out)], out, [signal.SIGKILL, signal.SIGINT], seed=2021
    )
    _assert_same_result(out, reference_run)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_many_sigkills_then_resume_match_an_uninterrupted_run(
    finetune_args, reference_run, tmp_path: Path, seed: int
) -> None:
    out = tmp_path / "run"
    _interrupt_and_resume([*finetune_args, "--out", str(out)], out, [signal.SIGKILL] * 4, seed)
    _assert_same_result(out, reference_run)


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_sigint_before_training_says_there_is_nothing_to_resume(
    finetune_args, tmp_path: Path, delay: float
) -> None:
    """Ctrl-C while importing, reading data or counting: a clean exit, nothing written."""
    proc = start_cli(*finetune_args, "--out", str(tmp_path / "run"))
    time.sleep(delay)
    assert saved_step(tmp_path / "run.resume" / "state.safetensors") is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == -signal.SIGINT or (
        proc.returncode == 1 and err.strip().endswith("KeyboardInterrupt")
    ):
        # Python's start-up, before the CLI installs its handler: the default handling ends the
        # process; on a busy machine 0.3 s can still fall there.
        pass
    else:
        assert proc.returncode == 130, err
        assert err == "Interrupted before the first saved step; nothing to resume.\n"
    assert not (tmp_path / "run").exists()


# --- pack -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A small run (packs in a blink) and a big one (250k x 32 rows, about 1 s to pack)."""
    root = tmp_path_factory.mktemp("runs")
    make_run_dir(root / "small", rows=50, seed=1)
    make_run_dir(root / "big", rows=250_000, seed=2)
    return {"small": root / "small", "big": root / "big"}


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.is_dir()]


def _table_bytes(out: Path) -> int:
    sizes = [f.stat().st_size for t in _temporaries(out) for f in t.glob("embeddings.*")]
    return max(sizes, default=0)


@pytest.mark.parametrize("fraction", [0.3, pytest.param(0.99, marks=pytest.mark.slow)])
def test_sigkill_during_pack_keeps_the_previous_output(
    runs, tmp_path: Path, fraction: float
) -> None:
    out = tmp_path / "packed"
    pack(runs["small"], out, progress=False)
    before = tree_bytes(out)

    proc = start_cli("pack", str(runs["big"]), "--out", str(out), "--overwrite", "-q")
    # Killed a fraction of the way through the table file (about 16.75 MB when complete: 16.5 MB
    # of values, then 0.25 MB of uint8 lengths written last); at 0.99 the kill lands while the
    # file is finished, hashed, or the other weights are written.
    reached = wait_for(lambda: _table_bytes(out) >= fraction * 16.7e6, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert reached and proc.returncode == -signal.SIGKILL

    assert tree_bytes(out) == before  # the previous output, byte for byte
    assert load_packed_model(out).embeddings.user_id.num_embeddings == 50
    # What the dead writer left is refused by name, so it can never pass for an output.
    for leftover in _temporaries(out):
        with pytest.raises(PackedFormatError, match="temporary directory of a `pack`"):
            load_packed_model(leftover)
    # The next writer of the same output clears the dead writer's temporaries.
    pack(runs["small"], out, overwrite=True, progress=False)
    assert _temporaries(out) == []
    assert not (tmp_path / ".packed.lock").exists()


def test_a_complete_but_unrenamed_temporary_is_refused(runs, tmp_path: Path) -> None:
    """A pack killed after its manifest but before the rename leaves a complete-looking copy."""
    out = tmp_path / "packed"
    pack(runs["small"], out, progress=False)
    leftover = tmp_path / ".packed.x1y2z3.tmp"
    out.rename(leftover)
    with pytest.raises(PackedFormatError, match="temporary directory of a `pack`") as info:
        load_packed_model(leftover)
    assert "\n" not in str(info.value)


# --- the resume state itself ------------------------------------------------------------------


def _tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_resume_state_is_one_atomic_file(tmp_path: Path) -> None:
    """A kill after the tensor file but before the readable ``state.json`` copy is harmless."""
    model, optimizer = _tiny()
    save_state(tmp_path, model, optimizer, {"step": 3, "history": []})
    stale = (tmp_path / "state.json").read_text()
    save_state(tmp_path, model, optimizer, {"step": 7, "history": [1]})
    (tmp_path / "state.json").write_text(stale)  # as if killed between the two writes
    fresh_model = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.Adam(fresh_model.parameters())
    progress = load_state(tmp_path, fresh_model, fresh_optimizer)
    assert progress == {"step": 7, "history": [1]}
    assert torch.equal(fresh_model.weight, model.weight)
    (tmp_path / "state.json").unlink()
    assert load_state(tmp_path, fresh_model, fresh_optimizer)["step"] == 7


def test_corrupt_resume_state_is_a_one_line_error(tmp_path: Path) -> None:
    model, optimizer = _tiny()
    save_state(tmp_path, model, optimizer, {"step": 3})
    raw = (tmp_path / "state.safetensors").read_bytes()
    (tmp_path / "state.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RunDirError) as info:
        load_state(tmp_path, model, optimizer)
    message = str(info.value)
    assert "\n" not in message and f"`{tmp_path}`" in message
    assert "delete that directory to start the run from the beginning" in message


def test_first_ctrl_c_is_deferred_second_interrupts_at_once() -> None:
    from amtl_compress.training.launch import DeferredInterrupt

    before = signal.getsignal(signal.SIGINT)
    with DeferredInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert interrupt.requested  # and no KeyboardInterrupt was raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
