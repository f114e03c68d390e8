"""Data-parallel training (training/distributed.py): 2 processes with gloo on this machine.

The runs go through the real launcher, ``python -m torch.distributed.run --standalone
--nproc_per_node=2 -m amtl_compress finetune ...``. A ``sitecustomize`` on the workers'
``PYTHONPATH`` installs an audit hook (``sys.addaudithook``) that logs, per rank, every file
created, opened for writing, renamed or removed under the test's directory: that is how the tests
see which rank wrote what.

Tolerance of a 2-rank run against one process (docs/scaling.md): with W = 2 ranks of B/2 rows
each step sees the same B rows as one process with batch B, and DDP averages the two half-batch
gradients, so the runs differ only by float rounding (summation order); a rounding difference can
flip a hard argmax. Measured on this synthetic data (9 configurations: seeds 0-4, budgets 0.3-0.5
and none, per-rank batch 32-256): every row length equal in 8; in the ninth (AMTL lr 0.03)
99.5 % of the user_id rows equal, realized ratios 0.0006 apart and validation AUC 0.0009 apart;
on 200k rows 98.0 % of the item_id rows (docs/scaling.md). The tests allow 98 % equal rows,
0.005 in ratio and 0.005 in AUC.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from amtl_compress._io import atomic_save_safetensors
from amtl_compress.cli import app
from amtl_compress.errors import ConfigError, DataError, RunDirError, TrainingError
from amtl_compress.training import distributed
from amtl_compress.training.config import FinetuneConfig, TrainConfig
from amtl_compress.training.distributed import World, process_group
from amtl_compress.training.finetune import finetune
from amtl_compress.training.loop import predict, predict_sharded
from amtl_compress.training.train import train_dlrm
from tests.reliability_helpers import REPO, interrupt_at_step, saved_step

#: Fraction of rows whose length must equal the single-process run's, per table.
EQUAL_ROWS = 0.98
#: Largest difference of realized memory ratio, per table, and of validation AUC.
RATIO_TOLERANCE = 0.005
AUC_TOLERANCE = 0.005

PER_RANK_BATCH = 64
FINETUNE_OPTIONS = [
    "--field", "user_id", "--field", "item_id", "--target-ratio", "0.5", "--epochs", "2",
    "--save-every", "4", "--seed", "1",
]

_AUDIT_HOOK = textwrap.dedent('''
    """Test-only: log this torchrun worker's file writes under AMTL_TEST_WRITES_ROOT."""
    import os
    import sys

    _ROOT = os.environ.get("AMTL_TEST_WRITES_ROOT")
    _RANK = os.environ.get("RANK")
    if _ROOT and _RANK is not None:
        _LOG = open(os.path.join(os.environ["AMTL_TEST_WRITES_LOG"], f"rank{_RANK}.log"), "a")
        _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        _EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"}

        def _hook(event, args):
            if event == "open":
                if not (isinstance(args[2], int) and args[2] & _WRITE):
                    return
            elif event not in _EVENTS:
                return
            named = args[:2] if event == "os.rename" else args[:1]  # rename: source, target
            paths = [os.path.abspath(os.fsdecode(a)) for a in named if isinstance(a, (str, bytes))]
            if any(p.startswith(_ROOT) for p in paths):
                _LOG.write(f"{event} {' -> '.join(paths)}\\n")
                _LOG.flush()

        sys.addaudithook(_hook)
''')


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """(environment, working directory, writes-log directory) for this module's torchrun runs."""
    base = tmp_path_factory.mktemp("distributed")
    hook_dir, logs = base / "hook", base / "writes"
    hook_dir.mkdir()
    logs.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_AUDIT_HOOK)
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_ENV}
    env.pop("AMTL_COMPRESS_DEBUG", None)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=f"{hook_dir}{os.pathsep}{REPO}",
        AMTL_TEST_WRITES_ROOT=str(base), AMTL_TEST_WRITES_LOG=str(logs),
    )
    return env, base, logs


def _torchrun(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "amtl_compress", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finetune_args(synthetic, baseline, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid",
        str(synthetic.valid), *FINETUNE_OPTIONS, "--batch-size", str(PER_RANK_BATCH),
        "--out", str(out), *extra,
    ]


def _writes(logs: Path) -> dict[str, list[str]]:
    found = {p.stem: p.read_text().splitlines() for p in logs.glob("rank*.log")}
    for p in logs.glob("rank*.log"):
        p.unlink()  # each test reads the writes of its own runs
    return found


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


@pytest.fixture(scope="module")
def resumed_run(synthetic, baseline, launcher):
    """A 2-rank ``finetune`` interrupted by SIGINT to the launcher, then rerun to completion.

    Returns a dict: ``out`` (run dir), ``saved`` (step in the resume state after the SIGINT),
    ``interrupted`` ((returncode, stderr, whether ``out`` existed) of that launch), ``resumed``
    ((returncode, stdout, stderr) of the rerun) and ``writes`` (rank -> logged writes of both).
    """
    env, base, logs = launcher
    out = base / "two_ranks"
    state = out.with_name(out.name + ".resume") / "state.safetensors"
    args = _finetune_args(synthetic, baseline, out)  # with progress bars: they show the step
    proc = _torchrun(env, *args)
    deadline = time.monotonic() + 120
    while (saved_step(state) or 0) < 4:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # to the launcher, which passes it on to both ranks
    _, interrupted_err = proc.communicate(timeout=120)
    interrupted = (proc.returncode, interrupted_err, out.exists())
    saved = saved_step(state)

    proc = _torchrun(env, *args)
    stdout, stderr = proc.communicate(timeout=300)
    return {
        "out": out, "saved": saved, "interrupted": interrupted,
        "resumed": (proc.returncode, stdout, stderr), "writes": _writes(logs),
    }


def test_interrupted_two_rank_run_resumes(synthetic, resumed_run):
    returncode, stderr, out_existed = resumed_run["interrupted"]
    step = resumed_run["saved"]
    assert returncode != 0 and not out_existed
    assert step is not None and step >= 4
    # Both ranks stopped at the same step; rank 0 alone said so.
    assert stderr.count("Interrupted; progress is saved in") == 1, stderr
    assert _errors(stderr) == []

    returncode, stdout, stderr = resumed_run["resumed"]
    assert returncode == 0, stderr
    # Rank 0's bar starts where the state left off, not at 0 (rank 1 shows none).
    bars = re.findall(r"finetune:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", stderr)
    assert bars and int(bars[0][0]) == step, stderr[:500]
    rows_per_rank = pq.read_metadata(synthetic.train).num_rows // 2
    total = 2 * -(-rows_per_rank // PER_RANK_BATCH)  # 2 epochs
    assert int(bars[0][1]) == total and int(bars[-1][0]) == total
    # Rank 0 alone printed the summary.
    out = resumed_run["out"]
    assert stdout.count(f"wrote {out}") == 1 and stdout.count("avg kept dim") == 1
    assert not out.with_name(out.name + ".resume").exists()


def test_two_ranks_match_one_process_within_tolerance(synthetic, baseline, tmp_path, resumed_run):
    out = resumed_run["out"]
    # One process with twice the per-rank batch takes the same rows at every step.
    single = finetune(
        baseline, synthetic.train, synthetic.valid, tmp_path / "single",
        FinetuneConfig(
            fields={"user_id": "user_id", "item_id": "item_id"}, target_ratio=0.5, epochs=2,
            save_every=4, seed=1, batch_size=2 * PER_RANK_BATCH,
        ),
        progress=False,
    )
    lengths = load_file(str(out / "lengths.safetensors"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert lengths.keys() == single.lengths.keys()
    for path, expected in single.lengths.items():
        equal = float((lengths[path] == expected).double().mean())
        assert equal >= EQUAL_ROWS, (path, equal)
        ratio, expected_ratio = (metrics["tables"][path]["memory_ratio"],
                                 single.metrics["tables"][path]["memory_ratio"])
        assert abs(ratio - expected_ratio) <= RATIO_TOLERANCE
    assert abs(metrics["after"]["auc"] - single.metrics["after"]["auc"]) <= AUC_TOLERANCE
    # The validation set is scored whole (sharded, gathered, reordered), not per shard: the
    # trained model's scores are those of one process, up to the batch size's float rounding.
    assert metrics["before"]["auc"] == pytest.approx(single.metrics["before"]["auc"], abs=1e-6)
    assert metrics["world_size"] == 2


def test_only_rank_0_writes(resumed_run):
    out, writes = resumed_run["out"], resumed_run["writes"]
    assert sorted(writes) == ["rank0", "rank1"], writes  # both workers ran the audit hook
    assert writes["rank1"] == []
    # Rank 0 wrote the resume state, the best epoch and the run directory (via a temporary).
    rank0 = "\n".join(writes["rank0"])
    for name in ("state.safetensors", "best.safetensors", "metrics.json", "lengths.safetensors"):
        assert name in rank0, name
    assert f" -> {out}\n" in rank0 + "\n"  # the run directory renamed into place
    assert sorted(p.name for p in out.iterdir()) == [
        "amtl.safetensors", "config.json", "lengths.safetensors", "metrics.json",
        "model.safetensors",
    ]
    assert _errors(resumed_run["resumed"][2]) == []


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(synthetic, baseline, launcher, resumed_run):
    env, base, logs = launcher
    out = base / "uninterrupted"
    proc = _torchrun(env, *_finetune_args(synthetic, baseline, out, "-q"))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert _writes(logs).get("rank1", []) == []
    # Weights, optimiser state and data order were all restored: the same bits at the end.
    for name in ("lengths.safetensors", "model.safetensors"):
        got, expected = (load_file(str(d / name)) for d in (resumed_run["out"], out))
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)


def test_bad_row_in_one_ranks_shard_is_one_error_line(synthetic, baseline, launcher):
    env, base, logs = launcher
    # Four row groups: rank 1 reads groups 1 and 3, so only it meets the NaN, mid-epoch.
    parts = base / "parts"
    parts.mkdir()
    table = pq.read_table(synthetic.train)
    n = table.num_rows
    for i in range(4):
        part = table.slice(i * n // 4, (i + 1) * n // 4 - i * n // 4)
        if i == 1:
            values = part.column("activity").to_pylist()
            values[7] = float("nan")
            column = part.schema.get_field_index("activity")
            part = part.set_column(column, "activity", pa.array(values, pa.float32()))
        pq.write_table(part, parts / f"part-{i}.parquet")
    out = base / "bad"
    proc = _torchrun(env, "finetune", str(baseline), "--data", str(parts), "--valid",
                     str(synthetic.valid), "--field", "user_id", "--epochs", "1",
                     "--batch-size", "64", "--out", str(out), "-q")
    _, stderr = proc.communicate(timeout=120)  # no hang: rank 0 learns of the error at once
    assert proc.returncode != 0
    errors = _errors(stderr)
    assert len(errors) == 1, stderr
    assert "part-1.parquet" in errors[0] and "`activity`, row 7" in errors[0]
    assert not out.exists() and not out.with_name("bad.resume").exists()
    _writes(logs)


def test_half_set_torchrun_environment_is_a_config_error(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` missing"):
        distributed.launched_by_torchrun()
    for name, value in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "x"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    assert distributed.launched_by_torchrun()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="out of range"):
        distributed.launched_by_torchrun()


def test_single_process_does_not_touch_torch_distributed(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed called in a single-process run")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    with process_group() as world:
        assert world == World() and not world.active and world.is_main
        t = torch.arange(3)
        assert world.all_reduce_(t) is t and world.any_rank(True, False) == (True, False)
        assert [g.tolist() for g in world.gather_rows(t)] == [[0, 1, 2]]
        world.check_same("x", t)
        with pytest.raises(DataError, match="mine"), world.errors_agreed():
            raise DataError("mine")
    assert not dist.is_initialized()


def _collectives(rank: int, init_file: str) -> None:
    """Rank ``rank`` of 2 (torch.multiprocessing.spawn): the World's collectives."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        world = World(rank, 2, torch.device("cpu"), active=True)
        # Shards of different lengths come back whole, in rank order.
        parts = world.gather_rows(torch.arange(3 + rank * 2).float().unsqueeze(1))
        assert [p.shape[0] for p in parts] == [3, 5]
        assert world.any_rank(rank == 1, False) == (True, False)
        world.check_same("lengths", torch.tensor([1, 2, 3]))
        # Same sum, different order: still caught.
        with pytest.raises(TrainingError, match="lengths differ between ranks"):
            world.check_same("lengths", torch.tensor([1, 2, 3] if rank == 0 else [3, 2, 1]))
        # An error on rank 1 alone is raised on both, with rank 1's class and message.
        with pytest.raises(DataError, match="bad row") as caught, world.errors_agreed():
            if rank == 1:
                raise DataError("bad row")
        assert distributed.raised_on_every_rank(caught.value)
        # Sharded prediction equals one process's prediction, in batch order, with 5 batches
        # (rank 0 scores 3, rank 1 scores 2) and a short last one.
        torch.manual_seed(0)  # the same model on both ranks
        model = torch.nn.Linear(4, 1)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(37, 4, generator=gen), torch.randint(0, 2, (37,), generator=gen)

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, features):
                return self.inner(features["x"])

        wrapped = Wrapped()
        batches = [({"x": x[i : i + 8]}, y[i : i + 8].float()) for i in range(0, 37, 8)]
        logits, labels = predict_sharded(wrapped, batches, world)
        expected_logits, expected_labels = predict(wrapped, batches)
        assert torch.equal(logits, expected_logits) and torch.equal(labels, expected_labels)
    finally:
        dist.destroy_process_group()


def test_world_collectives_on_two_ranks(tmp_path):
    mp.spawn(_collectives, args=(str(tmp_path / "init"),), nprocs=2, join=True)


def test_resume_refuses_a_state_saved_by_another_world_size(
    synthetic, baseline, tmp_path, monkeypatch
):
    config = FinetuneConfig(fields={"user_id": "user_id"}, epochs=1, batch_size=512, save_every=2)
    restore = interrupt_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run", config,
                 progress=False)
    restore()
    # Make the state look as if 2 ranks had saved it.
    state = tmp_path / "run.resume" / "state.safetensors"
    with safe_open(str(state), framework="pt") as f:
        metadata = dict(f.metadata())
    progress = json.loads(metadata["amtl_compress.progress"])
    assert progress["world_size"] == 1
    progress["world_size"] = 2
    metadata["amtl_compress.progress"] = json.dumps(progress)
    atomic_save_safetensors(load_file(str(state)), state, metadata)
    with pytest.raises(RunDirError, match="saved by a run of 2 process"):
        finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run", config,
                 progress=False)


@pytest.mark.slow
def test_train_on_two_ranks(synthetic, launcher, tmp_path):
    env, base, logs = launcher
    out = base / "trained.safetensors"
    proc = _torchrun(env, "train", str(synthetic.train), "--valid", str(synthetic.valid),
                     "--out", str(out), "--embedding-dim", "8", "--epochs", "2",
                     "--batch-size", "256", "-q")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.count(f"wrote {out}") == 1
    assert _writes(logs).get("rank1", []) == []
    single = train_dlrm(synthetic.train, synthetic.valid, tmp_path / "single.safetensors",
                        TrainConfig(embedding_dim=8, epochs=2, batch_size=512), progress=False)
    auc = float(stdout.split("valid AUC ")[1].split(",")[0])
    assert abs(auc - single["auc"]) <= AUC_TOLERANCE


def test_error_of_one_rank_alone_names_the_rank(tmp_path):
    runner = CliRunner(mix_stderr=False)
    missing = str(tmp_path / "missing.safetensors")
    # Not raised on every rank (no collective decided it): rank 1 prints it, naming itself.
    result = runner.invoke(app, ["inspect", missing], env={"RANK": "1", "WORLD_SIZE": "2"})
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: (rank 1) ") and result.stderr.count("\n") == 1
    result = runner.invoke(app, ["inspect", missing], env={"RANK": "0", "WORLD_SIZE": "2"})
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "(rank" not in (
        result.stderr
    )


@pytest.mark.parametrize("new_torch", [True, False])
def test_ddp_keeps_buffers_unsynced_per_step_only_where_torch_can(monkeypatch, new_torch: bool):
    # torch >= 2.13: forward_sync_buffers=False (buffers copied at wrap, not at every forward).
    # Older torch (e.g. 2.11, seen on a GPU machine) has no such argument, and its
    # broadcast_buffers=False would skip the copy at wrap too: DDP's defaults are kept there.
    seen: dict = {}

    class NewDDP:
        def __init__(self, module, device_ids=None, forward_sync_buffers=None):
            seen.update(device_ids=device_ids, forward_sync_buffers=forward_sync_buffers)

    class OldDDP:
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            seen.update(device_ids=device_ids, broadcast_buffers=broadcast_buffers)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        NewDDP if new_torch else OldDDP)
    wrapped = distributed.wrap_ddp(torch.nn.Linear(2, 1), World(0, 2, torch.device("cpu"), True))
    assert isinstance(wrapped, NewDDP if new_torch else OldDDP)
    if new_torch:
        assert seen == {"device_ids": None, "forward_sync_buffers": False}
    else:
        assert seen == {"device_ids": None, "broadcast_buffers": True}
